"""The README's first command, on a shortened setting: the offline demo runs end to end and learns."""
import json
import os

from tests.conftest import run_cli

# 4 epochs of 100 steps, one per stage (CoT, then 1, 2, 3 thoughts). Accuracy needs ~2,000
# steps of this model to rise (the full demo runs 4,500), more than a test can afford, so
# this run checks the schedule, the outputs and that the losses fall.
SHORT = ("--config.prepare.train=1600", "--config.prepare.valid=50", "--config.num_epochs=4",
         "--config.epochs_per_stage=1", "--config.print_examples=0")


def test_demo_runs_end_to_end_and_its_losses_fall(tmp_path):
    r = run_cli(tmp_path, *SHORT, config="configs/demo.py")
    run = tmp_path / "demo"
    with open(run / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f]
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/acc" in e]
    assert [e["stage"] for e in evals] == [0, 1, 2, 3]
    assert [e["eval/thoughts"] for e in evals] == [0, 1, 2, 3]
    # Loss down: the last 50 steps well below the first 50; validation loss down across the run.
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert all(0.0 <= e["eval/acc"] <= 1.0 for e in evals)
    # The per-stage summary table and the curves.
    assert "thoughts" in r.stdout and "accuracy" in r.stdout
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(run / "checkpoints")
