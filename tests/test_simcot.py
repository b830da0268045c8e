"""SIM-CoT (method=simcot): its step targets, its loss against a slow PyTorch reference written
from SPEC-SIMCOT.md, and its gradients against a slow JAX form."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coconut_jax import coconut, config as config_lib, data, hf, latent_vocab, methods, sharding, steps, testing, trainable
from coconut_jax.data.step_targets import StepIds, StepTargets
from coconut_jax.labels import IGNORE
from coconut_jax.methods.simcot import step_nll
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
from data_prep.common import write_json
from tests.conftest import ROOT, built_once


def gsm_like(n, seed):
    """GSM8K-Aug-shaped records: 1-4 steps, each one `<<expr=result>>` string."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x, steps = int(rng.integers(1, 9)), []
        for _ in range(int(rng.integers(1, 5))):
            y = int(rng.integers(1, 9))
            steps.append(f"<<{x}+{y}={x + y}>>")
            x += y
        out.append({"question": f"Sam has {steps[0][2]} pens and gets more, step by step. How many?",
                    "steps": steps, "answer": str(x)})
    return out


def _build(root):
    from coconut_jax import tiny
    train, valid = gsm_like(40, 0), gsm_like(10, 1)
    write_json(train, str(root / "train.json"))
    write_json(valid, str(root / "valid.json"))
    tiny.build(tiny.record_texts(train + valid) * 4, str(root / "model"), vocab_size=300, n_layer=2, n_embd=32,
               n_head=2, n_positions=256, seed=0)


@pytest.fixture(scope="module")
def gsm_world(tmp_path_factory):
    root = built_once(tmp_path_factory, "simcot_world", _build)
    return {"train": str(root / "train.json"), "valid": str(root / "valid.json"), "model": str(root / "model")}


# -- step targets ---------------------------------------------------------------------------------

IDS = StepIds(open=1, close=2, newline=3, merged=None, eos=9)


def _targets(rule, mls=3):
    return StepTargets(rule, IDS, max_latent_stage=mls, thoughts_per_step=2)


def test_bracket_groups_filler_and_merge_literally():
    """SPEC-SIMCOT §2 on ids: `<<`=1, `>>`=2, newline=3, eos=9."""
    t = _targets("brackets", mls=3)
    steps = [[1, 5, 6, 2, 3], [7, 1, 8, 2, 3], [1, 4, 2, 3], [1, 6, 2, 3]]
    # Stage 2 of a 4-step record: two replaced steps, two groups; tokens outside <<...>> dropped.
    assert t.groups(steps[:2], filler=[1, 4, 2, 3, 1, 6, 2, 3, 11], n_groups=2) == [[1, 5, 6, 2, 9], [1, 8, 2, 9]]
    # Fewer groups than max_latent_stage: the filler (what follows the thoughts up to eos) fills.
    assert t.groups(steps[:1], filler=[11, 12], n_groups=3) == [[1, 5, 6, 2, 9], [11, 12, 9], [11, 12, 9]]
    # Final stage: groups from max_latent_stage on are merged, a newline between `>>` and `<<`.
    assert t.groups(steps, filler=[11], n_groups=3) == [[1, 5, 6, 2, 9], [1, 8, 2, 9], [1, 4, 2, 3, 1, 6, 2, 9]]
    # A group that runs to the end loses its trailing id-0 tokens, as the reference's padding strip does.
    assert t.groups([[1, 5, 0, 0]], filler=[], n_groups=1) == [[1, 5, 9]]
    # No thoughts, no targets.
    assert t.groups(steps, filler=[11], n_groups=0) == []


