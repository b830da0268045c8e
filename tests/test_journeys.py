"""The runs users chain, through the real config files, with only paths and sizes overridden.

gsm_cot -> gsm -> gsm_eval (and the Coconut run killed twice and restarted), a run preempted on 4
devices and resumed on 2, prosqa on 8 devices -> prosqa_eval on one, prontoqa in two processes ->
prontoqa_eval in one, a reference YAML, and `only_eval` of every method. A tiny GPT-2 and a few
dozen generated records keep each run short.
"""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from coconut_jax.metrics import read_metrics
from data_prep.common import write_json
from tests.conftest import (ROOT, assert_first_epochs_match, built_once, finish_processes, run_cli, start_processes,
                            stored_params)

pytestmark = pytest.mark.slow  # minutes of training or several processes (quick tier: -m "not slow")

SIZES = ("--config.global_batch_size=8", "--config.eval_batch_size=6", "--config.max_new_tokens=8",
         "--config.print_examples=0", "--config.checkpoint_every_steps=0")


def gsm_records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b, c = (int(x) for x in rng.integers(1, 20, 3))
        out.append({"question": f"Tom has {a} apples and buys {b} more, then gives {c} away. How many are left?",
                    "steps": [f"<<{a}+{b}={a + b}>>", f"<<{a + b}-{c}={a + b - c}>>"], "answer": str(a + b - c)})
    return out


def prontoqa_records(n, seed):
    rng = np.random.default_rng(seed)
    words = ["wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus", "jompus"]
    out = []
    for _ in range(n):
        a, b, c, d = (words[i] for i in rng.permutation(len(words))[:4])
        name = ["Alex", "Sam", "Max", "Rex"][int(rng.integers(4))]
        true = bool(rng.integers(2))
        target = c if true else d
        out.append({"question": f"Every {a} is a {b}. Every {b} is a {c}. {name} is a {a}. True or false: {name} is a {target}.",
                    "steps": [f"{name} is a {a}. Every {a} is a {b}.", f"{name} is a {b}. Every {b} is a {c}."],
                    "answer": "True" if true else "False"})
    return out


TASKS, SPLITS = ("gsm", "prosqa", "prontoqa"), ("train", "valid", "test")


def _build_world(root):
    from coconut_jax import tiny
    from data_prep import prosqa_generator
    g = prosqa_generator.GraphConfig(min_nodes=5, max_nodes=7, n_concepts=20, steps_distribution=((2, 1.0),))
    sets = {"gsm": (gsm_records(40, 0), gsm_records(6, 1), gsm_records(6, 2)),
            "prosqa": tuple(prosqa_generator.generate(n, seed=s, g=g) for n, s in ((32, 0), (6, 1), (6, 2))),
            "prontoqa": (prontoqa_records(32, 0), prontoqa_records(6, 1), prontoqa_records(6, 2))}
    for task in TASKS:
        for split, records in zip(SPLITS, sets[task]):
            write_json(records, str(root / "data" / f"{task}_{split}.json"))
    texts = [t for splits in sets.values() for t in tiny.record_texts(splits[0])]
    tiny.build(texts, str(root / "model"), vocab_size=500, n_layer=1, n_embd=32, n_head=2, n_positions=512, seed=0)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """data/ of every published task (tiny) and one tiny GPT-2 whose tokenizer covers them."""
    root = built_once(tmp_path_factory, "world", _build_world)
    paths = {f"{task}_{split}": str(root / "data" / f"{task}_{split}.json")
             for task in TASKS for split in SPLITS}
    return {**paths, "model": str(root / "model")}


def data_paths(world, task, train="train", valid="valid"):
    return (f"--config.train_path={world[f'{task}_{train}']}", f"--config.val_path={world[f'{task}_{valid}']}",
            f"--config.model_id={world['model']}")


def evals(run_dir):
    return [e for e in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "eval/acc" in e]


def without_speed(events):
    return [{k: v for k, v in e.items() if k != "train/tokens_per_s"} for e in events]


# -- GSM8K: CoT -> Coconut from its best checkpoint -> test-set evaluation --------------------------

GSM_COT = ("--config.num_epochs=2",)
GSM_COCONUT = ("--config.num_epochs=5",)  # resume=3 (the config): epochs 4-5, stage 1


