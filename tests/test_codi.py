"""CODI (method=codi): its sequences, its three loss terms and gradients against a PyTorch
transliteration of the reference's forward (tests/codi_reference.py), its settings block, and
the method's seams (a fresh part needed at inference, per-layer hidden states at chosen
positions)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coconut_jax import config as config_lib, hf, methods, models
from coconut_jax.data import PlanSettings
from coconut_jax.labels import IGNORE
from coconut_jax.methods.codi import forward, score
from coconut_jax.models import lora as lora_lib
from tests.conftest import built_once

RECORDS = [
    {"question": "Tom has 3 apples and buys 2 more. How many?", "steps": ["<<3+2=5>>"], "answer": "5"},
    {"question": "Sara had 1200 coins and spent 200 of them on food and drink today. How many are left?",
     "steps": ["<<1200-200=1000>>", "<<1000*1=1000>>"], "answer": "1000"},
    {"question": "What is 7 times 6?", "steps": ["<<7*6=42>>", "<<42+0=42>>", "<<42*1=42>>"], "answer": "42"},
    {"question": "Ann owes 4 dollars and pays 9. What is her balance?", "steps": ["<<4-9=-5>>"], "answer": "-5"},
]
K = 3


def _texts():
    return [r["question"] + " ".join(r["steps"]) + " The answer is: " + r["answer"] for r in RECORDS] * 30


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_dir(request, tmp_path_factory):
    from coconut_jax import tiny

    def build(root):
        tiny.build(_texts(), str(root / "model"), vocab_size=500, n_layer=2, n_embd=32, n_head=4, n_positions=128,
                   seed=1, family=request.param)
    return request.param, str(built_once(tmp_path_factory, f"codi_{request.param}", build) / "model")


def setup(model_dir, seed=3, **settings):
    """(method, tok, tokens, config, LoRA model, params with non-zero B, projection, its params)."""
    method = methods.get("codi").configure({"num_latent": K, **settings})
    tok = hf.load_tokenizer(model_dir)
    config, params = hf.load_pretrained(model_dir)
    vocab = config.vocab_size
    config, params = method.add_rows(config, params, tok, vocab)
    targets = lora_lib.resolve_targets(models.family(models.model_type(config)), ())
    model = models.build(config, lora=lora_lib.Lora(rank=4, alpha=8.0, dropout=0.0, targets=targets),
                         fused_attention=False)
    params = lora_lib.attach(model, jax.tree.map(np.asarray, params), seed)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0, 0.3, x.shape).astype(np.float32) if path[-1].key == "lora_b" else x, params)
    prj = method.part_module(method.parts[0], config)
    return method, tok, method.special_tokens(tok, vocab), config, model, params, prj, prj.init(seed)


def batches(method, tok, tokens, records, size, multiple=8, shuffle=False):
    ts = method.tokenize(records, tok, "records.json")
    return list(method.epoch_plan(ts, None, tokens, 0, 0, PlanSettings(seed=0, batch_size=size, multiple=multiple),
                                  shuffle=shuffle).batches())


def jnp_arrays(b):
    return {k: jnp.asarray(v) for k, v in b.arrays().items()}


def terms(method, model, params, prj, prj_params, b):
    """The batch's terms as evaluation computes them (`steps.eval_loss_terms`, jitted)."""
    from coconut_jax import steps
    return steps.eval_loss_terms(model, params, jnp_arrays(b), method=method, prefix_len=0, n_latent=K,
                                 parts={"projection": prj_params}, part_models=(("projection", prj),))


# -- the sequences ----------------------------------------------------------------------------------

