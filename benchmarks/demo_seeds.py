"""The demo's spread over seeds: per-stage accuracy of the demo and of its no-thought baseline.

    python benchmarks/demo_seeds.py [--seeds 0,1,2] [--jobs 2] [--save_path runs/demo_seeds] [--config.X=Y ...]

For each seed (it sets the generated data, the initial weights and the batch order) runs
`python -m coconut_jax.train --config configs/demo.py` twice in its own run directory:
`demo-s{seed}` (the demo's method, Coconut) and `demo-no-cot-s{seed}` (`method=no_cot`: same
data, model, initial weights and epochs, no reasoning written or thought). Any `--config.*`
argument goes to both. A run directory that already holds a finished run is resumed, which does
nothing, so an interrupted sweep is rerun with the same command.

`--jobs 2` runs two trainings at a time, each pinned to its share of the CPU cores (on 2 cores:
about 15% more trainings per hour than one at a time; the losses came out identical). Each
run's output is in `{save_path}/{run}.log`.

Prints a table (stderr) and one JSON object (stdout): for each stage the last evaluation's
accuracy per seed with mean, min and max; the baseline's final and best accuracy; per seed the
final stage's margin over the baseline and its gap to the CoT stage (stage 0), and whether
the demo's claims hold for every seed (final - baseline >= 0.10, CoT - final <= 0.03).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coconut_jax.metrics import last_evals, read_metrics  # noqa: E402

MIN_MARGIN_OVER_BASELINE = 0.10
MAX_GAP_TO_COT = 0.03


def run_names(name: str, seed: int) -> tuple[str, str]:
    return f"{name}-s{seed}", f"{name}-no-cot-s{seed}"


def commands(config: str, save_path: str, name: str, seeds: list[int], overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(run name, train command) for every run of the sweep, each seed's pair together."""
    out = []
    for seed in seeds:
        for run, extra in zip(run_names(name, seed), ([], ["--config.method=no_cot"])):
            out.append((run, [sys.executable, "-m", "coconut_jax.train", "--config", config,
                              f"--config.save_path={save_path}", f"--config.name={run}", f"--config.seed={seed}",
                              *overrides, *extra]))
    return out


def core_groups(jobs: int) -> list[set[int]] | None:
    """The CPU cores split into `jobs` disjoint groups (None: no pinning, one job or no affinity API)."""
    if jobs <= 1 or not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < jobs:
        return None
    return [set(cores[i::jobs]) for i in range(jobs)]


def run_all(cmds: list[tuple[str, list[str]]], save_path: str, jobs: int) -> dict[str, float]:
    """Runs the commands, `jobs` at a time; returns each run's wall-clock seconds. Exits on a failure."""
    groups = core_groups(jobs)
    free = list(range(max(jobs, 1)))
    pending, running, walls = list(cmds), {}, {}
    os.makedirs(save_path, exist_ok=True)
    while pending or running:
        while pending and free:
            slot = free.pop(0)
            run, cmd = pending.pop(0)
            pin = (lambda cores=groups[slot]: os.sched_setaffinity(0, cores)) if groups else None
            log = open(os.path.join(save_path, f"{run}.log"), "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
            running[proc.pid] = (proc, run, slot, log, time.time())
            print(f"started {run}", file=sys.stderr)
        pid, status = os.wait()
        if pid not in running:
            continue
        proc, run, slot, log, t0 = running.pop(pid)
        log.close()
        walls[run] = round(time.time() - t0, 1)
        free.append(slot)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            for other in running.values():
                other[0].terminate()
            sys.exit(f"demo_seeds: {run} failed (exit {code}); see {os.path.join(save_path, run + '.log')}")
        print(f"finished {run} in {walls[run]:.0f} s", file=sys.stderr)
    return walls


def spread(values: list[float]) -> dict:
    return {"per_seed": values, "mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values)}


def summarize(save_path: str, name: str, seeds: list[int]) -> dict:
    """Per-stage and baseline accuracies of a finished sweep, with the claims checked per seed."""
    stages, finals, bests, last_stage, cot = {}, [], [], [], []
    for seed in seeds:
        demo, base = (os.path.join(save_path, r, "metrics.jsonl") for r in run_names(name, seed))
        per_stage = last_evals(read_metrics(demo))
        for stage, e in per_stage.items():
            stages.setdefault(stage, {"thoughts": e["eval/thoughts"], "acc": []})["acc"].append(e["eval/acc"])
        base_accs = [e["eval/acc"] for e in read_metrics(base) if "eval/acc" in e]
        if not per_stage or not base_accs:
            raise ValueError(f"{demo if not per_stage else base}: no evaluation recorded")
        finals.append(base_accs[-1])
        bests.append(max(base_accs))
        cot.append(per_stage[min(per_stage)]["eval/acc"])
        last_stage.append(per_stage[max(per_stage)]["eval/acc"])
    if any(len(s["acc"]) != len(seeds) for s in stages.values()):
        raise ValueError(f"{save_path}: the seeds' runs did not all reach the same stages")
    over_base = [round(f - b, 4) for f, b in zip(last_stage, finals)]
    behind_cot = [round(c - f, 4) for c, f in zip(cot, last_stage)]
    return {
        "seeds": seeds,
        "stages": [{"stage": s, "thoughts": v["thoughts"], **spread(v["acc"])} for s, v in sorted(stages.items())],
        "baseline_final": spread(finals),
        "baseline_best": spread(bests),
        "final_minus_baseline": over_base,
        "cot_minus_final": behind_cot,
        "beats_baseline_by_0.10": all(m >= MIN_MARGIN_OVER_BASELINE - 1e-9 for m in over_base),
        "within_0.03_of_cot": all(g <= MAX_GAP_TO_COT + 1e-9 for g in behind_cot),
    }


def table(summary: dict) -> str:
    lines = [f"{'stage':>5} {'thoughts':>8} {'mean':>6} {'min':>6} {'max':>6}   per seed"]
    rows = [(str(s["stage"]), f"{s['thoughts']:g}", s) for s in summary["stages"]]
    rows.append(("no-CoT", "0", summary["baseline_final"]))
    for stage, thoughts, s in rows:
        lines.append(f"{stage:>5} {thoughts:>8} {s['mean']:>6.3f} {s['min']:>6.3f} {s['max']:>6.3f}   "
                     + " ".join(f"{v:.3f}" for v in s["per_seed"]))
    lines.append(f"final - baseline: {summary['final_minus_baseline']}   CoT - final: {summary['cot_minus_final']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="trainings at a time (each pinned to its share of the cores)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
    p.add_argument("--save_path", default=os.path.join("runs", "demo_seeds"))
    p.add_argument("--name", default="demo")
    a, overrides = p.parse_known_args()
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (only --config.* overrides pass through)")
    seeds = [int(s) for s in a.seeds.split(",")]
    save_path = os.path.abspath(a.save_path)
    t0 = time.time()
    walls = run_all(commands(a.config, save_path, a.name, seeds, overrides), save_path, a.jobs)
    summary = summarize(save_path, a.name, seeds)
    summary.update(overrides=overrides, jobs=a.jobs, run_wall_s=walls, total_wall_s=round(time.time() - t0, 1))
    print(table(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