@pytest.fixture(scope="session")
def gsm_chain(world, tmp_path_factory):
    """The chain run once: its directory and what each of its three commands printed."""
    def build(root):
        runs = {"cot": run_cli(root, *data_paths(world, "gsm"), *SIZES, *GSM_COT, config="configs/gsm_cot.py"),
                "coconut": run_cli(root, *data_paths(world, "gsm"), *SIZES, *GSM_COCONUT,
                                   f"--config.load_model_path={root}/gsm-cot/checkpoints", config="configs/gsm.py"),
                "eval": run_cli(root, *data_paths(world, "gsm", valid="test"), *SIZES,
                                f"--config.load_model_path={root}/gsm-coconut/checkpoints",
                                config="configs/gsm_eval.py")}
        for name, r in runs.items():
            (root / f"{name}.stdout").write_text(r.stdout)
    root = built_once(tmp_path_factory, "gsm_chain", build)
    return root, {p.stem: p.read_text() for p in root.glob("*.stdout")}


def test_gsm_cot_then_coconut_then_eval(gsm_chain):
    root, printed = gsm_chain
    with open(root / "gsm-cot" / "checkpoints" / "best.json") as f:
        best = json.load(f)["step"]
    # The Coconut run starts from the CoT run's best step (best.json), says so, and grows the vocabulary.
    assert f"weights from {root}/gsm-cot/checkpoints/{best} (best by accuracy" in printed["coconut"]
    cot_evals, coconut_evals = evals(root / "gsm-cot"), evals(root / "gsm-coconut")
    assert [e["stage"] for e in cot_evals] == [0, 0]
    assert [(e["epoch"], e["stage"], e["eval/thoughts"]) for e in coconut_evals] == [(4, 1, 2.0), (5, 1, 2.0)]
    # The evaluation reads the Coconut run's best step and evaluates at stage 25 // 3 -> 3 steps x 2 thoughts.
    assert f"{root}/gsm-coconut/checkpoints/" in printed["eval"]
    (final,) = evals(root / "gsm-coconut-eval")
    assert final["stage"] == 8 and final["eval/thoughts"] == 6.0
    preds = [json.loads(line) for line in open(root / "gsm-coconut-eval" / "predictions_epoch26.jsonl")]
    assert len(preds) == 6 and all(p["text"].count("<|latent|>") == 6 for p in preds)


def _wait_for(proc, ready, what, timeout=300):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill_at_checkpoint(proc, run_dir, step: int, what: str) -> None:
    """SIGKILL `proc` once its run has written checkpoint `step`."""
    _wait_for(proc, lambda: (run_dir / "checkpoints" / str(step)).is_dir(), what)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_run(ref_dir, run_dir) -> None:
    """The restarted run logged what the uninterrupted one logged (but its speed) and ended
    with bit-identical params."""
    assert without_speed(read_metrics(run_dir / "metrics.jsonl")) == without_speed(
        read_metrics(ref_dir / "metrics.jsonl"))
    jax.tree.map(np.testing.assert_array_equal, stored_params(ref_dir), stored_params(run_dir))


def test_coconut_run_killed_twice_resumes_exactly(gsm_chain, world, tmp_path):
    """SIGKILL right after the CoT weights are loaded (before any checkpoint of its own), then
    after a mid-epoch checkpoint; each restart is the same command. The result is the
    uninterrupted chain's: same metrics.jsonl, bit-identical final params."""
    root = gsm_chain[0]
    args = (*data_paths(world, "gsm"), *SIZES, *GSM_COCONUT, f"--config.load_model_path={root}/gsm-cot/checkpoints",
            "--config.checkpoint_every_steps=1")
    run = tmp_path / "gsm-coconut"
    proc = run_cli(tmp_path, *args, config="configs/gsm.py", popen=True, capture=True)
    for line in proc.stdout:
        if line.startswith("weights from"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints").is_dir() or not [n for n in os.listdir(run / "checkpoints") if n.isdigit()]
    proc = run_cli(tmp_path, *args, config="configs/gsm.py", popen=True)
    kill_at_checkpoint(proc, run, 7, "a mid-epoch checkpoint of the second epoch")
    r = run_cli(tmp_path, *args, config="configs/gsm.py")
    assert "resumed from" in r.stdout
    assert_same_run(root / "gsm-coconut", run)


def test_preempted_on_4_devices_resumed_on_2_continues_the_one_device_run(tiny_run, tmp_path):
    """A job preempted mid-epoch on 4 devices (data x fsdp = 2 x 2) comes back on 2 (1 x 2):
    the checkpoint is resharded on restore and the run ends where the uninterrupted run on one
    device ends (the same figures up to the reductions' float order)."""
    args = ("--config.checkpoint_every_steps=1",)
    proc = run_cli(tmp_path, *args, "--config.mesh.data=2", "--config.mesh.fsdp=2", devices=4, popen=True)
    run = tmp_path / "tiny"
    kill_at_checkpoint(proc, run, 6, "a mid-epoch checkpoint of the second epoch")
    r = run_cli(tmp_path, *args, "--config.mesh.data=1", "--config.mesh.fsdp=2", devices=2)
    assert "resumed from" in r.stdout and "epoch 2, batch 2" in r.stdout
    assert_first_epochs_match(tiny_run, run, epochs=3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), stored_params(tiny_run),
                 stored_params(run))


