"""`coconut_jax.export` and `coconut_jax.generate` on trained runs (a LoRA run and a full
fine-tuning one): what they write and answer, and their one-line errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint, export, hf, trained, weights
from coconut_jax.metrics import read_metrics
from tests.conftest import LORA, ROOT, run_cli, subprocess_env

pytestmark = pytest.mark.slow  # trained runs and a CLI process per check (quick tier: -m "not slow")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def cli(module, *args, check=True):
    r = subprocess.run([sys.executable, "-m", f"coconut_jax.{module}", *map(str, args)], cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr[-3000:])
    return r


def one_line_error(r, *words):
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("model:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def _ids(v):
    return np.array([[3, 8, 17, v - 3, v - 1, v - 1, v - 2, 40, 5]])


def _lora_logits(run_dir, ids, step=None):
    """Our logits of a LoRA run's step, adapters unmerged (what the run itself computes)."""
    t = trained.from_run(str(run_dir), step)
    m, p = t.lora_model, t.lora_params
    h, _ = m.body(p, m.embed(p, ids), np.arange(ids.shape[1])[None], np.ones_like(ids))
    return t, np.asarray(m.logits(p, h))


def model_of_the_run(run_dir) -> int:
    """The step export and generate must pick, from the run's metrics: the best end-of-epoch
    evaluation of the last stage evaluated (the earliest of equals)."""
    evals = [e for e in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "eval/acc" in e]
    last = max(e["stage"] for e in evals)
    return max((e["eval/acc"], -e["step"]) for e in evals if e["stage"] == last)[1] * -1


def test_export_writes_what_from_pretrained_loads_with_the_same_logits(lora_run, tmp_path):
    out = tmp_path / "export"
    r = cli("export", lora_run, "--out", out)
    ckpt = lora_run / "checkpoints"
    assert f"exporting {ckpt}/{model_of_the_run(lora_run)} (best by accuracy (" in r.stdout
    assert "in the last stage reached), trained at stage 2 (2 thoughts)" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", trained.SETTINGS_FILE} <= set(os.listdir(out))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert "<|latent|>" in tok.get_vocab()
    t, ours = _lora_logits(lora_run, _ids(len(tok)))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = theirs(torch.tensor(_ids(len(tok)))).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-5, rtol=0)
    # An existing directory is never overwritten unless asked.
    one_line_error(cli("export", lora_run, "--out", out, check=False), "already exists")


def test_export_peft_loads_onto_the_resized_base_with_the_same_logits(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "adapters"
    r = cli("export", lora_run, "--out", out, "--peft", "--step", 4)
    assert "base: " in r.stdout and "resized to the tokenizer" in r.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] and config["fan_in_fan_out"] is True
    base_dir = lora_run / "prepared" / "model"
    assert config["base_model_name_or_path"] == str(base_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    _, ours = _lora_logits(lora_run, _ids(len(tok)), step=4)
    with torch.no_grad():
        got = model(torch.tensor(_ids(len(tok)))).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-5, rtol=0)


def test_generate_answers_as_the_run_evaluated(lora_run, tmp_path):
    """At an end-of-epoch step, the answers to the validation file are that epoch's predictions
    file, line for line; the exported directory answers the same."""
    valid = lora_run / "prepared" / "prosqa_valid.json"
    ckpt = str(lora_run / "checkpoints")
    step = checkpoint.steps(ckpt)[-1]
    epoch = checkpoint.read_meta(ckpt, step)["epoch"]
    want = [json.loads(x) for x in (lora_run / f"predictions_epoch{epoch}.jsonl").read_text().splitlines()]
    # No flag but the step: the run's own generation settings (configs/tiny.py: max_new_tokens=16,
    # eval_batch_size=16) are generate's defaults.
    r = cli("generate", lora_run, "--input", valid, "--step", step)
    assert [json.loads(x) for x in r.stdout.splitlines()] == want
    out = tmp_path / "export"
    cli("export", lora_run, "--out", out, "--step", step)
    assert json.loads((out / trained.SETTINGS_FILE).read_text())["max_new_tokens"] == 16
    r = cli("generate", out, "--input", valid)
    assert [json.loads(x) for x in r.stdout.splitlines()] == want


def test_generate_a_question_with_its_thoughts(lora_run):
    r = cli("generate", lora_run, "--question", "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus?",
            "--show-thoughts", "--top-k", 3, "--thoughts", 2, "--max-new-tokens", 8)
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert line["index"] == 0 and line["thoughts"] == 2 and 0 < line["new_tokens"] <= 8
    assert line["text"].count("<|latent|>") == 2 and len(line["thought_tokens"]) == 2
    assert set(line) >= {"text", "answer", "gold", "correct", "cot_match"}


def test_show_thoughts_lists_each_thought_top_tokens(lora_run):
    r = cli("generate", lora_run, "--question", "Alex is a wumpus. Is Alex a yumpus?", "--show-thoughts",
            "--top-k", 3, "--max-new-tokens", 4)
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    # The picked step's stage decides the thoughts (as many as a question with steps enough
    # gets at that stage), each shown with three tokens.
    stage = trained.from_run(str(lora_run)).settings["stage"]
    assert line["thoughts"] == len(line["thought_tokens"]) == min(stage, 2)
    assert all(len(top) == 3 and all(isinstance(s, str) and 0 <= p <= 1 for s, p in top)
               for top in line["thought_tokens"])


