"""CODI as users run it: configs/gsm_codi.py through the CLI (tiny data, model and LoRA), the run
killed and restarted, its evaluation with `only_eval_loss` against the PyTorch transliteration of
the reference on the run's own weights, its answers through `generate` and an export, and the
same method on Llama and Qwen."""
import json

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint
from coconut_jax.metrics import read_metrics
from tests.conftest import built_once, finish_processes, run_cli, start_processes
from tests.test_journeys import assert_same_run, data_paths, evals, kill_at_checkpoint, world  # noqa: F401

pytestmark = pytest.mark.slow

SMALL = ("--config.global_batch_size=8", "--config.gradient_accumulation_steps=2", "--config.eval_batch_size=4",
         "--config.max_new_tokens=6", "--config.print_examples=0", "--config.checkpoint_every_steps=0",
         "--config.lora.rank=4", "--config.bf16=False", "--config.param_dtype=float32", "--config.codi.num_latent=3")
CODI = (*SMALL, "--config.num_epochs=3")


@pytest.fixture(scope="session")
def codi_run(world, tmp_path_factory):
    def build(root):
        r = run_cli(root, *data_paths(world, "gsm"), *CODI, config="configs/gsm_codi.py")
        (root / "train.stdout").write_text(r.stdout)
    root = built_once(tmp_path_factory, "codi_run", build)
    return root, (root / "train.stdout").read_text()


def test_codi_trains_with_its_three_terms(codi_run):
    root, printed = codi_run
    run = root / "gsm-codi"
    assert f"weights from {json.load(open(run / 'run.json'))['model_id']}" in printed
    m = read_metrics(run / "metrics.jsonl")
    steps = [e for e in m if "train/loss" in e]
    assert len(steps) == 15  # 40 records, 8 a step, 3 epochs
    for e in steps:  # the recipe's weights: 1, 1, 1
        assert abs(e["train/loss"] - e["train/student"] - e["train/teacher"] - e["train/distill"]) < 1e-4
    # The distillation term pulls the student's states to the teacher's (0.07 -> 0.01 when measured).
    assert steps[-1]["train/distill"] < 0.5 * steps[0]["train/distill"]
    assert steps[-1]["train/student"] < steps[0]["train/student"] - 0.05
    ev = evals(run)
    assert [(e["epoch"], e["stage"], e["eval/thoughts"]) for e in ev] == [(1, 0, 3.0), (2, 0, 3.0), (3, 0, 3.0)]
    assert all(abs(e["eval/loss"] - e["eval/student"] - e["eval/teacher"] - e["eval/distill"]) < 1e-4 for e in ev)
    # Checkpoints hold the adapters and the projection (the base is rebuilt from model_id).
    ckpt = str(run / "checkpoints")
    last = checkpoint.steps(ckpt)[-1]
    parts = checkpoint.load_params(ckpt, last, item="parts")
    assert set(parts) == {"projection"} and parts["projection"]["fc1"]["kernel"].shape == (32, 32)


def test_codi_run_killed_resumes_exactly(codi_run, world, tmp_path):
    root, _ = codi_run
    args = (*data_paths(world, "gsm"), *CODI, "--config.checkpoint_every_steps=1")
    proc = run_cli(tmp_path, *args, config="configs/gsm_codi.py", popen=True)
    kill_at_checkpoint(proc, tmp_path / "gsm-codi", 7, "the CODI run's step 7")
    run_cli(tmp_path, *args, config="configs/gsm_codi.py")
    assert_same_run(root / "gsm-codi", tmp_path / "gsm-codi")
    last = checkpoint.steps(str(root / "gsm-codi" / "checkpoints"))[-1]
    for run in (root, tmp_path):
        assert last in checkpoint.steps(str(run / "gsm-codi" / "checkpoints"))
    jax.tree.map(np.testing.assert_array_equal,
                 *(checkpoint.load_params(str(r / "gsm-codi" / "checkpoints"), last, item="parts") for r in (root, tmp_path)))


