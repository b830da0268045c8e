"""SIM-CoT's step decoder on CODI (method=codi_simcot): its step targets from the teacher's
chain, CODI's terms unchanged, its step term against a PyTorch transliteration of the
reference (intended and reference lengths), the thoughts it reads (bit-equal to those the student
is fed), where its gradients go, and the reference's saved
state dict."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coconut_jax import hf, methods, models, steps
from coconut_jax.data import PlanSettings
from tests.test_codi import K, batches, family_dir, jnp_arrays, setup  # noqa: F401

# Chains of several steps: their teacher keeps all but the last.
LONG = [{"question": f"Sam has {a} pens. He gets more, step by step. How many?",
         "steps": [f"<<{a + i}+1={a + i + 1}>>" for i in range(n)], "answer": str(a + n)}
        for a, n in ((3, 2), (5, 3), (2, 1), (4, 9))]


def simcot_setup(model_dir, **settings):
    method = methods.get("codi_simcot").configure({"num_latent": K, **settings})
    _, tok, tokens, config, model, params, prj, pp = setup(model_dir)
    dec_config, dec_params = hf.load_pretrained(model_dir)  # the decoder: model_id's pretrained model
    decoder = models.build(dec_config, fused_attention=False)
    return method, tok, method.special_tokens(tok, hf.load_config(model_dir).vocab_size), config, model, params, \
        prj, pp, decoder, jax.tree.map(jnp.asarray, dec_params)


def eval_terms(method, model, params, prj, pp, decoder, dp, b):
    return steps.eval_loss_terms(model, params, jnp_arrays(b), method=method, prefix_len=0, n_latent=K,
                                 parts={"projection": pp, "decoder": dp},
                                 part_models=(("decoder", decoder), ("projection", prj)))


def test_step_targets_are_the_teacher_chains_steps_one_per_thought(family_dir):
    _, model_dir = family_dir
    method, tok, tokens, *_ = simcot_setup(model_dir)
    assert tokens.opens and tokens.close is not None
    ts = method.tokenize(LONG, tok, "long.json")
    (b,) = list(method.epoch_plan(ts, None, tokens, 0, 0, PlanSettings(seed=0, batch_size=4, multiple=8),
                                  shuffle=False).batches())
    ids, mask = b.arrays()["step_ids"], b.arrays()["step_mask"]
    assert ids.shape[:2] == (4, K + 1)  # a group per thought, z1..z_{K+1}

    def group(r, t):
        return tok.decode(ids[r, t][mask[r, t] > 0].tolist()[:-1]).strip()
    # Record 0: two steps, the last dropped: one target, then empty groups; each ends with eos.
    assert group(0, 0) == "<<3+1=4>>" and mask[0, 1:].sum() == 0
    assert ids[0, 0][mask[0, 0] > 0].tolist()[-1] == tok.eos_token_id
    assert [group(1, t) for t in range(2)] == ["<<5+1=6>>", "<<6+1=7>>"]
    assert mask[2].sum() == 0  # one step, dropped: nothing to write out
    # Nine steps, eight in the chain: the first K one each, the rest joined into the last group.
    assert [group(3, t) for t in range(K)] == ["<<4+1=5>>", "<<5+1=6>>", "<<6+1=7>>"]
    assert group(3, K).replace(" ", "") == "".join(f"<<{4 + i}+1={5 + i}>>" for i in range(3, 8))


def test_with_the_decoder_codis_terms_are_unchanged(family_dir):
    _, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp, decoder, dp = simcot_setup(model_dir)
    codi = methods.get("codi").configure({"num_latent": K})
    (b,) = batches(method, tok, tokens, LONG[:2], 2)
    with_decoder = eval_terms(method, model, params, prj, pp, decoder, dp, b)
    alone = steps.eval_loss_terms(model, params, jnp_arrays(b), method=codi, prefix_len=0, n_latent=K,
                                  parts={"projection": pp}, part_models=(("projection", prj),))
    for k in ("student", "teacher", "distill"):
        np.testing.assert_array_equal(np.asarray(with_decoder[k]), np.asarray(alone[k]))
    assert set(with_decoder) == {"student", "teacher", "distill", "steps"}


@pytest.mark.parametrize("reference_lengths", [False, True])
def test_the_step_term_equals_the_reference(family_dir, tmp_path, reference_lengths):
    """Per batch, the explain term (the mean over non-empty groups of each group's token-mean
    loss, the decoder reading z_{t+1} then the step, positions from 0) within 1e-5 of the
    transliteration, in the intended mode (each row's group at its own length) and with the
    reference's lengths (row 0 sets them)."""
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from tests import codi_reference
    from tests.test_codi import _torch_model, _torch_projection
    family, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp, decoder, dp = simcot_setup(
        model_dir, reference_lengths=reference_lengths)
    tm = _torch_model(config, model, params, tok, str(tmp_path / "merged"))
    tdec = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    records = [LONG[3], LONG[1], LONG[0]]  # row 0 the longest chain, then shorter ones
    if reference_lengths:
        records = [LONG[1], LONG[3], LONG[0]]  # row 0 shorter than row 1: the quirk cuts row 1
    (b,) = batches(method, tok, tokens, records, 3)
    got = eval_terms(method, model, params, prj, pp, decoder, dp, b)
    tb = codi_reference.prepare(records, tok, tokens.vocab, llama_shift=family == "llama")
    groups = [codi_reference.get_steps(row.tolist(), tokens.opens, tokens.close, tok.eos_token_id,
                                       {tok.eos_token_id, tokens.pad}, K + 1) for row in tb["ref"]]
    want = codi_reference.terms(tm, _torch_projection(prj, pp), tb, K,
                                step_decoder=(tdec, groups, tokens.pad, reference_lengths))
    np.testing.assert_allclose(float(got["steps"][0]), want["steps"], rtol=1e-5)
    assert float(got["steps"][1]) == 1.0
    # (The distillation term is test_codi.py's: these answers' digits split differently by token.)
    np.testing.assert_allclose([float(got[k][0] / got[k][1]) for k in ("student", "teacher")],
                               [want["student"], want["teacher"]], rtol=1e-5)


def test_the_step_term_trains_the_decoder_the_projection_and_the_adapters(family_dir):
    """Its gradient reaches every decoder weight, the projection and LoRA's B (A's is 0 while B
    is 0 at the start); the frozen embeddings are not trained at all."""
    from coconut_jax import trainable
    from coconut_jax.models import lora as lora_lib
    _, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp, decoder, dp = simcot_setup(model_dir)
    params = jax.tree_util.tree_map_with_path(  # LoRA's start: B = 0
        lambda path, x: np.zeros_like(x) if path[-1].key == "lora_b" else x, params)
    trained, frozen = trainable.split(jax.tree.map(jnp.asarray, params), lora_lib.trains(model.lora))
    assert "wte" not in trained
    (b,) = batches(method, tok, tokens, LONG[:2], 2)
    arrays = jnp_arrays(b)

    def step_term(t):
        p, prj_p, dec_p = t
        return method.loss_terms(model, trainable.merge(p, frozen), arrays, prefix_len=0, n_latent=K,
                                 parts={"projection": (prj, prj_p), "decoder": (decoder, dec_p)})["steps"][0]
    g_lora, g_prj, g_dec = jax.grad(step_term)((trained, jax.tree.map(jnp.asarray, pp), dp))
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g_dec))
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g_prj))
    layer = g_lora["h"]["0"]
    proj = next(iter(k for k in layer if "lora_b" in layer[k]))
    assert float(jnp.abs(layer[proj]["lora_b"]).sum()) > 0 and float(jnp.abs(layer[proj]["lora_a"]).sum()) == 0