def test_steps_rule_and_brackets_agree_on_single_bracket_steps(gsm_world):
    tok = hf.load_tokenizer(gsm_world["model"])
    ids = data.step_ids(tok)
    assert None not in (ids.open, ids.close, ids.newline)
    records = data.load_records(gsm_world["train"])
    ts = data.tokenize_records(records, tok)
    for rule_a, rule_b in (("brackets", "steps"),):
        a, b = StepTargets(rule_a, ids, 3, 2), StepTargets(rule_b, ids, 3, 2)
        checked = 0
        for ex in ts:
            for k in range(len(ex.steps) + 1):
                replaced = [list(s) for s in ex.steps[:k]]
                filler = [t for s in ex.steps[k:] for t in s] + list(ex.answer[:-1])
                for n_groups in range(1, 4):
                    assert a.groups(replaced, filler, n_groups) == b.groups(replaced, filler, n_groups)
                    checked += 1
        assert checked > 100
    # And a replaced step reads back as its text.
    ex = ts[0]
    got = a.groups([list(ex.steps[0])], [], 1)[0]
    assert tok.decode(got[:-1]) == records[0]["steps"][0] and got[-1] == tok.eos_token_id


def test_brackets_on_data_without_brackets_is_one_line(gsm_world, tmp_path):
    """ProsQA-style steps hold no <<...>>: the brackets rule would supervise nothing. (The CLI
    prints a DataError as this one line and exits 2.)"""
    from coconut_jax.train import set_up
    records = [{"question": f"Is Alex a wumpus {i}?", "steps": ["Alex is a yumpus.", "Every yumpus is a wumpus."],
                "answer": "Alex is a wumpus."} for i in range(8)]
    path = str(tmp_path / "plain.json")
    write_json(records, path)
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "gsm_simcot.py"))
    c.update(dict(train_path=path, val_path=path, model_id=gsm_world["model"], load_model_path=None,
                  save_path=str(tmp_path), cache_dir=str(tmp_path / "c"), global_batch_size=8))
    with pytest.raises(data.DataError) as e:
        set_up(c)
    assert str(e.value) == (f"{path}: no step holds a <<...>> group, so step_groups='brackets' (the reference's "
                            f"parse) finds nothing to supervise; set --config.step_groups=steps")


def test_epoch_plan_batches_carry_fixed_shape_step_targets(gsm_world):
    tok = hf.load_tokenizer(gsm_world["model"])
    tokens = latent_vocab.latent_tokens(tok) if tok.convert_tokens_to_ids(latent_vocab.LATENT) else None
    _, examples = data.load_dataset(gsm_world["train"], tok, None, None)
    cur = methods.Curriculum("simcot", c_thought=2, max_latent_stage=3, epochs_per_stage=1)
    targets = StepTargets("brackets", data.step_ids(tok), 3, 2)
    settings = data.PlanSettings(seed=0, batch_size=8, multiple=8, static_shapes=True, step_targets=targets)
    plan = data.EpochPlan(examples, cur, tokens or _fake_latents(tok), 2, 0, settings)
    shapes = {b.extras["step_ids"].shape for b in plan.batches()}
    assert len(shapes) == 1 and next(iter(shapes))[:2] == (8, 2) and next(iter(shapes))[2] % 8 == 0
    b = plan.batch(0)
    assert b.n_latent == 4
    for r, i in enumerate(b.indices):
        if i < 0:
            assert not b.extras["step_mask"][r].any()
            continue
        ex = examples[int(i)]
        for t in range(2):
            m = b.extras["step_mask"][r, t].astype(bool)
            got = b.extras["step_ids"][r, t][m].tolist()
            assert got[-1] == tok.eos_token_id
            if t < len(ex.steps):  # the replaced step itself, else the filler (the answer)
                assert tok.decode(got[:-1]) == tok.decode(list(ex.steps[t])).strip()
            else:
                assert tok.decode(got[:-1]) == tok.decode(list(ex.answer[:-1]))


def _fake_latents(tok):
    v = len(tok)
    return latent_vocab.LatentTokens(v, v + 1, v + 2, tok.eos_token_id, tok.pad_token_id)


# -- the loss against a slow PyTorch reference (SPEC-SIMCOT §2-3, transliterated) ---------------------