# -- ProsQA on 8 devices -> its evaluation on one ----------------------------------------------------

def test_prosqa_on_8_devices_then_eval_on_one(world, tmp_path):
    """Trained with data x fsdp = 4 x 2 and an evaluation batch (6) that 8 does not divide;
    evaluated in another process on one device: the same accuracy and loss."""
    run_cli(tmp_path, *data_paths(world, "prosqa"), *SIZES, "--config.num_epochs=2", "--config.epochs_per_stage=1",
            "--config.mesh.data=4", "--config.mesh.fsdp=2", devices=8, config="configs/prosqa.py")
    last = evals(tmp_path / "prosqa-coconut")[-1]
    step = max(int(n) for n in os.listdir(tmp_path / "prosqa-coconut" / "checkpoints") if n.isdigit())
    run_cli(tmp_path, *data_paths(world, "prosqa"), *SIZES, "--config.epochs_per_stage=1", "--config.resume=1",
            f"--config.load_model_path={tmp_path}/prosqa-coconut/checkpoints/{step}", "--config.only_eval_loss=True",
            config="configs/prosqa_eval.py")
    (again,) = evals(tmp_path / "prosqa-coconut-eval")
    assert last["stage"] == again["stage"] == 1
    for k in ("eval/acc", "eval/loss", "eval/thoughts"):
        assert again[k] == pytest.approx(last[k], abs=1e-5), k


# -- ProntoQA in two processes -> its evaluation in one ---------------------------------------------

def _count_evals(path):
    try:
        return open(path).read().count('"eval/acc"')
    except FileNotFoundError:
        return 0


def test_prontoqa_in_two_processes_sigterm_on_one_then_eval_in_one(world, tmp_path):
    """Two processes; SIGTERM reaches only process 1 after the first evaluation: both save the
    same step and exit (process 0 too, through the per-step agreement), no hang. The same
    command resumes both; the finished run's best checkpoint, evaluated in one process, gives
    the accuracy the two processes logged for it."""
    run = tmp_path / "prontoqa-coconut"
    args = (*data_paths(world, "prontoqa"), *SIZES, "--config.num_epochs=2", "--config.epochs_per_stage=1")

    def start():
        return start_processes(tmp_path, *args, config="configs/prontoqa.py")

    def finish(procs):
        return finish_processes(procs)[0]

    procs = start()
    _wait_for(procs[0], lambda: _count_evals(run / "metrics.jsonl") >= 1, "the first evaluation")
    procs[1].send_signal(signal.SIGTERM)
    out = finish(procs)
    assert "SIGTERM: saved step" in out
    assert _count_evals(run / "metrics.jsonl") < 2
    assert "resumed from" in finish(start())
    assert [e["stage"] for e in evals(run)] == [0, 1]
    best = json.load(open(run / "checkpoints" / "best.json"))
    ref = [e for e in evals(run) if e["step"] == best["step"]][0]
    run_cli(tmp_path, *data_paths(world, "prontoqa"), *SIZES, "--config.epochs_per_stage=1",
            f"--config.resume={ref['stage']}", f"--config.load_model_path={run}/checkpoints",
            "--config.only_eval_loss=True", config="configs/prontoqa_eval.py")
    (again,) = evals(tmp_path / "prontoqa-coconut-eval")
    assert again["stage"] == ref["stage"]
    for k in ("eval/acc", "eval/loss", "eval/thoughts"):
        assert again[k] == pytest.approx(ref[k], abs=1e-5), k


# -- a reference YAML, unchanged but for paths and sizes ---------------------------------------------

REFERENCE_PAUSE_YAML = """\
project: coconut
save_path: {save_path}
name: prosqa-pause
only_eval: False
coconut: False
cot: False
no_thoughts: False
no_cot: False
c_thought: 1
epochs_per_stage: 1
max_latent_stage: 6
pad_latent_to_max: True
save_only_improve: False
uniform_prob: 0.0
model_id: {model}
load_model_path: None
seed: 0
resume: 0
bf16: False
train_path: {train}
val_path: {valid}
reset_optimizer: True
batch_size_training: 2
debug: False
gradient_accumulation_steps: 1
num_epochs: 2
lr: !!float "1e-4"
weight_decay: 0.01
"""


