import json
import subprocess
import sys

import numpy as np
import pytest

from data_prep import gsm8k, prontoqa, prosqa_generator
from data_prep.common import PrepError
from tests.conftest import shared_file

ICOT = """Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?||<<48/2=24>> <<48+24=72>> #### 72
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?||<<12/60=0.2>> <<0.2*50=10>> #### 10
A shop sells 1,000 pens.||<<1000*1=1000>> #### 1,000
"""


def test_gsm8k_conversion_of_literal_lines():
    r = gsm8k.convert_text(ICOT, "x")
    assert r[0] == {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                "clips in May. How many clips did Natalia sell altogether in April and May?",
                    "steps": ["<<48/2=24>>", "<<48+24=72>>"], "answer": "72"}
    assert r[1]["steps"] == ["<<12/60=0.2>>", "<<0.2*50=10>>"] and r[1]["answer"] == "10"
    assert r[2]["answer"] == "1,000"


def test_gsm8k_bad_line():
    with pytest.raises(PrepError, match="x: line 2: expected 'question"):
        gsm8k.convert_text("q||<<1=1>> #### 1\nno separator here\n", "x")


def test_gsm8k_script_on_the_real_valid_file(tmp_path):
    src = shared_file("gsm_valid.txt")
    out = subprocess.run([sys.executable, "-m", "data_prep.gsm8k", "--out", str(tmp_path), "--splits", "valid",
                          "--valid", src], capture_output=True, text=True, check=True).stdout
    assert "gsm_valid.json: 500 records" in out
    records = json.loads((tmp_path / "gsm_valid.json").read_text())
    assert records[0]["answer"] == "300" and records[0]["steps"][0] == "<<4-2=2>>"


def test_missing_input_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_prep.gsm8k", "--out", str(tmp_path), "--splits", "valid",
                        "--valid", str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert r.returncode != 0 and "nope.txt: input file not found" in r.stderr


def test_prontoqa_conversion():
    raw = {"example1": {"test_example": {"question": "Every cat is a feline. Max is a cat.", "query": "True or false: Max is a feline.",
                                         "chain_of_thought": ["Max is a cat.", "Every cat is a feline.", "Max is a feline."],
                                         "answer": "True"}}}
    r = prontoqa.convert(raw, "x")
    assert r == [{"question": "Every cat is a feline. Max is a cat. True or false: Max is a feline.",
                  "steps": ["Max is a cat. Every cat is a feline.", "Max is a feline."], "answer": "True"}]
    with pytest.raises(PrepError, match="x: example 'e': missing field"):
        prontoqa.convert({"e": {"test_example": {"question": "q"}}}, "x")


def _reachable(edges, src):
    children = {}
    for p, c in edges:
        children.setdefault(p, []).append(c)
    seen, stack = {src}, [src]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return seen


def test_generator_answers_are_correct_and_well_formed():
    for r in prosqa_generator.generate(200, seed=3):
        names = r["idx_to_symbol"]
        reach = _reachable(r["edges"], r["root"])
        assert r["target"] in reach and r["neg_target"] not in reach
        person = names[r["root"]]
        assert r["answer"] == f"{person} is a {names[r['target']]}."
        assert r["question"].endswith("?") and names[r["neg_target"]] in r["question"].split("Is ")[-1]
        assert r["steps"][0].startswith(person + " is a ") and r["steps"][-1].endswith(f"{names[r['target']]}.")
        assert 3 <= len(r["steps"]) <= 6
        for s in r["steps"]:
            assert s in r["question"]


def test_generator_statistics_match_the_published_ones():
    stats = prosqa_generator.graph_statistics(prosqa_generator.generate(1000, seed=0))
    published = {"nodes": 23.0, "edges": 36.0, "shortest_path": 3.8}
    for key, value in published.items():
        assert abs(stats[key] - value) / value <= 0.10, (key, stats[key])


def test_weighted_sample_draws_exactly_as_numpy_choice():
    """The generator's sampler stands in for `rng.choice(..., replace=False, p=...)`: the same
    indices from the same draws, so the data a seed made before is the data it makes now."""
    pick = np.random.default_rng(7)
    for trial in range(3000):
        n = int(pick.integers(1, 30))
        w = [1.5 * int(d) + 1 for d in pick.integers(0, 12, n)]
        k = int(pick.integers(1, n + 1))
        a, b = np.random.default_rng(trial), np.random.default_rng(trial)
        expected = a.choice(n, size=k, replace=False, p=np.array(w) / np.sum(w)).tolist()
        assert prosqa_generator._weighted_sample(b, w, k) == expected, (w, k)
        assert a.random() == b.random()  # the same number of draws taken


def test_generator_is_seeded():
    assert prosqa_generator.generate(5, seed=1) == prosqa_generator.generate(5, seed=1)
    assert prosqa_generator.generate(5, seed=1) != prosqa_generator.generate(5, seed=2)