def _reference_groups(flat, input_ids, c, n_groups, ids, mls, end_latent, eos):
    """coconut.py 521-632 for one row, as written there (with its -570 placeholders)."""
    start, end, sep = ids.open, ids.close, ids.newline
    groups, i = [], 0
    while i < len(flat):
        if flat[i] == start:
            group = [start]
            i += 1
            while i < len(flat):
                group.append(flat[i])
                if flat[i] == end:
                    break
                i += 1
            while group and group[-1] == 0:
                group.pop()
            groups.append(group)
        else:
            i += 1
    if len(groups) < mls:
        s = len(input_ids) - 1 - input_ids[::-1].index(end_latent)
        e = input_ids.index(eos, s + 1) if eos in input_ids[s + 1:] else len(input_ids)
        pseudo = input_ids[s + 1:e]
        while len(groups) < n_groups:
            groups.append(pseudo)
    united, combined = [], []
    for k, group in enumerate(groups, 1):
        if k <= mls - 1:
            united.append([-570] * c + group + [eos])
        else:
            if combined and combined[-1] == end and group[0] == start:
                combined.append(sep)
            combined.extend(group)
    if combined:
        united.append([-570] * c + combined + [eos])
    return [u + [eos] for u in united]  # padded to the longest + 1 (one row: one eos)


def _torch_model(config, params):
    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel
    m = GPT2LMHeadModel(HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"}))
    m.load_state_dict({k: torch.tensor(v) for k, v in hf.params_to_state_dict(params, config).items()}, strict=False)
    m.tie_weights()
    return m.eval()


def reference_terms(base, decoder, examples, stage, c, mls, tokens, ids):
    """(LM NLL sum, LM token count, step NLL sum, number of (question, group) pairs) of the
    reference forward, one question at a time."""
    import torch
    lm_sum = lm_n = st_sum = st_n = 0.0
    ce = torch.nn.CrossEntropyLoss(reduction="sum")
    wte = base.get_input_embeddings()
    for ex in examples:
        n = len(ex.steps)
        dropped, latent = (n, mls) if stage > mls else (min(stage, n), stage)
        head = list(ex.question) + [tokens.start] + [tokens.latent] * (latent * c) + [tokens.end]
        tail = [t for s in ex.steps[dropped:] for t in s] + list(ex.answer)
        input_ids = head + tail
        labels = torch.tensor([IGNORE] * len(head) + tail)
        ids_t = torch.tensor([input_ids])
        pos = torch.arange(len(input_ids))[None]
        with torch.no_grad():
            embeds = wte(ids_t)
            lat = [i for i, t in enumerate(input_ids) if t == tokens.latent]
            for k in range(len(lat)):
                h = base.transformer(inputs_embeds=embeds, position_ids=pos).last_hidden_state
                embeds[0, lat[k]] = h[0, lat[k] - 1]
            logits = base(inputs_embeds=embeds, position_ids=pos).logits[0]
            lm_sum += float(ce(logits[:-1], labels[1:]))
            lm_n += float((labels[1:] != IGNORE).sum())
            n_groups = len(lat) // c
            flat = [t for s in ex.steps[:dropped] for t in s]
            united = _reference_groups(flat, input_ids, c, n_groups, ids, mls, tokens.end, tokens.eos)
            for t in range(n_groups):
                seq = united[t]
                x = torch.cat([embeds[0, lat[c * t:c * t + c]], wte(torch.tensor(seq[c:]))])[None]
                eos_at = seq.index(tokens.eos)
                mask = torch.zeros(len(seq), dtype=torch.long)
                mask[:eos_at + 1] = 1
                y = torch.tensor(seq)
                keep = (y != -570) & (y != tokens.eos)
                keep[eos_at] = True
                y[~keep] = IGNORE
                out = decoder(inputs_embeds=x, attention_mask=mask[None],
                              position_ids=torch.arange(1, len(seq) + 1)[None]).logits[0]
                st_sum += float(ce(out[:-1], y[1:]))
                st_n += 1.0
    return lm_sum, lm_n, st_sum, st_n


@pytest.mark.slow  # three evaluations and a PyTorch forward per question
@pytest.mark.parametrize("stage", [1, 2, 9])
def test_eval_terms_equal_the_reference_forward(gsm_world, tmp_path, stage):
    """only_eval with only_eval_loss: eval/lm, eval/steps and eval/loss of a Coconut checkpoint (the
    reference's `base_causallm.` file) with the decoder from model_id's pretrained weights, against
    the slow PyTorch forward of SPEC-SIMCOT §3 (`resume` 9 > max_latent_stage 3: the final stage,
    where groups past the third are merged)."""
    import torch
    from coconut_jax.train import run_config
    config, pretrained = hf.load_pretrained(gsm_world["model"])
    tok = hf.load_tokenizer(gsm_world["model"])
    tokens = latent_vocab.latent_tokens(tok)
    base_config, base = latent_vocab.add_latent_rows(config, pretrained, tok)
    rng = np.random.default_rng(3)  # a base unlike the decoder
    base = jax.tree.map(lambda x: np.asarray(x, np.float32) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32),
                        base)
    path = str(tmp_path / "checkpoint_6")
    torch.save({"base_causallm." + k: torch.tensor(v) for k, v in hf.params_to_state_dict(base, base_config).items()},
               path)
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "gsm_simcot_eval.py"))
    c.update(dict(model_id=gsm_world["model"], load_model_path=path, val_path=gsm_world["valid"],
                  train_path=gsm_world["train"], max_latent_stage=3, resume=stage * 3, only_eval_loss=True,
                  global_batch_size=4, eval_batch_size=4, max_new_tokens=4, print_examples=0,
                  save_path=str(tmp_path), cache_dir=str(tmp_path / "cache"), wandb_mode="disabled"))
    _, result = run_config(c)
    _, examples = data.load_dataset(gsm_world["valid"], tok, None, None)
    lm_sum, lm_n, st_sum, st_n = reference_terms(_torch_model(base_config, base), _torch_model(config, pretrained),
                                                 examples, stage, 2, 3, tokens, data.step_ids(tok))
    assert st_n == len(examples) * min(stage, 3)
    for got, want in ((result["eval/lm"], lm_sum / lm_n), (result["eval/steps"], st_sum / st_n),
                      (result["eval/loss"], lm_sum / lm_n + st_sum / st_n)):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    assert result["eval/steps"] > 1.0  # the decoder is asked something it cannot yet say


