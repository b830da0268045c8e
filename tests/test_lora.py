"""LoRA: our forward with adapters against PEFT's PyTorch model on a tiny model of each family,
and through the real run (frozen base, what a checkpoint holds, a resume onto another base)."""
import json
import os

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint, config as config_lib, hf, latent_vocab, models, peft_format, tiny, trainable, weights
from coconut_jax.models import lora as lora_lib
from tests.conftest import LORA, ROOT, SAMPLE_RECORDS, built_once, run_cli, config_and_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# (family, tied head): GPT-2 (fused c_attn, Conv1D), Llama with its own head, Qwen2 and Qwen3 tied.
FAMILIES = [("gpt2", True), ("llama", False), ("qwen2", True), ("qwen3", False)]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def family_model(request, tmp_path_factory):
    family, tied = request.param

    def build(path):
        tiny.build(tiny.record_texts(SAMPLE_RECORDS) * 20, str(path / "m"), vocab_size=300, n_layer=2, n_embd=32,
                   n_head=4, n_positions=64, family=family, tied=tied, seed=2)
    d = str(built_once(tmp_path_factory, f"lora_{family}", build) / "m")
    tok = hf.load_tokenizer(d)
    config, base = hf.load_pretrained(d)
    config, base = latent_vocab.add_latent_rows(config, base, tok)
    return d, tok, config, base


def _trained_adapters(config, base, tok, train_embeddings: bool):
    """A LoRA model of `config` with adapters and trained rows that are not at their start
    (B != 0, token rows moved), as after training."""
    t = latent_vocab.latent_tokens(tok)
    family = models.family(getattr(config, "model_type", "gpt2"))
    lora = lora_lib.Lora(rank=4, alpha=8.0, targets=lora_lib.resolve_targets(family, ()),
                         token_ids=(t.start, t.end, t.latent), train_embeddings=train_embeddings)
    model = models.build(config, lora=lora)
    params = lora_lib.attach(model, base, seed=3)
    rng = np.random.default_rng(0)
    moved = ("lora_b", "token_rows") + (("wte", "lm_head") if train_embeddings else ())
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + np.float32(0.05) * rng.standard_normal(x.shape).astype(np.float32)
        if set(trainable.names(p)) & set(moved) else x, params)
    return model, params


def _ours(model, params, ids):
    h, _ = model.body(params, model.embed(params, ids), np.arange(ids.shape[1])[None], np.ones_like(ids))
    return np.asarray(model.logits(params, h))


def _ids(v):
    return np.array([[1, 5, v - 3, 9, v - 1, 12, v - 1, v - 2, 4, 7]])


@pytest.mark.parametrize("train_embeddings", [False, True], ids=["token_rows", "modules_to_save"])
def test_adapters_match_peft_and_the_merged_model(family_model, train_embeddings, tmp_path):
    """Our forward with adapters == PEFT's model with the adapters we export, loaded onto the
    base resized to the tokenizer (as a user loads it from the hub); == the merged model."""
    d, tok, config, base = family_model
    model, params = _trained_adapters(config, base, tok, train_embeddings)
    ids = _ids(config.vocab_size)
    ours = _ours(model, params, ids)
    out = tmp_path / "adapters"
    out.mkdir()
    peft_format.write(model, params, str(out), d)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
    theirs_base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    theirs_base.resize_token_embeddings(len(tok))
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(out)).eval()
    with torch.no_grad():
        got = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-5, rtol=0)
    merged = lora_lib.merged(model, params)
    np.testing.assert_allclose(_ours(models.build(config), merged, ids), ours, atol=1e-5, rtol=0)


def test_fresh_adapters_leave_the_model_unchanged(family_model):
    d, tok, config, base = family_model
    model = models.build(config, lora=lora_lib.Lora(4, 8.0, lora_lib.resolve_targets(type(models.build(config)), ()),
                                                     token_ids=(1, 2)))
    ids = _ids(config.vocab_size)
    # B = 0: the adapters add exact zeros (XLA may fuse the sums differently: rounding only).
    np.testing.assert_allclose(_ours(model, lora_lib.attach(model, base), ids), _ours(models.build(config), base, ids),
                               atol=1e-6, rtol=0)