def test_a_record_becomes_teacher_encoder_and_decoder_sequences(family_dir):
    family, model_dir = family_dir
    method, tok, tokens, *_ = setup(model_dir)
    (b,) = batches(method, tok, tokens, RECORDS, 4)
    d = b.arrays()
    v = tokens.vocab
    assert (tokens.pad, tokens.bot, tokens.eot) == (v, v + 1, v + 2)
    # The record with a negative answer does not train (the reference's filter); the others in file order.
    assert b.indices.tolist() == [0, 1, 2, -1] and d["rows"].tolist() == [1, 1, 1, 0]
    bos = [tok.bos_token_id] if family == "llama" else []
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for r, rec in enumerate(RECORDS[:3]):
        q, c = bos + enc(rec["question"]), enc(" ".join(rec["steps"][:-1]))  # the last step dropped
        a = enc("The answer is: " + rec["answer"]) + [tok.eos_token_id]
        n = len(q) + len(c) + len(a)
        assert d["ref_ids"][r, :n].tolist() == q + c + a and set(d["ref_ids"][r, n:].tolist()) <= {tokens.pad}
        assert d["ref_labels"][r, :n].tolist() == [IGNORE] * len(q) + c + a
        we = d["enc_ids"].shape[1]
        assert d["enc_ids"][r, we - len(q) - 1:].tolist() == q + [tokens.bot]
        assert d["enc_mask"][r].sum() == len(q) + 1 and set(d["enc_ids"][r, :we - len(q) - 1].tolist()) <= {tokens.pad}
        assert d["dec_ids"][r, :len(a) + 1].tolist() == [tokens.eot] + a == d["dec_labels"][r, :len(a) + 1].tolist()
        # The distilled token: ":" for GPT-2 (" 5" is one token), the " " before the digits for Llama-3's split.
        want = ":" if family == "gpt2" else " "
        assert tok.decode([int(d["ref_ids"][r, d["ref_pos"][r]])]) == want
        assert tok.decode([int(d["dec_ids"][r, d["dec_pos"][r]])]) == want
    # An evaluation batch's encoder is exactly its longest question + bot (the reference's collator).
    assert d["enc_ids"].shape[1] == max(len(bos + enc(r["question"])) for r in RECORDS[:3]) + 1


def test_one_step_chains_are_empty_and_the_last_step_is_a_setting(family_dir):
    _, model_dir = family_dir
    method, tok, tokens, *_ = setup(model_dir)
    chain = lambda ts, r: ts.piece(int(ts.records[r]) + 1)  # noqa: E731  (question, chain, answer, verdict)
    ts = method.tokenize(RECORDS, tok, "r")
    assert chain(ts, 0) == ()  # one step, dropped: an empty chain trains (the reference crashes on record 0)
    assert ts.piece(int(ts.records[0]) + 3) == (1, ts.piece(int(ts.records[0]) + 3)[1])  # it trains
    with_last = methods.get("codi").configure({"include_last_cot": True})
    assert with_last.format_key != method.format_key  # token caches tell them apart
    assert len(chain(with_last.tokenize(RECORDS, tok, "r"), 0)) > 0


def test_answers_are_scored_by_the_last_number_or_by_text():
    assert score("so 3 + 2 = 5. The answer is: 5", "5", "number") == ("5", True)
    assert score("The answer is: 1,000", "1000", "number") == ("1000", True)
    assert score("The answer is: 5.0", "5", "number") == ("5", True)  # floats compared, as the reference does
    assert score("no number", "5", "number") == ("", False)
    assert score("The answer is: Alex is a yumpus.", "Alex is a yumpus.", "text") == ("Alex is a yumpus.", True)


# -- the three terms against the reference ----------------------------------------------------------

def _torch_projection(prj, p):
    import torch

    from tests import codi_reference
    tp = codi_reference.Projection(prj.width, prj.hidden)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(tp, name).weight.copy_(torch.tensor(np.asarray(p[name]["kernel"]).T))
            getattr(tp, name).bias.copy_(torch.tensor(np.asarray(p[name]["bias"])))
        tp.ln.weight.copy_(torch.tensor(np.asarray(p["ln"]["scale"])))
        tp.ln.bias.copy_(torch.tensor(np.asarray(p["ln"]["bias"])))
    return tp


def _torch_model(config, model, params, tok, out):
    from transformers import AutoModelForCausalLM
    merged = jax.tree.map(np.asarray, lora_lib.merged(model, params))
    return AutoModelForCausalLM.from_pretrained(hf.export_hf(config, merged, out, tokenizer=tok, overwrite=True),
                                                attn_implementation="eager").eval()