def test_the_cli_errors_are_one_line(lora_run, tiny_run, tmp_path):
    one_line_error(cli("export", tmp_path / "nowhere", "--out", tmp_path / "o", check=False),
                   "not a run directory")
    one_line_error(cli("export", lora_run, "--out", tmp_path / "o", "--step", 999, check=False),
                   "no step 999", "steps: ")
    one_line_error(cli("export", tiny_run, "--out", tmp_path / "o", "--peft", check=False),
                   "trained without LoRA")
    (tmp_path / "stray").mkdir()
    one_line_error(cli("generate", tmp_path / "stray", "--question", "hi", check=False),
                   "neither a run directory", "nor a Hugging Face directory")
    one_line_error(cli("generate", tmp_path / "missing", "--question", "hi", check=False), "not found")
    one_line_error(cli("generate", lora_run, "--question", "Every wumpus is a yumpus. " * 120, check=False),
                   "question 0", "context of 512 tokens")
    assert not (tmp_path / "o").exists()


def test_push_to_hub_uploads_the_written_directory(lora_run, tmp_path, capsys):
    class FakeApi:
        calls = []

        def create_repo(self, repo, exist_ok):
            self.calls.append(("create_repo", repo, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            self.calls.append(("upload_folder", folder_path, repo_id, sorted(os.listdir(folder_path))))

    api = FakeApi()
    out = tmp_path / "to_push"
    assert export.main([str(lora_run), "--out", str(out), "--push-to-hub", "someone/coconut-tiny"], api=api) == 0
    assert api.calls[0] == ("create_repo", "someone/coconut-tiny", True)
    assert api.calls[1][:3] == ("upload_folder", str(out), "someone/coconut-tiny")
    assert "model.safetensors" in api.calls[1][3]
    assert "uploaded to https://huggingface.co/someone/coconut-tiny" in capsys.readouterr().out


def test_a_full_fine_tuning_run_exports_and_its_export_is_a_load_model_path(tiny_run, tmp_path):
    """Without LoRA, the export is the checkpoint's params (every array, the latent rows
    included); evaluating it with only_eval at the stage it was trained at gives the accuracy
    the run logged for that epoch."""
    out = tmp_path / "export"
    cli("export", tiny_run, "--out", out)
    ckpt = os.path.join(tiny_run, "checkpoints")
    step = model_of_the_run(tiny_run)
    meta = checkpoint.read_meta(ckpt, step)
    config, params = hf.load_pretrained(str(out))
    stored = checkpoint.load_params(ckpt, step)
    flat = lambda tree: {"/".join(str(k.key) for k in path): np.asarray(v)
                         for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got, want = flat(params), flat(stored)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    prepared = os.path.join(tiny_run, "prepared")
    r = run_cli(tmp_path, "--config.prepare.kind=", f"--config.model_id={prepared}/model",
                f"--config.train_path={prepared}/prosqa_train.json", f"--config.val_path={prepared}/prosqa_valid.json",
                "--config.only_eval=True", f"--config.load_model_path={out}", f"--config.resume={meta['epoch'] - 1}",
                "--config.name=eval")
    logged = [e for e in read_metrics(os.path.join(tiny_run, "metrics.jsonl")) if e.get("epoch") == meta["epoch"]
              and "eval/acc" in e]
    got = [e for e in read_metrics(str(tmp_path / "eval" / "metrics.jsonl")) if "eval/acc" in e]
    assert got and logged and got[-1]["eval/acc"] == logged[-1]["eval/acc"], r.stdout[-2000:]


def test_a_lora_run_hands_off_to_the_next_with_its_adapters_merged(lora_run, tmp_path):
    """load_model_path = a LoRA run's step: evaluated alone it answers as the LoRA run did at that
    epoch; a LoRA run handed it trains new adapters on it (the adapters merged into its base,
    which its checkpoints record by source and digest)."""
    ckpt = lora_run / "checkpoints"
    step = checkpoint.steps(str(ckpt))[-1]
    prepared = lora_run / "prepared"
    data = (f"--config.train_path={prepared}/prosqa_train.json", f"--config.val_path={prepared}/prosqa_valid.json",
            "--config.prepare.kind=", f"--config.model_id={prepared}/model", f"--config.load_model_path={ckpt}/{step}",
            "--config.resume=2")
    run_cli(tmp_path, *data, "--config.only_eval=True", "--config.name=eval")
    logged = [e for e in read_metrics(str(lora_run / "metrics.jsonl")) if "eval/acc" in e][-1]
    got = [e for e in read_metrics(str(tmp_path / "eval" / "metrics.jsonl")) if "eval/acc" in e][-1]
    assert got["eval/acc"] == logged["eval/acc"]
    assert (tmp_path / "eval" / "predictions_epoch3.jsonl").read_text() == (
        lora_run / "predictions_epoch3.jsonl").read_text()
    run_cli(tmp_path, *data, *LORA, "--config.name=next")
    nxt = str(tmp_path / "next" / "checkpoints")
    meta = checkpoint.read_meta(nxt, checkpoint.steps(nxt)[-1])
    assert meta["base"]["source"]["kind"] == "ours" and meta["base"]["source"]["step"] == step
    tok = hf.load_tokenizer(str(prepared / "model"))
    _, merged, model = weights.checkpoint_params(weights.Source("ours", str(ckpt), step), "", tok)
    assert model.lora is not None and "token_rows" not in merged
    from coconut_jax.models import lora as lora_lib
    assert meta["base"]["digest"] == lora_lib.digest(merged)