def test_targets_take_peft_module_names_and_refuse_unknown_ones():
    gpt2, llama = models.family("gpt2"), models.family("llama")
    assert lora_lib.resolve_targets(gpt2, ("c_proj",)) == ("attn_proj", "mlp_proj")
    assert lora_lib.resolve_targets(llama, ("q_proj", "v_proj")) == ("q", "v")
    assert lora_lib.resolve_targets(llama, ()) == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(ValueError, match="'qkv' is not a projection of this model"):
        lora_lib.resolve_targets(llama, ("qkv",))


def test_adapter_dropout_is_on_in_training_and_off_in_evaluation(family_model):
    """Evaluation (no key) equals the no-dropout form computed another way (the adapters merged
    into a plain model's kernels); a training forward (a key) differs from it."""
    d, tok, config, base = family_model
    targets = lora_lib.resolve_targets(type(models.build(config)), ())
    model = models.build(config, lora=lora_lib.Lora(4, 8.0, 0.5, targets))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if trainable.names(p)[-1] == "lora_b" else x, lora_lib.attach(model, base))
    ids = _ids(config.vocab_size - 3)
    embeds, pos, mask = model.embed(params, ids), np.arange(ids.shape[1])[None], np.ones_like(ids)
    evaluation = np.asarray(model.body(params, embeds, pos, mask)[0])
    training = np.asarray(model.body(params, embeds, pos, mask, dropout_key=jax.random.key(0))[0])
    plain, merged = models.build(config), lora_lib.merged(model, params)
    no_dropout = np.asarray(plain.body(merged, plain.embed(merged, ids), pos, mask)[0])
    np.testing.assert_allclose(evaluation, no_dropout, atol=1e-5, rtol=0)
    assert np.abs(training - evaluation).max() > 1e-3


# -- through the run ------------------------------------------------------------------------

def _leaves(tree):
    return {"/".join(trainable.names(p)): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_a_lora_checkpoint_holds_what_trains_and_names_its_base(lora_run):
    ckpt = str(lora_run / "checkpoints")
    last = checkpoint.steps(ckpt)[-1]
    stored = _leaves(checkpoint.load_params(ckpt, last))
    assert stored and all(k.endswith(("lora_a", "lora_b")) or k == "token_rows" for k in stored), sorted(stored)
    assert {k.split("/")[-2] for k in stored if k != "token_rows"} == {"c_attn", "attn_proj", "c_fc", "mlp_proj"}
    assert any(np.abs(v).max() > 0 for k, v in stored.items() if k.endswith("lora_b"))
    # No moments for the base: the optimizer state holds the trained leaves only.
    opt = checkpoint.stored_arrays(ckpt, last)
    assert not [k for k in opt if k.startswith("opt_state") and k.endswith(("kernel", "wte", "wpe", "scale", "bias"))]
    meta = checkpoint.read_meta(ckpt, last)
    assert meta["lora"]["rank"] == 4 and meta["base"]["source"]["kind"] == "model"
    # The recorded digest is the base's as the run built it (pretrained + latent rows).
    model_dir = str(lora_run / "prepared" / "model")
    tok = hf.load_tokenizer(model_dir)
    _, base = config_and_params(weights.load(weights.Source("model"), model_dir, "coconut", tok))
    assert meta["base"]["digest"] == lora_lib.digest(base)
    # The token rows trained away from their start (the row of `<<`).
    assert not np.array_equal(stored["token_rows"], np.asarray(base["wte"])[-3:])


@pytest.mark.slow
def test_the_base_stays_bit_identical_through_training(tmp_path):
    from coconut_jax.train import run_config
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.update(dict(save_path=str(tmp_path), cache_dir=str(tmp_path / "cache"), num_epochs=2, lr=1e-2))
    c.lora.rank = 4
    run, _ = run_config(c)
    _, base = config_and_params(weights.load(weights.Source("model"), run.c.model_id, "coconut", run.tok))
    frozen = _leaves(run.state.frozen)
    assert set(frozen) == set(_leaves(base))
    for k, x in _leaves(base).items():
        np.testing.assert_array_equal(frozen[k], x, err_msg=k)
    trained = _leaves(trainable.split(run.state.params, lora_lib.trains(run.model.lora))[0])
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("lora_b"))


