"""The Colab notebook runs top to bottom (on the seconds-long tiny setting)."""
import os

import pytest

from tests.conftest import run_notebook

pytestmark = pytest.mark.slow  # minutes of training or several processes (quick tier: -m "not slow")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    outputs = run_notebook("coconut_demo.ipynb", monkeypatch, COCONUT_NOTEBOOK_TINY=1,
                           COCONUT_NOTEBOOK_RUNS=tmp_path / "runs")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # curves, concept mass, accuracy by thoughts
    assert os.path.isfile(tmp_path / "runs" / "tiny" / "analysis" / "accuracy_by_k.png")
    # The SIM-CoT epoch and the decoder's text for each group of thoughts of question 0.
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "eval/steps" in text and "thoughts 1-1: " in text and "replaced: " in text
