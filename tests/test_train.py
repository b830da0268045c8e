"""The training CLI: configs, accumulation, exact resume, sharding, only_eval."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coconut_jax import config as config_lib, data, methods, optimizer, sharding, steps
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
from coconut_jax.metrics import read_metrics as metrics
from tests.conftest import ROOT, run_cli, subprocess_env


def test_compilation_cache_dir_precedence(monkeypatch):
    c = config_lib.base_config()
    c.cache_dir = "/c"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert config_lib.compilation_cache_dir(c) == "/c/xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/env")
    assert config_lib.compilation_cache_dir(c) == "/env"
    c.compilation_cache_dir = "/mine"
    assert config_lib.compilation_cache_dir(c) == "/mine"
    c.compilation_cache_dir = "none"
    assert config_lib.compilation_cache_dir(c) is None


def test_training_learns_and_logs(tiny_run):
    m = metrics(os.path.join(tiny_run, "metrics.jsonl"))
    train_losses = [e["train/loss"] for e in m if "train/loss" in e]
    evals = [e for e in m if "eval/loss" in e]
    assert len(evals) == 3 and [e["stage"] for e in evals] == [0, 1, 2]
    assert train_losses[-1] < train_losses[0]
    for e in m:
        assert {"step", "epoch", "stage"} <= set(e)
    preds = [json.loads(line) for line in open(os.path.join(tiny_run, "predictions_epoch3.jsonl"))]
    assert len(preds) == 8 and set(preds[0]) == {"index", "text", "answer", "gold", "correct", "cot_match", "new_tokens", "thoughts"}


def test_only_eval_reproduces_the_final_evaluation(tiny_run, tmp_path):
    last = max(int(n) for n in os.listdir(os.path.join(tiny_run, "checkpoints")) if n.isdigit())
    run_cli(tmp_path, "--config.only_eval=True", "--config.resume=2", "--config.only_eval_loss=True",
            f"--config.load_model_path={tiny_run}/checkpoints/{last}",
            "--config.prepare.kind=", f"--config.val_path={tiny_run}/prepared/prosqa_valid.json",
            f"--config.model_id={tiny_run}/prepared/model")
    final = [e for e in metrics(os.path.join(tiny_run, "metrics.jsonl")) if "eval/acc" in e][-1]
    again = metrics(tmp_path / "tiny" / "metrics.jsonl")[-1]
    for k in ("eval/acc", "eval/cot_em", "eval/loss", "stage"):
        assert again[k] == pytest.approx(final[k], abs=1e-6), k
    texts = lambda p: [json.loads(line)["text"] for line in open(p)]
    assert texts(tmp_path / "tiny" / "predictions_epoch3.jsonl") == texts(os.path.join(tiny_run, "predictions_epoch3.jsonl"))


def test_gradient_accumulation_equals_full_batch():
    """The trainer's accumulation over micro-batches of unequal token counts gives the gradient
    and loss of the full batch (token-weighted), compared before any optimizer step."""
    cfg = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = GPT2Model(cfg)
    params = model.init(0)
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(8):
        ids = rng.integers(1, 37, size=4 + i).tolist() + [37] + [39] * (i % 3) + [38] + rng.integers(1, 37, size=3 + i % 4).tolist()
        lab = [data.IGNORE] * (ids.index(38) + 1) + ids[ids.index(38) + 1:]
        seqs.append((ids, lab))
    batch = lambda rows: data.collate([seqs[i] for i in rows], rows, latent_id=39, pad_id=0, batch_size=len(rows), multiple=4)
    mesh = sharding.make_mesh()
    state = steps.TrainState(model, params, mesh, optimizer.make_optimizer(config_lib.base_config()))

    def mean_grad(groups):
        acc = state.new_accumulator()
        for rows in groups:
            b = batch(rows)
            acc = steps.accumulate(model, state.params, acc, b.arrays(), None, prefix_len=b.prefix_len,
                                   n_latent=b.n_latent, method=methods.get("coconut"))
        grads, losses = steps.mean_gradient(acc)
        return grads, losses["loss"]

    g_full, l_full = mean_grad([list(range(8))])
    g_acc, l_acc = mean_grad([[0, 1, 2], [3, 4, 5, 6, 7]])
    # The update hands back the accumulator zeroed, in its own buffers, ready for the next step.
    acc = state.new_accumulator()
    b = batch(list(range(8)))
    acc = steps.accumulate(model, state.params, acc, b.arrays(), None, prefix_len=b.prefix_len,
                           n_latent=b.n_latent, method=methods.get("coconut"))
    losses, acc = state.update(acc)
    assert set(losses) == {"loss"}  # one term: no per-term figures
    assert abs(float(losses["loss"]) - float(l_full)) <= 1e-6 * abs(float(l_full))
    assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(acc))
    # The halves hold different numbers of labelled tokens: a per-micro-batch mean would differ.
    counts = [sum(t != data.IGNORE for t in batch(r).labels[:, 1:].ravel()) for r in ([0, 1, 2], [3, 4, 5, 6, 7])]
    assert counts[0] != counts[1]
    assert abs(float(l_full) - float(l_acc)) <= 1e-6 * abs(float(l_full))
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_acc)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-8)
    # The scale matters: twice the gradient is not the gradient.
    assert max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(g_full)) > 1e-3


class _TwoTerms(methods.Method):
    """Coconut's loss twice, as two named terms: "lm" and "again" (its sum doubled, its count
    the number of rows), weighted 1 and 0.5. The objective is known in closed form."""

    def term_counts(self, arrays, **kw):
        return {**methods.get("coconut").term_counts(arrays, **kw), "again": jnp.float32(arrays["input_ids"].shape[0])}

    def loss_terms(self, model, params, arrays, **kw):
        s, n = methods.get("coconut").loss_terms(model, params, arrays, **kw)["lm"]
        return {"lm": (s, n), "again": (2.0 * s, jnp.float32(arrays["input_ids"].shape[0]))}


def test_a_loss_of_two_terms_divides_each_by_its_own_count_over_the_whole_step():
    """Accumulated over two uneven micro-batches, each term is its step sum over its step count:
    loss = lm + 0.5 * again, with lm = S/N (tokens) and again = 2S/R (rows), and the gradient is
    that of the same expression. Each term is logged."""
    import dataclasses
    model = GPT2Model(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    params = model.init(0)
    rng = np.random.default_rng(1)
    seqs = []
    for i in range(6):
        ids = rng.integers(1, 37, size=4 + i).tolist() + [37, 39, 38] + rng.integers(1, 37, size=2 + i % 3).tolist()
        seqs.append((ids, [data.IGNORE] * (ids.index(38) + 1) + ids[ids.index(38) + 1:]))
    batch = lambda rows: data.collate([seqs[i] for i in rows], rows, latent_id=39, pad_id=0, batch_size=len(rows),
                                      multiple=4)
    two = _TwoTerms(**{f.name: getattr(methods.get("coconut"), f.name) for f in dataclasses.fields(methods.Method)})
    two = dataclasses.replace(two, name="two_terms", loss=(("lm", 1.0), ("again", 0.5)))
    mesh = sharding.make_mesh()
    state = steps.TrainState(model, params, mesh, optimizer.make_optimizer(config_lib.base_config()), loss=two.loss)
    acc = state.new_accumulator()
    micro = [batch(rows) for rows in ([0, 1], [2, 3, 4, 5])]
    scales = steps.term_scales(two, [(b.arrays(), b.prefix_len, b.n_latent) for b in micro])
    for b in micro:
        acc = steps.accumulate(model, state.params, acc, b.arrays(), None, scales, prefix_len=b.prefix_len,
                               n_latent=b.n_latent, method=two)
    grads, losses = steps.mean_gradient(acc, two.loss)
    # The closed form on the whole batch, with Coconut's one-term loss.
    b = batch(list(range(6)))

    def objective(p):
        s, n = methods.get("coconut").loss_terms(model, p, b.arrays(), prefix_len=b.prefix_len,
                                                 n_latent=b.n_latent)["lm"]
        return s / n + 0.5 * (2.0 * s / 6.0), (s / n, 2.0 * s / 6.0)
    (want, (lm, again)), want_grads = jax.value_and_grad(objective, has_aux=True)(params)
    assert set(losses) == {"loss", "lm", "again"}
    for k, v in (("loss", want), ("lm", lm), ("again", again)):
        assert abs(float(losses[k]) - float(v)) <= 1e-5 * abs(float(v)), k
    for a, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        a, w = np.asarray(a), np.asarray(w)
        assert np.abs(a - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-8)
    # One backward pass gives what a backward pass per term gave (tests/step_checks.py).
    from tests.step_checks import assert_same_gradient
    assert_same_gradient(two, model, state.params, [(b.arrays(), b.prefix_len, b.n_latent) for b in micro])
    # The update hands back every term's figures.
    got, _ = state.update(acc)
    assert set(got) == {"loss", "lm", "again"} and abs(float(got["loss"]) - float(want)) <= 1e-5 * float(want)


def test_optimizer_state_is_sharded_like_the_params():
    """On 8 (fake) devices with fsdp, Adam's moments are placed like their params (never on one
    device), also after a reset."""
    code = """