@pytest.mark.slow
def test_resuming_onto_another_base_is_a_one_line_error(lora_run, tmp_path):
    import shutil
    run = tmp_path / "tiny"
    shutil.copytree(lora_run, run)
    model_dir = str(run / "prepared" / "model")
    config, params = hf.load_pretrained(model_dir)
    params["ln_f"]["bias"] = params["ln_f"]["bias"] + 1.0
    hf.export_hf(config, params, model_dir, tokenizer=hf.load_tokenizer(model_dir), overwrite=True)
    r = run_cli(tmp_path, *LORA, "--config.checkpoint_every_steps=2", "--config.num_epochs=4", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "trained on another base" in last and "digest" in last, r.stderr[-2000:]


@pytest.mark.slow
def test_a_lora_run_killed_mid_epoch_resumes_exactly(lora_run, tmp_path):
    """SIGKILL after a mid-epoch checkpoint, then the same command: the base is rebuilt from its
    source, and the run logs what the uninterrupted one logged and ends with bit-identical
    adapters, token rows and optimizer state."""
    from tests.test_journeys import assert_same_run, kill_at_checkpoint
    args = (*LORA, "--config.checkpoint_every_steps=2")
    proc = run_cli(tmp_path, *args, popen=True)
    kill_at_checkpoint(proc, tmp_path / "tiny", 6, "a mid-epoch checkpoint of the second epoch")
    r = run_cli(tmp_path, *args)
    assert "resumed from" in r.stdout
    assert_same_run(lora_run, tmp_path / "tiny")
    ref, got = str(lora_run / "checkpoints"), str(tmp_path / "tiny" / "checkpoints")
    last = checkpoint.steps(ref)[-1]
    a = checkpoint.stored_arrays(ref, last)
    assert a == checkpoint.stored_arrays(got, last)
    assert checkpoint.read_meta(ref, last)["fingerprint"] == checkpoint.read_meta(got, last)["fingerprint"]


@pytest.mark.slow
def test_a_lora_run_on_8_devices_equals_one(lora_run, tmp_path):
    from coconut_jax.metrics import read_metrics
    run_cli(tmp_path, *LORA, "--config.checkpoint_every_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=4",
            devices=8)
    ref, got = (read_metrics(str(d / "metrics.jsonl")) for d in (lora_run, tmp_path / "tiny"))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for k in ("train/loss", "eval/loss", "eval/acc"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a, b)
    last = checkpoint.steps(str(lora_run / "checkpoints"))[-1]
    for k, x in _leaves(checkpoint.load_params(str(lora_run / "checkpoints"), last)).items():
        y = _leaves(checkpoint.load_params(str(tmp_path / "tiny" / "checkpoints"), last))[k]
        np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-3, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cot", "simcot"])
def test_lora_combines_with_other_methods(method, tmp_path):
    """A method without latent tokens trains adapters alone; SIM-CoT trains its decoder whole
    beside the base's adapters, and both resume from the checkpoint."""
    run_cli(tmp_path, *LORA, f"--config.method={method}", "--config.num_epochs=2")
    ckpt = str(tmp_path / "tiny" / "checkpoints")
    last = checkpoint.steps(ckpt)[-1]
    stored = _leaves(checkpoint.load_params(ckpt, last))
    assert all(k.endswith(("lora_a", "lora_b")) for k in stored) == (method == "cot")
    assert ("token_rows" in stored) == (method != "cot")
    if method == "simcot":
        decoder = _leaves(checkpoint.load_params(ckpt, last, item="parts"))
        assert "decoder/wte" in decoder and not any("lora" in k for k in decoder)
    r = run_cli(tmp_path, *LORA, f"--config.method={method}", "--config.num_epochs=3")
    assert "resumed from" in r.stdout