# -- gradients: the batched loss against a slow per-row, per-group JAX form -----------------------

def _slow_step_nll(model, params, decoder, dparams, arrays):
    """Thoughts found per row from latent_mask (no alignment assumed), one group at a time."""
    hidden = testing.reference_hidden(model, params, arrays)
    latent = np.asarray(arrays["latent_mask"])
    ids, mask = np.asarray(arrays["step_ids"]), np.asarray(arrays["step_mask"])
    total, count = 0.0, 0
    for r in range(ids.shape[0]):
        where = np.nonzero(latent[r])[0]
        for t in range(ids.shape[1]):
            m = mask[r, t].astype(bool)
            if not m.any():
                continue
            c = len(where) // ids.shape[1]
            thoughts = hidden[r, where[c * t:c * t + c] - 1]
            target = ids[r, t][m]
            x = jnp.concatenate([thoughts, model.embed(params, target)])[None]
            pos = jnp.arange(1, len(target) + c + 1)[None]
            h, _ = decoder.body(dparams, x, pos, jnp.ones_like(pos))
            labels = jnp.concatenate([jnp.full(c, IGNORE), jnp.asarray(target)])[None]
            s, _ = coconut.token_nll(decoder.logits(dparams, h), labels)
            total, count = total + s, count + 1
    return total, count


