"""The GPU/TPU notebook runs top to bottom offline: `COCONUT_COLAB_OFFLINE` gives it tiny local
models in place of the hub's GPT-2 and Llama-3.2-1B and generated ProsQA-style files in place of
the download, so every cell is known to run; only the install line and the hub ids are not."""
import json
import os

import pytest

from tests.conftest import run_notebook

pytestmark = pytest.mark.slow  # two short trainings and several CLI runs (quick tier: -m "not slow")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _offline_dir(path):
    from coconut_jax import tiny
    from data_prep import prosqa_generator
    records = prosqa_generator.generate(48, seed=0)
    (path / "prosqa").mkdir(parents=True)
    for split, part in (("train", records[:40]), ("valid", records[40:])):
        (path / "prosqa" / f"prosqa_{split}.json").write_text(json.dumps(part))
    texts = tiny.record_texts(records)
    for family in ("gpt2", "llama"):
        tiny.build(texts, str(path / family), vocab_size=400, n_layer=1, n_embd=32, n_head=2, n_positions=1024,
                   family=family, tied=family == "gpt2")


def test_gpu_notebook_runs_top_to_bottom_offline(tmp_path, monkeypatch):
    _offline_dir(tmp_path / "offline")
    outputs = run_notebook("coconut_gpu.ipynb", monkeypatch, COCONUT_COLAB_OFFLINE=tmp_path / "offline",
                           COCONUT_NOTEBOOK_RUNS=tmp_path / "runs")
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2  # curves, accuracy by thoughts
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "thought 1:" in text and "config.json" in text and "adapter_model.safetensors" in text
    runs = tmp_path / "runs"
    assert (runs / "export" / "gpt2-coconut-prosqa" / "model.safetensors").is_file()
    assert (runs / "export" / "llama-coconut-prosqa-lora" / "adapter_config.json").is_file()
    meta_dirs = os.listdir(runs / "prosqa-llama-lora" / "checkpoints")
    assert any(d.isdigit() for d in meta_dirs)