import jax, numpy as np
from coconut_jax import config as config_lib, optimizer, sharding, steps
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
model = GPT2Model(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
mesh = sharding.make_mesh(2, 4, 1)
state = steps.TrainState(model, model.init(0), mesh, optimizer.make_optimizer(config_lib.base_config()))
state.reset_optimizer()
mu = state.opt_state[0].mu
for name in ("wte", ("h", "0", "c_fc", "kernel")):
    p = state.params[name] if isinstance(name, str) else state.params[name[0]][name[1]][name[2]][name[3]]
    m = mu[name] if isinstance(name, str) else mu[name[0]][name[1]][name[2]][name[3]]
    assert m.sharding == p.sharding, (name, m.sharding, p.sharding)
    assert len(m.sharding.device_set) == 8 and "fsdp" in str(m.sharding.spec), m.sharding
print("ok")
"""
    import subprocess, sys
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(devices=8), capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


REFERENCE_PROSQA_YAML = """\
project: coconut
save_path: YOUR_PATH_TO_SAVE_THE_MODEL
name: prosqa-coconut
local: True
only_eval: False
coconut: True
special_token: False
cot: False
no_thoughts: False
no_cot: False
c_thought: 1
epochs_per_stage: 5
max_latent_stage: 6
pad_latent_to_max: True
save_only_improve: False
uniform_prob: 0.0
model_id: openai-community/gpt2
load_model_path: None
seed: 0
resume: 0
bf16: False
train_path: data/prosqa_train.json
val_path: data/prosqa_valid.json
reset_optimizer: True
batch_size_training: 32
debug: False
gradient_accumulation_steps: 1
num_epochs: 50
lr: !!float "1e-4"
weight_decay: 0.01
"""


def test_reference_yaml_parses_into_our_config(tmp_path):
    from configs import prosqa
    path = tmp_path / "prosqa_coconut.yaml"
    path.write_text(REFERENCE_PROSQA_YAML)
    got, ours = config_lib.from_reference_yaml(str(path)), prosqa.get_config()
    for k in ("method", "c_thought", "epochs_per_stage", "max_latent_stage", "pad_latent_to_max", "uniform_prob",
              "num_epochs", "lr", "weight_decay", "global_batch_size", "reset_optimizer", "train_path", "val_path",
              "gradient_accumulation_steps", "bf16", "seed", "resume", "model_id", "name"):
        assert got[k] == ours[k], k
    assert got.load_model_path is None  # the YAML's `None`: no checkpoint, not a path called "None"


@pytest.mark.parametrize("value", ["None", ""])
def test_no_checkpoint_is_none_past_config_loading(tmp_path, value):
    c = config_lib.base_config()
    assert c.load_model_path is None
    c.train_path = c.val_path = str(tmp_path / "d.json")
    (tmp_path / "d.json").write_text("[]")
    c.load_model_path = value  # as `--config.load_model_path=None` sets it
    config_lib.validate(c)
    assert c.load_model_path is None


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(REFERENCE_PROSQA_YAML.replace("cot: False", "cot: True"))
    with pytest.raises(config_lib.ConfigError, match="at most one of coconut/cot/no_thoughts/no_cot"):
        config_lib.from_reference_yaml(str(bad))
    bad.write_text(REFERENCE_PROSQA_YAML + "mystery: 3\n")
    with pytest.raises(config_lib.ConfigError, match="unknown setting 'mystery'"):
        config_lib.from_reference_yaml(str(bad))


@pytest.mark.parametrize("override,message", [
    (dict(method="latent"), "method='latent' is not one of"),
    (dict(train_path="/nope/train.json"), "train_path='/nope/train.json': file not found"),
    (dict(global_batch_size=10, gradient_accumulation_steps=4), "not divisible by gradient_accumulation_steps"),
    (dict(only_eval=True), "only_eval needs load_model_path"),
    (dict(wandb_mode="maybe"), "wandb_mode='maybe'"),
    (dict(remat="some"), "remat='some' must be none, dots or full"),
    (dict(log_every_steps=0), "log_every_steps=0 must be >= 1"),
    (dict(loss_chunk=-1), "loss_chunk=-1 must be >= 0"),
])
def test_bad_configs(tmp_path, override, message):
    c = config_lib.base_config()
    good = tmp_path / "d.json"
    good.write_text("[]")
    c.train_path = c.val_path = str(good)
    c.update(override)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def _cli_config_error(*overrides):
    """The message the CLI prints for a mistake on its command line, found in process: the
    command line parsed as `coconut_jax.train` parses it, the config validated and the mesh
    made as a run starts."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configuration file", flag_values=fv, lock_config=True)
    argv = ["train", "--config", os.path.join(ROOT, "configs/tiny.py"), *overrides]
    saved, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv
    try:
        config_lib.parse_argv(argv, fv)
        config_lib.validate(fv.config)
        config_lib.checked(sharding.make_mesh, fv.config.mesh.data, fv.config.mesh.fsdp, fv.config.mesh.tensor)
    except config_lib.ConfigError as e:
        return f"error: {e}"
    finally:
        sys.argv = saved
    return None