def _simcot_world(gsm_world, base_layers: int):
    """(tokenizer, training examples, latent tokens, a base of `base_layers` layers with the
    latent rows, a 1-layer decoder at the tokenizer's vocabulary, the curriculum) on gsm_world."""
    tok = hf.load_tokenizer(gsm_world["model"])
    _, examples = data.load_dataset(gsm_world["train"], tok, None, None)
    v = len(tok)
    tokens = latent_vocab.LatentTokens(v, v + 1, v + 2, tok.eos_token_id, tok.pad_token_id)
    model = GPT2Model(GPT2Config(vocab_size=v + 3, n_positions=256, n_embd=32, n_layer=base_layers, n_head=2))
    decoder = GPT2Model(GPT2Config(vocab_size=v, n_positions=256, n_embd=32, n_layer=1, n_head=2))
    cur = methods.Curriculum("simcot", c_thought=2, max_latent_stage=3, epochs_per_stage=1)
    return tok, examples, tokens, model, decoder, cur


@pytest.mark.slow  # 90 s of slow per-row, per-group gradients on 2 cores
def test_fast_step_loss_and_gradients_equal_the_slow_form(gsm_world):
    tok, examples, tokens, model, decoder, cur = _simcot_world(gsm_world, base_layers=2)
    params, dparams = model.init(0), decoder.init(1)
    settings = data.PlanSettings(seed=0, batch_size=6, multiple=8, step_targets=StepTargets(
        "brackets", data.step_ids(tok), 3, 2))
    b = data.EpochPlan(examples, cur, tokens, 9, 0, settings).batch(0)
    arrays = {k: jnp.asarray(x) for k, x in b.arrays().items()}

    def fast(p, d):
        hidden = coconut.latent_forward(model, p, arrays, b.prefix_len, b.n_latent)
        return step_nll(model, p, decoder, d, hidden, arrays, b.prefix_len, b.n_latent)[0]

    def slow(p, d):
        return _slow_step_nll(model, p, decoder, d, arrays)[0]
    (f, fg), (s, sg) = jax.value_and_grad(fast, (0, 1))(params, dparams), jax.value_and_grad(slow, (0, 1))(params, dparams)
    assert abs(float(f) - float(s)) <= 1e-5 * abs(float(s))
    _, n = step_nll(model, params, decoder, dparams, testing.reference_hidden(model, params, arrays), arrays,
                    b.prefix_len, b.n_latent)
    assert float(n) == _slow_step_nll(model, params, decoder, dparams, arrays)[1] == 6 * 3
    for a, e in zip(jax.tree.leaves(fg), jax.tree.leaves(sg)):
        a, e = np.asarray(a), np.asarray(e)
        assert np.abs(a - e).max() <= 1e-5 * max(np.abs(e).max(), 1e-6)
    # The step loss reaches the base through the thoughts and its word embedding.
    assert np.abs(np.asarray(fg[0]["h"]["0"]["c_fc"]["kernel"])).max() > 0
    assert np.abs(np.asarray(fg[0]["wte"])).max() > 0


def test_simcot_is_registered_with_its_decoder_and_two_terms():
    m = methods.get("simcot")
    assert m.latent_tokens and m.feedback and m.step_targets
    assert [p.name for p in m.parts] == ["decoder"] and m.loss == (("lm", 1.0), ("steps", 1.0))
    assert m.summary


SIMCOT_YAML = """\
project: coconut
save_path: ./ckpts
name: gsm_coconut_simcot
only_eval: False
coconut: True
cot: False
no_thoughts: False
no_cot: False
coconutgpt: True
c_thought: 2
epochs_per_stage: 3
max_latent_stage: 5
pad_latent_to_max: True
save_only_improve: False
uniform_prob: 0.0
model_id: ./pretrained/gpt2
load_model_path: ./ckpts/gsm-coconut/checkpoint_24
wandb: False
seed: 0
resume: 3
bf16: False
train_path: ./data/gsm_train.json
val_path: ./data/gsm_test.json
reset_optimizer: True
batch_size_training: 8
debug: False
gradient_accumulation_steps: 1
num_epochs: 35
lr: !!float "1e-4"
weight_decay: 0.01
w_prompt: False
mode: coconutgpt_same_word_embedding
explain_mode: v1_aug
training_method: full
"""


