"""SIM-CoT's chain as users run it: gsm_cot -> gsm -> gsm_simcot -> gsm_simcot_eval through the real
config files (tiny data and model), the SIM-CoT run killed and restarted, the same run on 8
devices, `--decode-steps`, and `--config.method=simcot` on the ProsQA and ProntoQA configs."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint
from coconut_jax.metrics import read_metrics
from tests.conftest import ROOT, built_once, cli_command, run_cli
from tests.test_journeys import (SIZES, assert_same_run, data_paths, evals, gsm_chain,  # noqa: F401
                                 kill_at_checkpoint, world)

pytestmark = pytest.mark.slow

# resume=3 (the config) with a stage per epoch: epochs 4-6 train stages 3, 4, 5 (the final
# stage of max_latent_stage 5), where the two-step records' last groups are the filler.
SIMCOT = ("--config.num_epochs=6", "--config.epochs_per_stage=1")


def simcot_args(world, root):
    return (*data_paths(world, "gsm"), *SIZES, *SIMCOT, f"--config.load_model_path={root}/gsm-coconut/checkpoints")


@pytest.fixture(scope="session")
def simcot_chain(world, gsm_chain, tmp_path_factory):
    root = gsm_chain[0]

    def build(out):
        runs = {"simcot": run_cli(out, *simcot_args(world, root), config="configs/gsm_simcot.py"),
                "eval": run_cli(out, *data_paths(world, "gsm", valid="test"), *SIZES, "--config.epochs_per_stage=1",
                                f"--config.load_model_path={out}/gsm-simcot/checkpoints",
                                config="configs/gsm_simcot_eval.py")}
        for name, r in runs.items():
            (out / f"{name}.stdout").write_text(r.stdout)
    out = built_once(tmp_path_factory, "simcot_chain", build)
    return root, out, {p.stem: p.read_text() for p in out.glob("*.stdout")}


def test_gsm_cot_then_coconut_then_simcot_then_eval(simcot_chain):
    root, out, printed = simcot_chain
    # The base comes from the Coconut run's best step; the decoder from model_id's pretrained weights.
    with open(root / "gsm-coconut" / "checkpoints" / "best.json") as f:
        best = json.load(f)["step"]
    assert f"weights from {root}/gsm-coconut/checkpoints/{best} (best by accuracy" in printed["simcot"]
    m = read_metrics(out / "gsm-simcot" / "metrics.jsonl")
    steps = [e for e in m if "train/loss" in e]
    assert steps and all(abs(e["train/loss"] - e["train/lm"] - e["train/steps"]) < 1e-4 for e in steps)
    ev = evals(out / "gsm-simcot")
    assert [(e["epoch"], e["stage"], e["eval/thoughts"]) for e in ev] == [(4, 3, 6.0), (5, 4, 8.0), (6, 5, 10.0)]
    assert all(abs(e["eval/loss"] - e["eval/lm"] - e["eval/steps"]) < 1e-4 for e in ev)
    # The steps term falls as the decoder learns to write the steps out (39.7 -> 32.0 when measured).
    assert steps[-1]["train/steps"] < 0.9 * steps[0]["train/steps"]
    # Checkpoints hold the decoder; the model's params (what export and hand-offs read) do not.
    ckpt = out / "gsm-simcot" / "checkpoints"
    last = checkpoint.steps(str(ckpt))[-1]
    assert "parts" in checkpoint.stored_items(str(ckpt), last)
    assert set(checkpoint.load_params(str(ckpt), last)) == {"wte", "wpe", "h", "ln_f"}
    # The decoder can leave on its own, as a Hugging Face directory of model_id's family and vocabulary.
    from coconut_jax import hf
    decoder = checkpoint.load_params(str(ckpt), last, item="parts")["decoder"]
    config = hf.load_config(hf.resolve_model_dir(json.load(open(out / "gsm-simcot" / "run.json"))["model_id"]))
    hf.export_hf(config, decoder, str(out / "decoder_export"), overwrite=True)
    _, back = hf.load_pretrained(str(out / "decoder_export"))
    jax.tree.map(np.testing.assert_array_equal, back, decoder)
    # The evaluation at the final stage: 5 groups x 2 thoughts, generated with the base alone.
    (final,) = evals(out / "gsm-simcot-eval")
    assert final["eval/thoughts"] == 10.0
    preds = [json.loads(line) for line in open(out / "gsm-simcot-eval" / "predictions_epoch36.jsonl")]
    assert len(preds) == 6 and all(p["text"].count("<|latent|>") == 10 for p in preds)


def test_simcot_run_killed_resumes_exactly(simcot_chain, world, tmp_path):
    """SIGKILL after a mid-epoch checkpoint; the same command again gives the uninterrupted run's
    metrics.jsonl and bit-identical base and decoder."""
    root, out, _ = simcot_chain
    args = (*simcot_args(world, root), "--config.checkpoint_every_steps=1")
    # Checkpointing every step changes no figure: the chain's run (epoch ends only) is the reference.
    proc = run_cli(tmp_path, *args, config="configs/gsm_simcot.py", popen=True)
    run = tmp_path / "gsm-simcot"
    kill_at_checkpoint(proc, run, 7, "a mid-epoch checkpoint of the second epoch")
    r = run_cli(tmp_path, *args, config="configs/gsm_simcot.py")
    assert "resumed from" in r.stdout
    assert_same_run(out / "gsm-simcot", run)
    a, b = (checkpoint.load_params(str(d / "checkpoints"), checkpoint.steps(str(d / "checkpoints"))[-1], "parts")
            for d in (out / "gsm-simcot", run))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_simcot_on_8_devices_equals_one(simcot_chain, world, tmp_path):
    root, out, _ = simcot_chain
    run_cli(tmp_path, *simcot_args(world, root), "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8,
            config="configs/gsm_simcot.py")
    ref, got = (read_metrics(d / "gsm-simcot" / "metrics.jsonl") for d in (out, tmp_path))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        for k in ("train/loss", "train/lm", "train/steps", "eval/loss", "eval/steps", "eval/acc"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a, b)


def test_decode_steps_shows_each_group_beside_the_step_it_replaced(simcot_chain, world):
    _, out, _ = simcot_chain
    cmd, env = cli_command(out, *data_paths(world, "gsm"), *SIZES, *SIMCOT)
    cmd = [sys.executable, "-m", "coconut_jax.analysis", "--config", os.path.join(ROOT, "configs", "gsm_simcot.py"),
           *cmd[cmd.index("--config") + 2:], "--decode-steps", "--question=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("thoughts ")]
    # Final stage of max_latent_stage 5: five groups; the records' two steps, then the filler.
    assert [line.split(":")[0] for line in lines] == [f"thoughts {2 * t + 1}-{2 * t + 2}" for t in range(5)]
    record = json.load(open(world["gsm_valid"]))[1]
    assert f"replaced: {record['steps'][0]!r}" in lines[0] and f"replaced: {record['steps'][1]!r}" in lines[1]
    assert f"replaced: '### {record['answer']}'" in lines[4]


@pytest.mark.parametrize("task,config", [("prosqa", "configs/prosqa.py"), ("prontoqa", "configs/prontoqa.py")])
def test_simcot_on_the_prosqa_and_prontoqa_configs(world, tmp_path, task, config):
    """`--config.method=simcot` on configs whose steps hold no brackets: each group is its own step."""
    run_cli(tmp_path, *data_paths(world, task), *SIZES, "--config.method=simcot", "--config.num_epochs=2",
            "--config.epochs_per_stage=1", config=config)
    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").is_file()]
    m = read_metrics(run / "metrics.jsonl")
    assert json.load(open(run / "run.json"))["step_groups"] == "steps"
    # Stage 0 has no thoughts, so no step term; stage 1 has one group per row.
    assert all(e["train/steps"] == 0.0 for e in m if e.get("stage") == 0 and "train/steps" in e)
    assert any(e["train/steps"] > 0.0 for e in m if e.get("stage") == 1 and "train/steps" in e)
