"""The memory plan (`python -m coconut_jax.plan`) against the run's own report of its compiled
step, its suggestions, and its one-line mistakes."""
import json
import os
import subprocess
import sys

import pytest

from coconut_jax import config as config_lib, plan
from tests.conftest import ROOT, subprocess_env


def _tiny(tmp_path, **kw):
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    c.update(dict(save_path=str(tmp_path), cache_dir=str(tmp_path / "cache"), **kw))
    return c


def _bytes(tree) -> int:
    import jax
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_the_plan_equals_the_compiled_step_on_the_runs_real_arrays(tmp_path):
    """The tiny config: the plan (abstract shapes from config.json alone) against the run's own
    step compiled on its real arrays (its placed params, optimizer state, accumulator and first
    batch) and XLA's analysis of those programs, with the resident bytes read off the real
    arrays: params, optimizer, accumulator, batch and the peak total agree within 5%."""
    import jax
    import numpy as np
    from coconut_jax import steps
    from coconut_jax.train import set_up
    run = set_up(_tiny(tmp_path))
    state, batch = run.state, run.plan(run.train_examples, 0, 0).batch(0)
    arrays, acc = run.put(batch), state.take_accumulator()
    key = (jax.random.key(0), np.int32(0), np.int32(0))
    accumulate = steps.accumulate.lower(
        state.model, state.trained, acc, arrays, key, method=run.cur.spec, prefix_len=batch.prefix_len,
        n_latent=batch.n_latent, loss_chunk=run.c.loss_chunk, frozen=state.frozen,
        part_models=state.part_models).compile().memory_analysis()
    update = state.update_fn.lower(state.trained, state.opt_state, acc).compile().memory_analysis()

    def live(m):
        return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    gib = 2 ** 30
    measured = {"params_gb": _bytes(state.trained) / gib, "optimizer_gb": _bytes(state.opt_state) / gib,
                "accumulator_gb": _bytes(acc["grads"]) / gib, "batch_gb": _bytes(arrays) / gib,
                "total_gb": max(_bytes(state.opt_state) + live(accumulate),
                                _bytes(state.frozen or {}) + live(update)) / gib}
    p = plan.make_plan(_tiny(tmp_path), length=batch.input_ids.shape[1])
    assert [s["stage"] for s in p["stages"]] == [0, 1, 2]
    assert [s["thoughts"] for s in p["stages"]] == [0, 1, 2]
    first = p["stages"][0]
    for k, v in measured.items():
        assert abs(first[k] - v) <= 0.05 * v + 1e-4, (k, first[k], v)
    assert first["tokens_per_step"] == 8 * batch.input_ids.shape[1]
    assert p["peak_stage"] in (0, 1, 2) and p["evaluation"]["total_gb"] > 0


def test_a_plan_that_does_not_fit_computes_what_would(tmp_path):
    p = plan.make_plan(_tiny(tmp_path), length=256, device_memory=1e-4)
    assert p["fits"] is False
    sets = [s["set"] for s in p["suggestions"]]
    assert {"gradient_accumulation_steps": 2} in sets and {"remat": "full"} in sets
    assert {"param_dtype": "bfloat16"} in sets
    assert all(s["total_gb"] > 0 for s in p["suggestions"])
    # Each figure is computed: halving the micro-batch lowers the peak.
    accum2 = next(s for s in p["suggestions"] if s["set"] == {"gradient_accumulation_steps": 2})
    peak = max(s["total_gb"] for s in p["stages"])
    assert accum2["total_gb"] < peak
    p = plan.make_plan(_tiny(tmp_path), length=256, device_memory=100.0)
    assert p["fits"] is True and p["suggestions"] == []


def test_plan_cli_on_fake_devices_prints_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "coconut_jax.plan", "--config", os.path.join(ROOT, "configs", "tiny.py"),
                        f"--config.save_path={tmp_path}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                        "--devices", "4", "--length=128", "--device-memory", "16GB", "--json"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(r.stdout[r.stdout.index("{"):])
    assert p["devices"] == 4 and p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and p["length"] == 128
    assert p["fits"] is True and {s["stage"] for s in p["stages"]} == {0, 1, 2}
    assert all(s["total_gb"] > 0 for s in p["stages"])


@pytest.mark.parametrize("text,gib", [("16GB", 16.0), ("80GiB", 80.0), ("512MB", 0.5), ("1.5G", 1.5)])
def test_sizes(text, gib):
    assert plan.parse_size(text) == pytest.approx(gib)


def test_a_bad_size_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "coconut_jax.plan", "--config", os.path.join(ROOT, "configs", "tiny.py"),
                        f"--config.save_path={tmp_path}", "--device-memory=lots"],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --device-memory='lots': not a size like 16GB or 80GiB")


def test_the_loss_log_reports_model_flop_utilisation_on_a_known_peak():
    """On an accelerator of known bf16 peak the log adds train/mfu: the step's model FLOPs over the
    time since the epoch began, over the peak (here a made-up peak and a known elapsed time)."""
    import time

    import jax.numpy as jnp

    from coconut_jax import costs, loop

    class Sink:
        events = []

        def log(self, e):
            self.events.append(e)
    log = loop.LossLog(Sink(), every=1, peak_flops=1e12)
    log.clock = (time.time() - 2.0, 0, 0.0)
    log.add({"step": 1, "losses": {"loss": jnp.float32(1.0)}, "tokens": 100, "flops": 1e12})
    (e,) = Sink.events
    assert 0.4 < e["train/mfu"] <= 0.5 and 40 < e["train/tokens_per_s"] <= 50
    quiet = loop.LossLog(Sink(), every=1)
    quiet.add({"step": 2, "losses": {"loss": jnp.float32(1.0)}, "tokens": 1, "flops": 0.0})
    assert "train/mfu" not in Sink.events[-1]
    assert costs.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and costs.peak_flops("cpu") is None
