"""Renders a run's metrics.jsonl to PNG: training/validation loss and accuracy per step,
with stage boundaries marked.

    python -m coconut_jax.plot runs/demo/metrics.jsonl [--out runs/demo/curves.png]
"""
from __future__ import annotations

import argparse
import os

from coconut_jax import files
from coconut_jax.metrics import read_metrics


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Saves whole (`files.write_through`), so a reader never sees half a PNG."""
    fig.tight_layout()
    files.write_through(path, lambda local: fig.savefig(local, dpi=dpi))
    pyplot().close(fig)
    return path


def plot_metrics(metrics_path: str, out_path: str | None = None) -> str:
    plt = pyplot()
    events = read_metrics(metrics_path)
    if not events:
        raise ValueError(f"{metrics_path}: no events to plot")
    train = [e for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/acc" in e]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([e["step"] for e in train], [e["train/loss"] for e in train], lw=0.8, alpha=0.7, label="train")
    val = [e for e in evals if "eval/loss" in e]
    if val:
        ax_loss.plot([e["step"] for e in val], [e["eval/loss"] for e in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.plot([e["step"] for e in evals], [e["eval/acc"] for e in evals], "o-", label="accuracy")
    ax_acc.plot([e["step"] for e in evals], [e["eval/cot_em"] for e in evals], "s--", label="CoT match")
    ax_acc.set(xlabel="step", ylabel="fraction", title="validation", ylim=(-0.02, 1.02))
    # Stage boundaries: the first step logged at each new stage.
    boundaries, last = [], None
    for e in events:
        if e.get("stage") != last and last is not None:
            boundaries.append((e["step"], e["stage"]))
        last = e.get("stage")
    for ax in (ax_loss, ax_acc):
        for step, stage in boundaries:
            ax.axvline(step, color="gray", ls=":", lw=1)
            ax.text(step, ax.get_ylim()[1], f" stage {stage}", va="top", fontsize=8, color="gray")
        ax.legend(loc="best", fontsize=8)
    out_path = out_path or os.path.join(os.path.dirname(files.abspath(metrics_path)), "curves.png")
    return save_figure(fig, out_path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot a run's metrics.jsonl")
    p.add_argument("metrics")
    p.add_argument("--out")
    a = p.parse_args(argv)
    try:
        print(f"wrote {plot_metrics(a.metrics, a.out)}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