def test_reference_yaml_with_every_method_flag_false_runs_as_pause_as_thought(world, tmp_path):
    """The reference runs a YAML whose four method flags are all false: latent tokens and markers,
    no feedback (pause as thought)."""
    path = tmp_path / "prosqa_pause.yaml"
    path.write_text(REFERENCE_PAUSE_YAML.format(save_path=tmp_path, model=world["model"], train=world["prosqa_train"],
                                                valid=world["prosqa_valid"]))
    run_cli(tmp_path, "--config.max_new_tokens=8", config=f"configs/yaml.py:{path}")
    assert json.load(open(tmp_path / "prosqa-pause" / "run.json"))["method"] == "pause_as_thought"
    assert [(e["stage"], e["eval/thoughts"]) for e in evals(tmp_path / "prosqa-pause")] == [(0, 0.0), (1, 1.0)]


# -- only_eval of every method ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought"])
def test_only_eval_of_every_method(world, tmp_path, method):
    """`only_eval` from a Hugging Face directory, in-process, at the stage `resume` implies."""
    from coconut_jax import config as config_lib
    from coconut_jax.train import run_config
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "prosqa_eval.py"))
    c.update(dict(method=method, save_path=str(tmp_path), cache_dir=str(tmp_path / "cache"), resume=2,
                  epochs_per_stage=1, model_id=world["model"], load_model_path=world["model"],
                  val_path=world["prosqa_valid"], max_new_tokens=8, eval_batch_size=6, print_examples=0,
                  only_eval_loss=method == "coconut"))
    _, result = run_config(c)
    thoughts = {"coconut": 2.0, "pause_as_thought": 2.0}.get(method, 0.0)
    assert result["stage"] == (2 if method not in ("cot", "no_cot") else 0)
    assert result["eval/thoughts"] == thoughts
    # The validation loss only when asked for (the reference's only_eval reports accuracy and CoT match).
    assert np.isfinite(result["eval/loss"]) if method == "coconut" else "eval/loss" not in result
    assert len(open(tmp_path / "prosqa-coconut-eval" / "predictions_epoch3.jsonl").readlines()) == 6


# -- Llama: CoT -> Coconut from its best checkpoint -> test-set evaluation, configs/gsm_llama.py ----

def test_gsm_llama_cot_then_coconut_then_eval(world, tmp_path):
    """The published Llama chain through its config (bf16 compute included) on a tiny Llama 3
    with an untied head: the Coconut run sizes both tables to the tokenizer and copies `<<`'s
    rows, and the evaluation runs at the last stage."""
    from coconut_jax import hf, tiny
    from coconut_jax.data import load_records
    texts = tiny.record_texts(load_records(world["gsm_train"]))
    model = tiny.build(texts, str(tmp_path / "llama"), vocab_size=400, n_layer=1, n_embd=32, n_head=4,
                       n_positions=512, family="llama", tied=False)
    paths = (f"--config.train_path={world['gsm_train']}", f"--config.val_path={world['gsm_valid']}",
             f"--config.model_id={model}")
    run_cli(tmp_path, *paths, *SIZES, "--config.num_epochs=1", config="configs/gsm_llama.py:cot")
    coconut = run_cli(tmp_path, *paths, *SIZES, "--config.num_epochs=3",
                      f"--config.load_model_path={tmp_path}/gsm-llama-cot/checkpoints", config="configs/gsm_llama.py")
    assert f"weights from {tmp_path}/gsm-llama-cot/checkpoints/" in coconut.stdout
    assert [(e["epoch"], e["stage"], e["eval/thoughts"]) for e in evals(tmp_path / "gsm-llama-coconut")] == \
        [(2, 1, 2.0), (3, 2, 4.0)]
    params = stored_params(tmp_path / "gsm-llama-coconut")
    assert params["wte"].shape == params["lm_head"].shape and params["wte"].shape[0] == len(hf.load_tokenizer(model))
    ev = run_cli(tmp_path, f"--config.val_path={world['gsm_test']}", f"--config.model_id={model}", *SIZES,
                 f"--config.load_model_path={tmp_path}/gsm-llama-coconut/checkpoints",
                 config="configs/gsm_llama.py:eval")
    assert f"{tmp_path}/gsm-llama-coconut/checkpoints/" in ev.stdout
    (final,) = evals(tmp_path / "gsm-llama-coconut-eval")
    assert final["stage"] == 6 and final["eval/thoughts"] == 6.0