@pytest.mark.parametrize("args,message", [
    (("--config.method=latent",), "error: config: method='latent' is not one of coconut, cot, no_thoughts, no_cot, pause_as_thought, codi, codi_simcot, simcot"),
    (("--config.prepare.n_embdd=64",), "error: config: unknown field --config.prepare.n_embdd; did you mean --config.prepare.n_embd?"),
    (("--config.lrr=0.1",), "error: config: unknown field --config.lrr; did you mean --config.lr?"),
    (("--config.lr=fast",), "error: config: flag --config.lr=fast: could not convert string to float"),
    (("--config.mesh.data=3",), "error: config: mesh data=3 x fsdp=1 x tensor=1 != 1 devices"),
    (("--config.eval_batch_size=-1",), "error: config: eval_batch_size=-1 must be >= 0 (0: chosen by device)"),
    (("--config.train_path=my.json",), "error: config: train_path='my.json' is set, but prepare.kind='synthetic_prosqa' generates"),
])
def test_cli_mistakes_are_one_line(args, message):
    got = _cli_config_error(*args)
    assert got is not None and got.startswith(message) and "\n" not in got, got


def test_cli_mistake_exits_2_with_one_line(tmp_path):
    """Through the real CLI (a fresh process: this one depends on its 4 host devices)."""
    r = run_cli(tmp_path, "--config.global_batch_size=6", check=False, devices=4)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: config: micro-batch (global_batch_size / gradient_accumulation_steps = 6) is not divisible by the 4" in r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def test_cli_refuses_a_directory_holding_another_run(tiny_run):
    """The same --config.name with another method: one line naming --config.name; nothing touched."""
    before = open(os.path.join(tiny_run, "metrics.jsonl")).read()
    r = run_cli(os.path.dirname(tiny_run), "--config.method=no_cot", check=False)
    assert r.returncode == 2 and "holds another run (method: 'coconut' -> 'no_cot')" in r.stderr
    assert "--config.name (now 'tiny')" in r.stderr and "Traceback" not in r.stderr
    assert open(os.path.join(tiny_run, "metrics.jsonl")).read() == before


def test_distributed_environment_mistake_is_one_line(tmp_path):
    r = run_cli(tmp_path, check=False, env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 2 and "environment variable JAX_NUM_PROCESSES is not set" in r.stderr


@pytest.mark.slow
def test_wandb_offline_needs_no_account_or_network(tmp_path):
    """wandb_mode=offline logs to a local run directory (no login, no network)."""
    pytest.importorskip("wandb")
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    run_cli(tmp_path, "--config.num_epochs=1", "--config.wandb_mode=offline", env=env)
    runs = list((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    assert metrics(tmp_path / "tiny" / "metrics.jsonl")[-1]["epoch"] == 1