def test_terms_equal_the_reference_forward(family_dir, tmp_path):
    """Per batch, with the pads attended as the reference attends them (its default), the
    adapters non-zero (merged into the weights on the PyTorch side): student and teacher
    token losses and the distillation term within 1e-5."""
    pytest.importorskip("torch")
    from tests import codi_reference
    family, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp = setup(model_dir)
    tm = _torch_model(config, model, params, tok, str(tmp_path / "merged"))
    kept = RECORDS[:3]
    for size in (3, 2):  # [0, 1, 2]; then [0, 1] and [2]: different left pads
        for b in batches(method, tok, tokens, kept, size):
            rows = [kept[i] for i in b.indices if i >= 0]
            want = codi_reference.terms(tm, _torch_projection(prj, pp),
                                        codi_reference.prepare(rows, tok, tokens.vocab, llama_shift=family == "llama"),
                                        K)
            got = terms(method, model, params, prj, pp, b)
            (s, ns), (t, nt), (d, nd) = (tuple(float(x) for x in got[k]) for k in ("student", "teacher", "distill"))
            assert (ns, nt, nd) == (want["student_tokens"], want["teacher_tokens"], 1.0)
            np.testing.assert_allclose([s / ns, t / nt, d], [want["student"], want["teacher"], want["distill"]],
                                       rtol=1e-5)


def test_masked_pads_make_a_row_independent_of_its_batch(family_dir):
    """`mask_pads`: a batch's student loss is the sum of its rows' losses alone (no pad
    attended, positions from the question on); the reference's behaviour differs with the padding."""
    _, model_dir = family_dir
    kept = RECORDS[:3]
    for mask_pads in (True, False):
        method, tok, tokens, config, model, params, prj, pp = setup(model_dir, mask_pads=mask_pads)

        def student(b):
            return float(terms(method, model, params, prj, pp, b)["student"][0])
        (whole,) = batches(method, tok, tokens, kept, 3)
        alone = sum(student(b) for b in batches(method, tok, tokens, kept, 1))
        if mask_pads:
            np.testing.assert_allclose(student(whole), alone, rtol=1e-5)
        else:
            assert abs(student(whole) - alone) > 1e-3 * alone


def test_gradients_equal_the_reference_autograd(family_dir, tmp_path):
    """The projection's gradient of the objective (student + teacher + distillation), through
    every thought pass, equals PyTorch's autograd of the transliteration."""
    torch = pytest.importorskip("torch")
    from tests import codi_reference
    family, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp = setup(model_dir)
    tm = _torch_model(config, model, params, tok, str(tmp_path / "merged"))
    (b,) = batches(method, tok, tokens, RECORDS[:3], 3)
    arrays = jnp_arrays(b)

    def objective(p):
        got = method.loss_terms(model, params, arrays, prefix_len=0, n_latent=K, parts={"projection": (prj, p)})
        return sum(got[k][0] / got[k][1] for k in ("student", "teacher", "distill"))
    grads = jax.grad(objective)(jax.tree.map(jnp.asarray, pp))
    tp = _torch_projection(prj, pp)
    tb = codi_reference.prepare(RECORDS[:3], tok, tokens.vocab, llama_shift=family == "llama")
    with torch.enable_grad():
        out = codi_reference.terms(tm, tp, tb, K, grad=True)
        (out["student"] + out["teacher"] + out["distill"]).backward()
    np.testing.assert_allclose(np.asarray(grads["fc1"]["kernel"]), tp.fc1.weight.grad.numpy().T, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads["fc2"]["bias"]), tp.fc2.bias.grad.numpy(), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads["ln"]["scale"]), tp.ln.weight.grad.numpy(), rtol=2e-4, atol=1e-7)


