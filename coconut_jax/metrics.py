"""Answer extraction and scoring exactly as the reference (SPEC §6), and the metrics sinks."""
from __future__ import annotations

import json

from coconut_jax import files


def extract_answer(text: str) -> str:
    return text.split("#")[-1].replace(",", "").strip()


def normalise_answer(answer: str) -> str:
    return answer.replace(",", "").strip()


def is_correct(text: str, answer: str) -> bool:
    return extract_answer(text) == normalise_answer(answer)


def cot_matches(text: str, steps: list[str]) -> bool:
    """The text after the first line, up to the first '#', equals the steps joined by newlines."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip() == "\n".join(steps)


class MetricsSink:
    """One JSON object per logged event in `{run_dir}/metrics.jsonl`, mirrored to wandb when enabled.

    Only process 0 writes. `truncate(n)` keeps the first n events (used on resume, so a
    restarted run's file holds exactly what an uninterrupted run would have written).
    """

    def __init__(self, path: str | None, wandb_run=None, enabled: bool = True):
        self.path, self.wandb_run, self.enabled = path, wandb_run, enabled
        self.count = 0
        if enabled and path and files.exists(path):
            self.count = len(files.read_text(path).splitlines())

    def truncate(self, n: int) -> None:
        if not (self.enabled and self.path and files.exists(self.path)):
            return
        lines = files.read_text(self.path).splitlines(keepends=True)[:n]
        files.write_atomic(self.path, "".join(lines))
        self.count = len(lines)

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        if self.path:
            files.append_line(self.path, json.dumps(event) + "\n")
        self.count += 1
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in event.items() if isinstance(v, (int, float))}, step=event.get("step"))


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


def last_evals(events: list[dict]) -> dict[int, dict]:
    """The last evaluation of each stage: {stage: event}, stages in order."""
    last = {e["stage"]: e for e in events if "eval/acc" in e}
    return dict(sorted(last.items()))


def stage_table(path: str) -> str:
    """The last evaluation of each stage of a run's metrics file, as a text table."""
    last = last_evals(read_metrics(path))
    lines = [f"{'stage':>5} {'thoughts':>8} {'val loss':>9} {'accuracy':>9} {'CoT match':>9} {'new tokens':>10}"]
    for stage, e in last.items():
        lines.append(f"{stage:>5} {e['eval/thoughts']:>8} {e.get('eval/loss', float('nan')):>9.4f} "
                     f"{e['eval/acc']:>9.3f} {e['eval/cot_em']:>9.3f} {e['eval/new_tokens']:>10.1f}")
    return "\n".join(lines)
