"""The README's first command, on a shortened setting: the offline demo runs end to end and learns."""
import os

from coconut_jax.metrics import read_metrics
from tests.conftest import run_cli

# One epoch per stage (CoT, then 1, 2, 3 thoughts) of 188 steps, on the demo's generator with
# smaller graphs (5-8 nodes) so that answers come out right within a test's budget. Measured:
# accuracy 0.43 / 0.51 / 0.64 / 0.79 across the stages (100 questions); the full demo runs 4,500 steps.
SHORT = ("--config.prepare.train=3000", "--config.prepare.valid=100", "--config.prepare.min_nodes=5",
         "--config.prepare.max_nodes=8", "--config.num_epochs=4", "--config.epochs_per_stage=1",
         "--config.print_examples=0")


def test_demo_runs_end_to_end_and_learns(tmp_path):
    r = run_cli(tmp_path, *SHORT, config="configs/demo.py")
    run = tmp_path / "demo"
    events = read_metrics(run / "metrics.jsonl")
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/acc" in e]
    assert [e["stage"] for e in evals] == [0, 1, 2, 3]
    assert [e["eval/thoughts"] for e in evals] == [0, 1, 2, 3]
    # Loss down: the last 50 steps well below the first 50; validation loss down across the run.
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # Accuracy up across stages: the last stage answers more questions right than the first,
    # and no stage does better than the last.
    accs = [e["eval/acc"] for e in evals]
    assert accs[-1] > accs[0] and accs[-1] == max(accs), accs
    assert accs[-1] > 0.6, accs  # chance is 0.5: two options per question
    # The per-stage summary table and the curves.
    assert "thoughts" in r.stdout and "accuracy" in r.stdout
    with open(run / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(run / "checkpoints")
