"""The README's first command: the offline demo runs end to end and learns, on any device count."""
import os

import pytest

from coconut_jax.metrics import read_metrics
from tests.conftest import assert_first_epochs_match, finish_processes, run_cli, start_processes

pytestmark = pytest.mark.slow  # minutes of training or several processes (quick tier: -m "not slow")

# One epoch per stage (CoT, then 2, 4, 6 thoughts) of 188 steps, on the demo's generator with
# smaller graphs (5-8 nodes) so that answers come out right within a test's budget; the full
# demo runs 4,500 steps. The run is pinned to one core (the same floats whatever the core
# count) and keeps XLA's default optimisations. Measured so for seeds 0, 1 and 2 on one machine
# (200 questions): accuracy 0.405 / 0.505 / 0.620 / 0.735, 0.405 / 0.595 / 0.675 / 0.720 and
# 0.505 / 0.755 / 0.645 / 0.655 across the stages (on two cores: 0.405 / 0.495 / 0.650 / 0.725,
# 0.410 / 0.770 / 0.695 / 0.715, 0.490 / 0.745 / 0.660 / 0.715). The test runs seed 0.
SHORT = ("--config.prepare.train=3000", "--config.prepare.valid=200", "--config.prepare.min_nodes=5",
         "--config.prepare.max_nodes=8", "--config.num_epochs=4", "--config.epochs_per_stage=1",
         "--config.print_examples=0")


def test_demo_runs_end_to_end_and_learns(tmp_path):
    r = run_cli(tmp_path, *SHORT, config="configs/demo.py", optimize=True, pin=True)
    run = tmp_path / "demo"
    events = read_metrics(run / "metrics.jsonl")
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/acc" in e]
    assert [e["stage"] for e in evals] == [0, 1, 2, 3]
    assert [e["eval/thoughts"] for e in evals] == [0, 2, 4, 6]
    # Loss down: the last 50 steps well below the first 50; validation loss down across the run.
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # What holds on any CPU: the last stage (6 thoughts, no written step) well above the CoT
    # stage of this short run and above chance (0.5, two options per question). Seed 0 clears
    # them by 0.18 and 0.135 on one core (last - first 0.33, last 0.735) and by 0.17 and 0.125 on
    # two; seed 2 on one core only just reaches the first (0.15), so this is seed 0's bound, not
    # every seed's. The order of two close stages is not asserted.
    accs = [e["eval/acc"] for e in evals]
    assert accs[-1] >= accs[0] + 0.15, accs
    assert accs[-1] >= 0.6, accs
    # The per-stage summary table and the curves.
    assert "thoughts" in r.stdout and "accuracy" in r.stdout
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(run / "checkpoints")


# The demo's own settings (its 100-question evaluation batch, the wired 128-dim model) on a
# few records: what a host with 8 devices or two hosts would run.
SMALL = ("--config.prepare.train=32", "--config.prepare.valid=10", "--config.num_epochs=2",
         "--config.epochs_per_stage=1", "--config.max_new_tokens=8", "--config.print_examples=0")


def test_demo_on_8_devices_and_in_two_processes_equals_one(tmp_path):
    """One test, so a parallel suite runs the one-device reference once: on 8 devices
    (data x fsdp = 4 x 2, and eval_batch_size=12, which 8 does not divide: evaluation pads
    with unscored rows), and in two local processes on the CPU distributed runtime (one device
    each, each feeding its half of every batch), the demo trains exactly as on one device."""
    run_cli(tmp_path / "one", *SMALL, config="configs/demo.py")
    run_cli(tmp_path / "eight", *SMALL, "--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.eval_batch_size=12",
            config="configs/demo.py", devices=8)
    assert_first_epochs_match(tmp_path / "one" / "demo", tmp_path / "eight" / "demo")
    finish_processes(start_processes(tmp_path / "two", *SMALL, config="configs/demo.py"))
    assert_first_epochs_match(tmp_path / "one" / "demo", tmp_path / "two" / "demo")
