"""benchmarks/demo_seeds.py: the demo and its no-thought baseline over seeds, summarised per stage."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, XLA_CACHE, subprocess_env

_spec = importlib.util.spec_from_file_location("demo_seeds", os.path.join(ROOT, "benchmarks", "demo_seeds.py"))
demo_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_seeds)


def _write_run(root, run, accs_by_epoch):
    os.makedirs(root / run)
    with open(root / run / "metrics.jsonl", "w") as f:
        for epoch, (stage, acc) in enumerate(accs_by_epoch, 1):
            f.write(json.dumps({"epoch": epoch, "step": epoch * 10, "train/loss": 1.0, "stage": stage}) + "\n")
            f.write(json.dumps({"epoch": epoch, "stage": stage, "eval/acc": acc, "eval/thoughts": stage}) + "\n")


def test_summary_takes_each_stages_last_evaluation_and_checks_the_claims_per_seed(tmp_path):
    # seed 0: final stage 0.80, CoT 0.82, baseline ends at 0.60 (best 0.65): both claims hold.
    _write_run(tmp_path, "demo-s0", [(0, 0.70), (0, 0.82), (1, 0.75), (1, 0.80)])
    _write_run(tmp_path, "demo-no-cot-s0", [(0, 0.65), (0, 0.62), (0, 0.61), (0, 0.60)])
    # seed 1: final 0.74 trails CoT 0.80 by 0.06 and beats the baseline (0.66) by only 0.08.
    _write_run(tmp_path, "demo-s1", [(0, 0.71), (0, 0.80), (1, 0.77), (1, 0.74)])
    _write_run(tmp_path, "demo-no-cot-s1", [(0, 0.50), (0, 0.55), (0, 0.70), (0, 0.66)])
    s = demo_seeds.summarize(str(tmp_path), "demo", [0, 1])
    assert [(st["stage"], st["per_seed"]) for st in s["stages"]] == [(0, [0.82, 0.80]), (1, [0.80, 0.74])]
    assert abs(s["stages"][1]["mean"] - 0.77) < 1e-9 and s["stages"][1]["min"] == 0.74
    assert s["baseline_final"]["per_seed"] == [0.60, 0.66] and s["baseline_best"]["per_seed"] == [0.65, 0.70]
    assert s["final_minus_baseline"] == [0.2, 0.08] and s["cot_minus_final"] == [0.02, 0.06]
    assert not s["beats_baseline_by_0.10"] and not s["within_0.03_of_cot"]
    assert "no-CoT" in demo_seeds.table(s)


@pytest.mark.slow
def test_sweep_runs_each_seed_with_its_baseline_on_its_own_data(tmp_path):
    """Two seeds of configs/tiny.py, two trainings at a time: four run directories, the seeds'
    generated data and initial weights differ, the summary reads what the runs logged."""
    out = tmp_path / "sweep"
    env = {**subprocess_env(), **XLA_CACHE}
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "demo_seeds.py"), "--seeds", "0,1", "--jobs", "2",
                        "--config", os.path.join("configs", "tiny.py"), "--save_path", str(out), "--name", "tiny",
                        "--config.num_epochs=2", f"--config.cache_dir={tmp_path}/cache"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.splitlines()[-1])
    assert sorted(s["run_wall_s"]) == ["tiny-no-cot-s0", "tiny-no-cot-s1", "tiny-s0", "tiny-s1"]
    assert [st["stage"] for st in s["stages"]] == [0, 1]
    for seed in (0, 1):
        logged = [json.loads(line) for line in open(out / f"tiny-s{seed}" / "metrics.jsonl")]
        assert s["stages"][1]["per_seed"][seed] == [e["eval/acc"] for e in logged if "eval/acc" in e][-1]
        base = [json.loads(line) for line in open(out / f"tiny-no-cot-s{seed}" / "metrics.jsonl")]
        assert s["baseline_final"]["per_seed"][seed] == [e["eval/acc"] for e in base if "eval/acc" in e][-1]
        # the demo and its baseline start from the same data and weights
        for f in ("prosqa_train.json", os.path.join("model", "model.safetensors")):
            with open(out / f"tiny-s{seed}" / "prepared" / f, "rb") as a, \
                    open(out / f"tiny-no-cot-s{seed}" / "prepared" / f, "rb") as b:
                assert a.read() == b.read(), f
    for f in ("prosqa_train.json", os.path.join("model", "model.safetensors")):
        with open(out / "tiny-s0" / "prepared" / f, "rb") as a, open(out / "tiny-s1" / "prepared" / f, "rb") as b:
            assert a.read() != b.read(), f
    # Unknown arguments are refused before anything runs.
    bad = subprocess.run([sys.executable, os.path.join("benchmarks", "demo_seeds.py"), "--seed", "3"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--seed" in bad.stderr