def test_the_references_saved_state_dict_fills_the_decoder(family_dir, tmp_path):
    """`codi.*`, `prj.*` and `decoder.*`: the model and projection as for CODI, the decoder part
    from `decoder.*`."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from coconut_jax import weights
    from tests.test_codi import reference_checkpoint
    family, model_dir = family_dir
    out, module = reference_checkpoint(model_dir, tmp_path / "ref", family)
    decoder = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.01)
    sd = torch.load(out / "pytorch_model.bin")
    sd.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    torch.save(sd, out / "pytorch_model.bin")
    tok = hf.load_tokenizer(model_dir)
    source = weights.source_of(str(out))
    w = weights.load(source, model_dir, "codi_simcot", tok)
    assert set(w.parts) == {"projection", "decoder"}
    parts = weights.part_weights(source, "codi_simcot", model_dir, w.parts)
    _, dec_params = parts["decoder"]
    np.testing.assert_allclose(dec_params["wte"], decoder.get_input_embeddings().weight.detach().numpy(), rtol=0)
    assert methods.get("codi").import_state_dict(sd)[1].keys() == {"projection"}  # plain CODI ignores it


def test_the_chunked_step_term_equals_the_whole(family_dir):
    """`loss_chunk` (a run's default 128) takes the decoder's head a block of rows at a time:
    the same value as all logits at once."""
    _, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp, decoder, dp = simcot_setup(model_dir)
    (b,) = batches(method, tok, tokens, LONG, 4)

    def term(chunk):
        return steps.eval_loss_terms(model, params, jnp_arrays(b), method=method, prefix_len=0, n_latent=K,
                                     loss_chunk=chunk, parts={"projection": pp, "decoder": dp},
                                     part_models=(("decoder", decoder), ("projection", prj)))["steps"][0]
    np.testing.assert_allclose(float(term(1)), float(term(0)), rtol=1e-6)  # 1 x 64 positions: several blocks


def test_a_bad_decoder_rank_is_one_line():
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env
    r = subprocess.run([sys.executable, "-m", "coconut_jax.train", "--config", "configs/gsm_codi_simcot.py",
                        "--config.step_decoder.lora_rank=-1"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: config: step_decoder.lora_rank=-1 must be an integer >= 0 "
                                                  "(0: the decoder trains whole)")


def test_the_decoder_reads_each_thought_bit_equal_to_what_the_student_is_fed(family_dir):
    """SPEC-SIMCOT-CODI §6 check 3: group t's input at index 0 is z_{t+1}, bit for bit the
    thought the student's pass t+1 takes in (both seen inside one program)."""
    from coconut_jax.models.common import FunctionalModel
    _, model_dir = family_dir
    method, tok, tokens, config, model, params, prj, pp, decoder, dp = simcot_setup(model_dir)
    (b,) = batches(method, tok, tokens, LONG[:3], 3)
    seen = {"student": [], "decoder": []}
    body = FunctionalModel.body

    def spy(self, p, embeds, *args, **kw):
        if embeds.shape[1] == 1:  # a thought pass of the student: one position, its thought
            jax.debug.callback(lambda e: seen["student"].append(np.asarray(e)), embeds[:, 0], ordered=True)
        elif self == decoder:  # every group's decoder row: [thought, step tokens]
            jax.debug.callback(lambda e: seen["decoder"].append(np.asarray(e)), embeds[:, 0], ordered=True)
        return body(self, p, embeds, *args, **kw)
    jax.clear_caches()  # trace anew, through the spy
    FunctionalModel.body = spy
    try:
        jax.block_until_ready(jax.jit(lambda p, d: method.loss_terms(
            model, p, jnp_arrays(b), prefix_len=0, n_latent=K, parts={"projection": (prj, pp), "decoder": (decoder, d)}))(
            params, dp))
    finally:
        FunctionalModel.body = body
        jax.clear_caches()
    assert len(seen["student"]) == K and len(seen["decoder"]) == 1
    groups = seen["decoder"][0].reshape(3, K + 1, -1)  # [rows, groups = z_1 .. z_{K+1}, E]
    for t in range(K):
        np.testing.assert_array_equal(groups[:, t], seen["student"][t].astype(groups.dtype))