def test_only_eval_loss_equals_the_reference_forward_on_the_runs_weights(codi_run, world, tmp_path):
    """The validation file's records in order, 4 at a time (eval_batch_size), as the reference
    batches them: student and teacher token-weighted over the set, distillation the mean of
    the per-batch values, each within 1e-5 of the PyTorch transliteration."""
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from coconut_jax import hf, trained
    from coconut_jax.data import load_records
    from tests import codi_reference
    from tests.test_codi import _torch_projection
    root, _ = codi_run
    r = run_cli(tmp_path, *data_paths(world, "gsm"), *SMALL, "--config.only_eval=True", "--config.only_eval_loss=True",
                f"--config.load_model_path={root}/gsm-codi/checkpoints", "--config.name=codi-eval",
                config="configs/gsm_codi.py")
    assert "eval/student=" in r.stdout
    (got,) = evals(tmp_path / "codi-eval")
    t = trained.from_run(str(root / "gsm-codi"), best_any_stage=True)  # what load_model_path hands off
    tm = AutoModelForCausalLM.from_pretrained(hf.export_hf(t.config, t.params, str(tmp_path / "hf"), tokenizer=t.tok),
                                              attn_implementation="eager").eval()
    tp = _torch_projection(*t.part_args()["projection"])
    records = [r for r in load_records(world["gsm_valid"]) if r["answer"].split(" ")[-1][0].isdigit()]  # its filter
    sums = {"student": 0.0, "teacher": 0.0, "s_n": 0, "t_n": 0, "distill": []}
    for s in range(0, len(records), 4):
        w = codi_reference.terms(tm, tp, codi_reference.prepare(records[s:s + 4], t.tok, t.settings["pretrained_vocab"]),
                                 3)
        sums["student"] += w["student"] * w["student_tokens"]
        sums["teacher"] += w["teacher"] * w["teacher_tokens"]
        sums["s_n"] += w["student_tokens"]
        sums["t_n"] += w["teacher_tokens"]
        sums["distill"].append(w["distill"])
    want = [sums["student"] / sums["s_n"], sums["teacher"] / sums["t_n"], float(np.mean(sums["distill"]))]
    np.testing.assert_allclose([got["eval/student"], got["eval/teacher"], got["eval/distill"]], want, rtol=1e-5)


