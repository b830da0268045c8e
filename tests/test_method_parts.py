"""A method's own parameters (parts) and its frozen ones, through the real run: created from the
pretrained model, trained, checkpointed, restored on a resume and a hand-off, sharded like the
model's, and never exported as the model. The method is tests/probe_method.py's `probe`."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint, config as config_lib, hf, trainable
from coconut_jax.metrics import read_metrics
from tests import probe_method
from tests.conftest import ROOT, subprocess_env


def _config(save_path, **kw):
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.update(dict(method="probe", save_path=str(save_path), cache_dir=str(save_path / "cache"), **kw))
    return c


def _leaves(tree):
    return {"/".join(trainable.names(p)): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
    """The tiny config with method=probe: 3 epochs straight, and 2 epochs then 1 more (a resume)."""
    from coconut_jax.train import run_config
    mp = pytest.MonkeyPatch()
    probe_method.register(mp)
    base = tmp_path_factory.mktemp("probe")
    try:
        straight, _ = run_config(_config(base / "straight"))
        run_config(_config(base / "resumed", num_epochs=2))
        resumed, _ = run_config(_config(base / "resumed"))
        yield straight, resumed
    finally:
        mp.undo()


def test_a_part_and_a_frozen_param_train_checkpoint_and_resume(probe_runs):
    straight, resumed = probe_runs
    ckpt = straight.ctx.ckpt.dir
    last = checkpoint.steps(ckpt)[-1]
    # Both terms are logged, in training and evaluation, and the objective is their weighted sum.
    m = read_metrics(os.path.join(straight.run_dir, "metrics.jsonl"))
    step = next(e for e in m if "train/probe" in e)
    assert abs(step["train/loss"] - (step["train/lm"] + 0.5 * step["train/probe"])) < 1e-5
    ev = next(e for e in m if "eval/probe" in e)
    assert abs(ev["eval/loss"] - (ev["eval/lm"] + 0.5 * ev["eval/probe"])) < 1e-5
    # The part starts as the pretrained model and trains; the frozen wpe does not move.
    _, pretrained = hf.load_pretrained(straight.c.model_id)
    stored = checkpoint.load_params(ckpt, last, item="parts")["probe"]
    assert set(_leaves(stored)) == set(_leaves(pretrained))
    moved = [k for k, x in _leaves(stored).items() if not np.array_equal(x, _leaves(pretrained)[k])]
    assert "wte" in moved and len(moved) > 5
    params = checkpoint.load_params(ckpt, last)
    assert np.array_equal(params["wpe"], pretrained["wpe"])  # bit-identical after 3 epochs
    assert not np.allclose(params["h"]["0"]["c_fc"]["kernel"], pretrained["h"]["0"]["c_fc"]["kernel"])
    # What the checkpoint holds: the model's params (wpe too), the part, and optimizer moments
    # for what trains only.
    arrays = checkpoint.stored_arrays(ckpt, last)
    assert "params/wpe" in arrays and any(k.startswith("parts/probe/") for k in arrays)
    moments = [k for k in arrays if k.startswith("opt_state/")]
    assert not any("/model/wpe" in k for k in moments) and any("/parts/probe/wpe" in k for k in moments)
    assert any("/parts/probe/" in k for k in moments) and any("/model/wte" in k for k in moments)
    # The model's params as a hand-off or an export reads them hold no part.
    assert set(params) == set(pretrained)
    # Stopped after 2 epochs and restarted: the same run, part and optimizer included.
    for a, b in ((straight.state.params, resumed.state.params), (straight.state.parts, resumed.state.parts)):
        la, lb = _leaves(a), _leaves(b)
        assert la.keys() == lb.keys()
        for k in la:
            np.testing.assert_allclose(la[k], lb[k], rtol=0, atol=1e-6, err_msg=k)
    ma = [e for e in m if "eval/acc" in e]
    mb = [e for e in read_metrics(os.path.join(resumed.run_dir, "metrics.jsonl")) if "eval/acc" in e]
    assert [round(e["eval/loss"], 5) for e in ma] == [round(e["eval/loss"], 5) for e in mb]


def test_a_hand_off_takes_the_part_from_a_checkpoint_that_holds_it(probe_runs, tmp_path, monkeypatch):
    from coconut_jax.train import set_up
    probe_method.register(monkeypatch)
    straight, _ = probe_runs
    ckpt = straight.ctx.ckpt.dir
    last = checkpoint.steps(ckpt)[-1]
    stored = checkpoint.load_params(ckpt, last, item="parts")["probe"]
    c = _config(tmp_path, load_model_path=os.path.join(ckpt, str(last)), resume=2, num_epochs=3)
    c.prepare.kind = ""
    c.update(dict(train_path=c_path(straight, "train"), val_path=c_path(straight, "valid"),
                  model_id=straight.c.model_id))
    run = set_up(c)
    got = _leaves(run.state.parts["probe"])
    assert all(np.array_equal(got[k], x) for k, x in _leaves(stored).items())
    # A method without parts takes the model's params only.
    c = _config(tmp_path / "plain", load_model_path=os.path.join(ckpt, str(last)), resume=2)
    c.update(dict(method="coconut", train_path=c_path(straight, "train"), val_path=c_path(straight, "valid"),
                  model_id=straight.c.model_id))
    c.prepare.kind = ""
    plain = set_up(c)
    assert plain.state.parts == {} and plain.state.part_models == ()
    np.testing.assert_array_equal(np.asarray(plain.state.params["wpe"]), np.asarray(run.state.params["wpe"]))


def c_path(run, split):
    return os.path.join(run.run_dir, "prepared", f"prosqa_{split}.json")


def test_a_part_is_sharded_like_the_model_on_8_devices():
    """The part's params and their Adam moments are placed by the same logical axes as the
    model's (never on one device); frozen params have no moments."""
    code = """
import jax
from coconut_jax import config as config_lib, optimizer, sharding, steps
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
model = GPT2Model(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
part = GPT2Model(GPT2Config(vocab_size=48, n_positions=32, n_embd=32, n_layer=1, n_head=2))
mesh = sharding.make_mesh(2, 4, 1)
state = steps.TrainState(model, model.init(0), mesh, optimizer.make_optimizer(config_lib.base_config()),
                         parts={"probe": (part, part.init(1))}, trains=lambda path: path[0] != "wpe")
mu = state.opt_state[0].mu
assert "wpe" not in mu["model"] and "wpe" in state.params
kernel = lambda t: t["h"]["0"]["c_fc"]["kernel"]
for got, want in ((state.parts["probe"]["wte"], state.params["wte"]), (kernel(state.parts["probe"]), kernel(state.params)),
                  (mu["parts"]["probe"]["wte"], state.params["wte"]), (kernel(mu["parts"]["probe"]), kernel(state.params))):
    assert got.sharding.spec == want.sharding.spec, (got.sharding, want.sharding)
    assert len(got.sharding.device_set) == 8 and "fsdp" in str(got.sharding.spec), got.sharding
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(devices=8), capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_the_probes_one_backward_step_equals_a_backward_pass_per_term():
    """The two-term probe (a part, a frozen wpe, weight 0.5 on its term) over micro-batches of
    unequal token counts: the gradient of the step's one backward pass equals the per-term form."""
    from coconut_jax import data
    from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
    from tests.step_checks import assert_same_gradient
    model = GPT2Model(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    part = GPT2Model(GPT2Config(vocab_size=36, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    rng = np.random.default_rng(2)
    seqs = []
    for i in range(6):
        ids = rng.integers(1, 40, size=4 + i).tolist() + [37, 39, 38] + rng.integers(1, 40, size=2 + i % 3).tolist()
        seqs.append((ids, [data.IGNORE] * (ids.index(38) + 1) + ids[ids.index(38) + 1:]))
    micro = []
    for rows in ([0, 1], [2, 3, 4, 5]):
        b = data.collate([seqs[i] for i in rows], rows, latent_id=39, pad_id=0, batch_size=len(rows), multiple=4)
        micro.append((b.arrays(), b.prefix_len, b.n_latent))
    probe = probe_method.PROBE
    trained, frozen = trainable.split(model.init(0), probe.trains)
    counts = [probe.term_counts(a, prefix_len=p, n_latent=n, parts={"probe": part}) for a, p, n in micro]
    assert counts[0]["probe"] != counts[1]["probe"] and counts[0]["lm"] != counts[1]["lm"]
    assert_same_gradient(probe, model, trainable.pack(trained, {"probe": part.init(1)}), micro, frozen=frozen,
                         part_models=(("probe", part),))
