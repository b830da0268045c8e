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


def test_the_plan_equals_what_the_run_reports_for_its_first_step(tmp_path):
    """The tiny config: the run's start report (XLA's analysis at its first batch's shape) and
    the plan at that length, from config.json alone, agree within 5% (they compile the same
    programs, so here exactly)."""
    from coconut_jax import loop
    from coconut_jax.train import set_up
    run = set_up(_tiny(tmp_path))
    batch = run.plan(run.train_examples, 0, 0).batch(0)
    reported = loop.report_start(run, batch)
    p = plan.make_plan(_tiny(tmp_path), length=batch.input_ids.shape[1])
    assert [s["stage"] for s in p["stages"]] == [0, 1, 2]
    assert [s["thoughts"] for s in p["stages"]] == [0, 1, 2]
    first = p["stages"][0]
    assert abs(first["total_gb"] - reported["total_gb"]) <= 0.05 * reported["total_gb"]
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