def test_generate_and_export_answer_as_the_run_evaluated(codi_run, world, tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env
    root, _ = codi_run
    run = root / "gsm-codi"

    def generate(model, *flags):
        r = subprocess.run([sys.executable, "-m", "coconut_jax.generate", str(model), *flags], cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, check=True)
        return r.stderr, [json.loads(line) for line in r.stdout.splitlines()]
    said, lines = generate(run, "--input", world["gsm_valid"])
    assert "method codi, the prompts of stage 0 (3 thoughts)" in said
    last = max(evals(run), key=lambda e: e["eval/acc"])["epoch"]
    preds = [json.loads(line) for line in open(run / f"predictions_epoch{last}.jsonl")]
    assert [(x["index"], x["text"], x["new_tokens"]) for x in lines] == [(p["index"], p["text"], p["new_tokens"])
                                                                        for p in preds]
    subprocess.run([sys.executable, "-m", "coconut_jax.export", str(run), "--out", str(tmp_path / "export")], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True)
    assert (tmp_path / "export" / "part_projection.safetensors").is_file()
    _, again = generate(tmp_path / "export", "--input", world["gsm_valid"])
    assert [x["text"] for x in again] == [x["text"] for x in lines]
    _, (one,) = generate(tmp_path / "export", "--question", "Tom has 3 apples and buys 2 more. How many?",
                         "--show-thoughts", "--top-k", "2")
    assert one["thoughts"] == 3 and len(one["thought_tokens"]) == 3 and all(len(t) == 2 for t in one["thought_tokens"])
    _, (two,) = generate(tmp_path / "export", "--question", "Tom has 3 apples.", "--thoughts", "1", "--show-thoughts")
    assert two["thoughts"] == 1 and len(two["thought_tokens"]) == 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_codi_trains_on_llama_and_qwen(tmp_path, world, family):
    from coconut_jax import tiny
    from coconut_jax.data import load_records
    texts = tiny.record_texts(load_records(world["gsm_train"]))
    model = tiny.build(texts, str(tmp_path / "model"), vocab_size=400, n_layer=1, n_embd=32, n_head=4,
                       n_positions=256, family=family)
    run_cli(tmp_path, *data_paths(world, "gsm")[:2], f"--config.model_id={model}", *SMALL, "--config.num_epochs=1",
            config="configs/gsm_codi_llama.py")
    (e,) = evals(tmp_path / "gsm-codi-llama")
    assert e["eval/thoughts"] == 3.0
    steps = [x for x in read_metrics(tmp_path / "gsm-codi-llama" / "metrics.jsonl") if "train/loss" in x]
    # The Llama recipe's distillation weight is 20.
    assert all(abs(x["train/loss"] - x["train/student"] - x["train/teacher"] - 20 * x["train/distill"]) < 1e-3
               for x in steps)


def test_a_published_checkpoint_evaluates_with_the_published_settings(world, tmp_path):
    """configs/gsm_codi.py:eval on the reference's saved state dict (written by transformers +
    PEFT + torch): its test-set evaluation runs, and its loss terms equal the reference forward
    run on the PEFT model itself, over the file's records 4 at a time."""
    pytest.importorskip("peft")
    from coconut_jax import hf
    from coconut_jax.data import load_records
    from tests import codi_reference
    from tests.test_codi import reference_checkpoint
    out, module = reference_checkpoint(world["model"], tmp_path / "published", "gpt2")
    r = run_cli(tmp_path, *data_paths(world, "gsm", valid="test"), *SMALL, "--config.only_eval_loss=True",
                f"--config.load_model_path={out}", config="configs/gsm_codi.py:eval")
    assert f"weights from {out}/pytorch_model.bin" in r.stdout
    (got,) = evals(tmp_path / "gsm-codi-eval")
    tok = hf.load_tokenizer(world["model"])
    vocab = hf.load_config(world["model"]).vocab_size
    records = [r for r in load_records(world["gsm_test"]) if r["answer"].split(" ")[-1][0].isdigit()]  # its filter
    assert len(records) < len(load_records(world["gsm_test"]))  # (this file has negative answers)
    parts = [codi_reference.terms(module.codi, module.prj, codi_reference.prepare(records[s:s + 4], tok, vocab), 3)
             for s in range(0, len(records), 4)]
    want = [sum(p["student"] * p["student_tokens"] for p in parts) / sum(p["student_tokens"] for p in parts),
            sum(p["teacher"] * p["teacher_tokens"] for p in parts) / sum(p["teacher_tokens"] for p in parts),
            float(np.mean([p["distill"] for p in parts]))]
    np.testing.assert_allclose([got["eval/student"], got["eval/teacher"], got["eval/distill"]], want, rtol=1e-5)


def test_analysis_and_plan_of_a_codi_run(codi_run, world, tmp_path):
    """`coconut_jax.analysis` reads a CODI run's thoughts and its accuracy by thoughts at
    inference (0..num_latent); `coconut_jax.plan` plans its step and its generation."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env
    root, _ = codi_run
    flags = (*data_paths(world, "gsm"), *CODI, f"--config.save_path={root}")
    r = subprocess.run([sys.executable, "-m", "coconut_jax.analysis", "--config", "configs/gsm_codi.py", *flags,
                        "--top_k", "2"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert sum(line.startswith("thought ") for line in lines) == 3
    (acc,) = [line for line in lines if line.startswith("accuracy by thoughts at inference")]
    assert "3 (k=3)" in acc and "0 (k=0)" in acc
    assert (root / "gsm-codi" / "analysis" / "accuracy_by_k.png").is_file()
    r = subprocess.run([sys.executable, "-m", "coconut_jax.plan", "--config", "configs/gsm_codi.py",
                        f"--config.model_id={world['model']}", "--length", "64", "--json"], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, check=True)
    plan = json.loads(r.stdout)
    assert [(s["stage"], s["thoughts"]) for s in plan["stages"]] == [(0, 6)]
    assert plan["stages"][0]["total_gb"] > 0 and plan["evaluation"]["total_gb"] > 0


def test_codi_on_8_devices_in_bf16_matches_one_device(world, tmp_path):
    """The step sharded over 8 devices (bf16 base, f32 adapters and projection) logs what one
    device logs, to bf16's rounding."""
    args = (*data_paths(world, "gsm"), *SMALL, "--config.num_epochs=1", "--config.bf16=True",
            "--config.param_dtype=bfloat16", "--config.global_batch_size=16", "--config.eval_batch_size=8")
    run_cli(tmp_path / "one", *args, config="configs/gsm_codi.py")
    run_cli(tmp_path / "eight", *args, config="configs/gsm_codi.py", devices=8)
    one, eight = (read_metrics(tmp_path / d / "gsm-codi" / "metrics.jsonl") for d in ("one", "eight"))
    steps = [(a, b) for a, b in zip(one, eight) if "train/loss" in a]
    assert len(steps) == 3  # 40 records, 16 a step
    for a, b in steps:
        for k in ("train/student", "train/teacher"):
            assert abs(a[k] - b[k]) < 2e-2 * abs(a[k]), (k, a[k], b[k])


def test_codi_in_two_processes_logs_what_one_process_logs(codi_run, world, tmp_path):
    """The same run in two processes (one device each, the batch split between them) logs the
    one-process run's losses and answers."""
    finish_processes(start_processes(tmp_path, *data_paths(world, "gsm"), *CODI, config="configs/gsm_codi.py"))
    root, _ = codi_run
    one, two = (read_metrics(r / "gsm-codi" / "metrics.jsonl") for r in (root, tmp_path))
    assert [sorted(e) for e in one] == [sorted(e) for e in two]
    for a, b in zip(one, two):
        for k, v in a.items():
            if k.startswith(("train/", "eval/")) and k != "train/tokens_per_s":
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k)