def test_the_simcot_repositorys_yaml_reads_as_method_simcot(tmp_path):
    """Its `gsm_simcot.yaml` (SPEC-SIMCOT §5): SIM-CoT on 8 GPUs of 8 rows, brackets."""
    path = tmp_path / "gsm_simcot.yaml"
    path.write_text(SIMCOT_YAML)
    c = config_lib.from_reference_yaml(str(path))
    assert (c.method, c.step_groups, c.global_batch_size) == ("simcot", "brackets", 64)
    assert (c.c_thought, c.epochs_per_stage, c.max_latent_stage, c.resume, c.num_epochs) == (2, 3, 5, 3, 35)
    path.write_text(SIMCOT_YAML.replace("training_method: full", "training_method: only_expainable_llm"))
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.from_reference_yaml(str(path))
    assert str(e.value) == (f"{path}: SIM-CoT setting(s) training_method='only_expainable_llm' not supported "
                            f"(method=simcot implements explain_mode v1_aug, mode coconutgpt_same_word_embedding, "
                            f"training_method full on Coconut)")


@pytest.mark.slow  # two short training runs
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_simcot_trains_on_llama_and_qwen(tmp_path, family):
    """The decoder is the same family's starting model: a tiny Llama / Qwen through the tiny config."""
    from coconut_jax.metrics import read_metrics
    from coconut_jax.train import run_config
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.update(dict(method="simcot", num_epochs=2, save_path=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    c.prepare.family = family
    run, result = run_config(c)
    assert dict(run.state.part_models)["decoder"].config.vocab_size < run.model.config.vocab_size
    m = [e for e in read_metrics(os.path.join(run.run_dir, "metrics.jsonl")) if "train/steps" in e]
    assert any(e["stage"] == 1 and e["train/steps"] > 0 for e in m)
    assert np.isfinite(result["eval/steps"]) and result["eval/steps"] > 0


@pytest.mark.slow  # 30 s: six programs compiled (three shapes, two forms)
def test_one_backward_pass_gives_the_per_term_gradient(gsm_world):
    """SIM-CoT's step over three micro-batches whose token and step-group counts differ: one
    backward pass with each term's cotangent weighed by the step's counts gives the gradient,
    the terms and the objective of a backward pass per term (within 1e-6), with one gradient
    tree where there was one per term."""
    from tests.step_checks import assert_same_gradient
    tok, examples, tokens, model, decoder, cur = _simcot_world(gsm_world, base_layers=1)
    targets = StepTargets("brackets", data.step_ids(tok), 3, 2)
    # Micro-batches of 2, 3 and 4 rows (the last ragged ones of a step are so): unequal counts.
    batches = [data.EpochPlan(examples, cur, tokens, 2, 0, data.PlanSettings(
        seed=0, batch_size=rows, multiple=8, step_targets=targets)).batch(k) for k, rows in enumerate((2, 3, 4))]
    micro = [({k: jnp.asarray(x) for k, x in b.arrays().items()}, b.prefix_len, b.n_latent) for b in batches]
    counts = [methods.get("simcot").term_counts(a, prefix_len=p, n_latent=n) for a, p, n in micro]
    assert len({float(c["lm"]) for c in counts}) > 1 and len({float(c["steps"]) for c in counts}) > 1, counts
    trained = trainable.pack(model.init(0), {"decoder": decoder.init(1)})
    terms = assert_same_gradient(methods.get("simcot"), model, trained, micro, part_models=(("decoder", decoder),))
    assert float(terms["steps"]) > 0
    layout = steps.Layout(model, sharding.make_mesh(), optax.adamw(1e-3), loss=methods.get("simcot").loss,
                          part_models=(("decoder", decoder),))
    assert jax.tree.structure(layout.acc["grads"]) == jax.tree.structure(layout.trained)
