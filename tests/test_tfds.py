"""Coconut data as TensorFlow Datasets: the packer, `tfds:NAME/SPLIT` paths, and the same
records, order and batches as from the JSON files they were made from."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from coconut_jax import data, hf, latent_vocab, tfds_source, methods
from coconut_jax.metrics import read_metrics
from tests.conftest import ROOT, SAMPLE_RECORDS, run_cli

tfds = pytest.importorskip("tensorflow_datasets")

from data_prep import tfds as packer  # noqa: E402  (needs the extra)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A GSM-like pair of files and a ProsQA-like one, packed into one TFDS data_dir."""
    from data_prep import prosqa_generator
    from data_prep.common import write_json
    from tests.test_journeys import gsm_records
    root = tmp_path_factory.mktemp("tfds")
    files = {"gsm_train": gsm_records(40, 0), "gsm_valid": gsm_records(6, 1)}
    for split, records in files.items():
        write_json(records, str(root / f"{split}.json"))
    g = prosqa_generator.GraphConfig(min_nodes=5, max_nodes=7, n_concepts=20, steps_distribution=((2, 1.0),))
    write_json(prosqa_generator.generate(12, seed=0, g=g), str(root / "prosqa_valid.json"))
    data_dir = str(root / "tfds")
    packer.pack([str(root / "gsm_train.json"), str(root / "gsm_valid.json")], "coconut_gsm8k", data_dir)
    packer.pack([str(root / "prosqa_valid.json")], "coconut_prosqa", data_dir)
    return root, data_dir


def _json(root, split):
    return data.load_records(str(root / f"{split}.json"))


@pytest.mark.parametrize("name,split", [("coconut_gsm8k", "gsm_train"), ("coconut_gsm8k", "gsm_valid"),
                                        ("coconut_prosqa", "prosqa_valid")])
def test_records_are_the_json_records_in_order(packed, name, split):
    root, data_dir = packed
    got = tfds_source.read_records(f"tfds:{name}/{split}", data_dir)
    assert got == _json(root, split)  # ProsQA's graph fields included


def test_max_size_reads_the_first_records(packed):
    root, data_dir = packed
    assert tfds_source.read_records("tfds:coconut_gsm8k/gsm_train", data_dir, 5) == _json(root, "gsm_train")[:5]


def test_identical_batches_for_the_same_seed(packed, tiny_dir, tmp_path, monkeypatch):
    root, data_dir = packed
    tok = hf.load_tokenizer(tiny_dir)
    _, from_json = data.load_dataset(str(root / "gsm_train.json"), tok)
    _, from_tfds = data.load_dataset("tfds:coconut_gsm8k/gsm_train", tok, cache_dir=str(tmp_path),
                                     tfds_data_dir=data_dir)
    assert from_tfds == from_json

    def no_reading(*a, **k):
        raise AssertionError("records read despite the token cache")
    monkeypatch.setattr(tfds_source, "read_records", no_reading)
    _, cached = data.load_dataset("tfds:coconut_gsm8k/gsm_train", tok, cache_dir=str(tmp_path),
                                  with_records=False, tfds_data_dir=data_dir)
    assert cached == from_json
    cur = methods.Curriculum("coconut", 1, 2, 1)
    tokens = latent_vocab.latent_tokens(tok)
    for stage, epoch in ((0, 0), (2, 3)):
        plans = [data.EpochPlan(ts, cur, tokens, stage, epoch, data.PlanSettings(seed=7, batch_size=8)) for ts in (from_json, from_tfds)]
        for a, b in zip(plans[0].batches(), plans[1].batches()):
            assert all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))


@pytest.mark.slow
def test_training_on_tfds_paths_equals_training_on_the_files(packed, tmp_path):
    """The CLI on tfds:NAME/SPLIT paths logs exactly what it logs on the JSON files."""
    root, data_dir = packed
    sizes = ("--config.global_batch_size=8", "--config.eval_batch_size=6", "--config.max_new_tokens=8",
             "--config.print_examples=0", "--config.num_epochs=1")
    model = hf.resolve_model_dir(_model(root))
    runs = {"json": (f"--config.train_path={root}/gsm_train.json", f"--config.val_path={root}/gsm_valid.json"),
            "tfds": ("--config.train_path=tfds:coconut_gsm8k/gsm_train", "--config.val_path=tfds:coconut_gsm8k/gsm_valid",
                     f"--config.tfds_data_dir={data_dir}")}
    for name, paths in runs.items():
        run_cli(tmp_path, *paths, *sizes, f"--config.name={name}", f"--config.model_id={model}",
                config="configs/gsm_cot.py")
    strip = lambda events: [{k: v for k, v in e.items() if k != "train/tokens_per_s"} for e in events]  # noqa: E731
    assert strip(read_metrics(tmp_path / "json" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "tfds" / "metrics.jsonl"))
    with open(tmp_path / "tfds" / "run.json") as f:
        assert json.load(f)["tfds_data_dir"] == data_dir


def _model(root):
    from coconut_jax import tiny
    path = root / "model"
    if not path.is_dir():
        texts = tiny.record_texts(_json(root, "gsm_train"))
        tiny.build(texts, str(path), vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=256)
    return str(path)


def test_packer_command_line_and_its_errors(packed, tmp_path):
    root, _ = packed
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def pack(*args):
        return subprocess.run([sys.executable, "-m", "data_prep.tfds", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True)
    out = str(tmp_path / "out")
    r = pack("--data", f"{root}/gsm_valid.json", "--name", "coconut_small", "--data_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tfds:coconut_small/gsm_valid" in r.stdout
    # The same command again would mix two packings: refused, the dataset untouched.
    r = pack("--data", f"{root}/gsm_valid.json", "--name", "coconut_small", "--data_dir", out)
    assert r.returncode == 2 and "already exists (pass --overwrite" in r.stderr
    assert tfds_source.read_records("tfds:coconut_small/gsm_valid", out) == _json(root, "gsm_valid")
    # A bad record: the JSON loader's one-line error, nothing written.
    bad = [dict(SAMPLE_RECORDS[0]), {"question": "q", "steps": ["a", 3], "answer": "x"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = pack("--data", str(tmp_path / "bad.json"), "--name", "coconut_bad", "--data_dir", out)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path}/bad.json: record 1: field 'steps' item 1 must be a string, found int"
    assert not os.path.exists(os.path.join(out, "coconut_bad"))


@pytest.mark.parametrize("path,message", [
    ("tfds:coconut_gsm8k", "a TFDS source is written tfds:NAME/SPLIT"),
    ("tfds:coconut_gsm8k/gsm_test", "tfds:coconut_gsm8k/gsm_test: no such TFDS dataset split"),
    ("tfds:nothing_here/train", "tfds:nothing_here/train: no such TFDS dataset split"),
])
def test_bad_tfds_paths_are_one_line_errors(packed, path, message):
    _, data_dir = packed
    with pytest.raises(data.DataError, match=message) as e:
        data.load_dataset(path, None, tfds_data_dir=data_dir)
    assert "\n" not in str(e.value)


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(data.DataError, match=r"needs tensorflow-datasets \(pip install 'coconut_jax\[tfds\]'\)"):
        data.load_dataset("tfds:coconut_gsm8k/gsm_train", None)