def test_the_model_reports_every_layers_state_at_chosen_positions(family_dir):
    """`body(..., taps=)` gives Hugging Face's `hidden_states` at one position per row (the
    embedding output, layers 0..n-2, the final-normed last), scanned layers or not."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    _, model_dir = family_dir
    config, params = hf.load_pretrained(model_dir)
    ids = np.array([[5, 9, 31, 7, 2], [8, 8, 40, 3, 1]], np.int32)
    taps = np.array([3, 1], np.int32)
    tm = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        want = tm(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    want = np.stack([h.numpy()[np.arange(2), taps] for h in want])
    for scan in (False, True):
        model = models.build(config, scan_layers=scan, fused_attention=False)
        pos = np.broadcast_to(np.arange(5), ids.shape)
        _, _, got = model.body(params, model.embed(params, jnp.asarray(ids)), pos, np.ones_like(ids), taps=taps)
        assert got.shape == (config.n_layer + 1, 2, config.n_embd)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


# -- settings -----------------------------------------------------------------------------------------

def test_settings_are_a_config_block_validated_with_the_rest():
    c = config_lib.base_config()
    c.method, c.train_path, c.val_path = "codi", "x", "y"
    assert config_lib.method_of(c).setting("num_latent") == 6
    c.codi.num_latent = 0
    with pytest.raises(config_lib.ConfigError, match=r"codi.num_latent=0 must be >= 1"):
        config_lib.validate(c, data_files=False)
    c.codi.num_latent, c.codi.answers = 2, "words"
    with pytest.raises(config_lib.ConfigError, match=r"codi.answers='words' must be one of number, text"):
        config_lib.validate(c, data_files=False)
    c.codi.answers, c.codi.distill_factor = "number", 20.0
    m = config_lib.method_of(c)
    assert m.loss == (("student", 1.0), ("teacher", 1.0), ("distill", 20.0)) and m.setting("num_latent") == 2
    # Another method's runs do not carry the block in their identity.
    from coconut_jax import rundir
    assert "codi" in rundir.identity(c) and "codi" not in rundir.identity(config_lib.base_config())


def test_an_unknown_setting_is_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env
    r = subprocess.run([sys.executable, "-m", "coconut_jax.train", "--config", "configs/gsm_codi.py",
                        "--config.codi.num_latnt=3"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: config: unknown field --config.codi.num_latnt; did you "
                                                  "mean --config.codi.num_latent?")


def test_new_rows_are_drawn_as_transformers_resizes(family_dir):
    """pad, bot and eot: the rows' mean plus noise of 1e-9 x their covariance; a checkpoint
    already holding them is left as it is; the same rows every time (a LoRA base rebuilds)."""
    _, model_dir = family_dir
    method = methods.get("codi")
    tok = hf.load_tokenizer(model_dir)
    config, params = hf.load_pretrained(model_dir)
    v = config.vocab_size
    grown_config, grown = method.add_rows(config, params, tok, v)
    assert grown_config.vocab_size == v + 3 and grown["wte"].shape[0] == v + 3
    mean, spread = params["wte"].mean(0), params["wte"].std(0)
    assert np.all(np.abs(grown["wte"][v:] - mean) < 1e-3 * spread)
    assert np.any(grown["wte"][v] != grown["wte"][v + 1])
    np.testing.assert_array_equal(method.add_rows(config, params, tok, v)[1]["wte"], grown["wte"])
    assert method.add_rows(grown_config, grown, tok, v)[1] is grown


def test_codi_is_named_only_in_its_own_package_and_its_variant():
    import os
    import re

    from tests.conftest import ROOT
    pkg = os.path.join(ROOT, "coconut_jax")
    for dirpath, _, files in os.walk(pkg):
        if os.path.join("methods", "codi") in dirpath:
            continue
        for f in files:
            if f.endswith(".py") and f != "codi_simcot.py":  # SIM-CoT's decoder on it, declared on its record
                text = open(os.path.join(dirpath, f)).read()
                assert not re.search(r"\bcodi\b", text, re.I), os.path.join(dirpath, f)


def test_greedy_answers_follow_the_thoughts(family_dir):
    """`predict`: the file's questions in order, the thoughts, eot, greedy; each row's tokens
    equal a step-by-step decoding of that row alone (the reference's padding: the batch's
    longest question)."""
    _, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp = setup(model_dir)
    merged = lora_lib.merged(model, params)
    plain = models.build(config, fused_attention=False)
    ts = method.tokenize(RECORDS, tok, "r")
    preds = method.predict(plain, merged, {"projection": (prj, pp)}, ts, RECORDS, 0, None, tokens, tok,
                           batch_size=4, max_new_tokens=5)
    assert [p.index for p in preds] == [0, 1, 2, 3] and {p.thoughts for p in preds} == {K}
    # Row 2 alone, its encoder padded as in the batch of four (same left pads, same positions).
    q = list(ts[2].question) + [tokens.bot]
    width = max(len(ts[i].question) for i in range(4)) + 1
    ids = np.full((1, width), tokens.pad, np.int32)
    ids[0, width - len(q):] = q
    mask = (ids != tokens.pad).astype(np.int32)
    toks, kept = forward.generate(plain, merged, prj, pp, ids, mask, tokens.eot, tokens.eos, n_latent=K,
                                  max_new_tokens=5, mask_pads=False)
    text = tok.decode([t for t in np.asarray(toks)[0, :int(kept[0])].tolist() if t < tokens.vocab],
                      skip_special_tokens=True)
    assert preds[2].text == text and preds[2].new_tokens == int(kept[0])


# -- the reference's saved checkpoints ----------------------------------------------------------------

def reference_checkpoint(model_dir, out, family, fmt="bin", seed=7):
    """A state dict in the reference's layout, written as its training saves it: the CODI module
    (`codi` the PEFT-wrapped model, resized to V + 3 by transformers, `prj` the projection) from
    a tiny model, with non-zero LoRA B. Returns (its directory, the PEFT model, the torch projection)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    base.resize_token_embeddings(base.config.vocab_size + 3)
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=targets,
                                                 init_lora_weights=True, fan_in_fan_out=family == "gpt2"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)

    class Codi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            d = base.config.hidden_size
            self.codi = peft_model
            self.prj = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(d, d), torch.nn.GELU(),
                                           torch.nn.Linear(d, d))
            self.prj.add_module("ln", torch.nn.LayerNorm(d))
    module = Codi()
    out.mkdir()
    sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    if fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        sd.pop("codi.base_model.model.lm_head.weight", None)  # tied: stored once, as Trainer's safetensors do
        save_file(sd, str(out / "model.safetensors"))
    return out, module.eval()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_reference_checkpoint_loads_with_its_projection_and_evaluates_the_same(family_dir, tmp_path, fmt):
    """`load_model_path` = the reference's output directory: the adapters merged (at the run's
    lora.alpha, 32 as published), the projection read from `prj.*`; its three terms equal the
    reference forward run on the PEFT model itself."""
    pytest.importorskip("peft")
    from coconut_jax import weights
    from tests import codi_reference
    family, model_dir = family_dir
    out, module = reference_checkpoint(model_dir, tmp_path / "ref", family, fmt)
    source = weights.source_of(str(out))
    assert source.kind == "reference"
    tok = hf.load_tokenizer(model_dir)
    w = weights.load(source, model_dir, "codi", tok, lora_alpha=32.0)
    config = hf.load_config(model_dir)
    assert w.config.vocab_size == config.vocab_size + 3 and set(w.parts) == {"projection"}
    method = methods.get("codi").configure({"num_latent": K})
    prj = method.part_module(method.parts[0], w.config)
    model = models.build(w.config, fused_attention=False)
    tokens = method.special_tokens(tok, config.vocab_size)
    (b,) = batches(method, tok, tokens, RECORDS[:3], 3)
    got = terms(method, model, w.params, prj, w.parts["projection"], b)
    want = codi_reference.terms(module.codi, module.prj,
                                codi_reference.prepare(RECORDS[:3], tok, config.vocab_size,
                                                       llama_shift=family == "llama"), K)
    np.testing.assert_allclose([float(got[k][0] / got[k][1]) for k in ("student", "teacher", "distill")],
                               [want["student"], want["teacher"], want["distill"]], rtol=1e-5)


def test_a_coconut_checkpoint_hands_off_to_codi_but_not_to_cot(tiny_run):
    """CODI's three added ids take the places of Coconut's three latent rows (a Coconut run's
    CoT-stage checkpoint starts a CODI run, as on the demo's task); a method with no added rows
    is refused, as the reference refuses it."""
    import os

    from coconut_jax import rundir, trained, weights
    model_id = trained.run_config(tiny_run).model_id  # the run's prepared model
    tok = hf.load_tokenizer(model_id)
    source = weights.source_of(os.path.join(tiny_run, "checkpoints"))
    w = weights.load(source, model_id, "codi", tok)
    assert w.params["wte"].shape[0] == hf.load_config(model_id).vocab_size + 3 == w.config.vocab_size
    with pytest.raises(rundir.RunDirError, match="a coconut checkpoint .with latent tokens. cannot be loaded into "
                                                 "method 'cot'"):
        weights.load(source, model_id, "cot", tok)
