"""Latent-thought analysis on the tiny trained run."""
import os

import numpy as np
import pytest

from coconut_jax import analysis, data, evaluate, testing, methods, answers
from coconut_jax.metrics import read_metrics


@pytest.fixture(scope="module")
def trained(tiny_run):
    from configs import tiny
    c = tiny.get_config()
    c.save_path = os.path.dirname(tiny_run)
    c.cache_dir = os.path.join(c.save_path, "cache")
    return analysis.load_trained(c)


def _prompt(t, question=0, k=2):
    cur = methods.Curriculum(t.cur.method, t.cur.c_thought, k, t.cur.epochs_per_stage)
    return data.eval_prompt(t.val_examples[question], k, cur, t.tokens)


def test_thoughts_are_the_hidden_states_before_each_latent(trained):
    t = trained
    prompt = _prompt(t)
    states = answers.thoughts(t.model, t.params, prompt, t.tokens)
    assert states.shape == (2, t.model.config.n_embd)
    b = data.collate([(prompt, None)], [0], latent_id=t.tokens.latent, pad_id=t.tokens.pad, batch_size=1, multiple=1)
    slow = np.asarray(testing.reference_hidden(t.model, t.params, b.arrays()))[0]
    where = [i for i, tok in enumerate(prompt) if tok == t.tokens.latent]
    np.testing.assert_allclose(states, slow[np.array(where) - 1], atol=1e-5)
    # The second thought is computed with the first one fed back, so they differ.
    assert np.abs(states[0] - states[1]).max() > 1e-4


def test_decoded_thoughts_are_sorted_probabilities(trained):
    t = trained
    states = answers.thoughts(t.model, t.params, _prompt(t), t.tokens)
    decoded = analysis.decode_thoughts(t.model, t.params, states, t.tok, top_k=4)
    assert len(decoded) == 2 and all(len(row) == 4 for row in decoded)
    for row in decoded:
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(isinstance(text, str) for text, _ in row)
    full = analysis.thought_distributions(t.model, t.params, states)
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-6)


def test_concept_mass_is_normalised_over_the_graph(trained):
    t = trained
    record = t.val_records[t.val_examples[0].idx]
    states = answers.thoughts(t.model, t.params, _prompt(t), t.tokens)
    cm = analysis.concept_mass(t.model, t.params, states, record, t.tok)
    n = len(record["idx_to_symbol"])
    assert cm.mass.shape == cm.normalised.shape == (2, n) and cm.concepts == record["idx_to_symbol"]
    assert (cm.mass >= 0).all() and (cm.mass.sum(axis=1) <= 1 + 1e-6).all()
    np.testing.assert_allclose(cm.normalised.sum(axis=1), 1.0, atol=1e-6)
    # Each concept's mass is its first token's probability, split among concepts sharing it.
    probs = analysis.thought_distributions(t.model, t.params, states)
    first = [t.tok.encode(" " + name, add_special_tokens=False)[0] for name in cm.concepts]
    for i, tok in enumerate(first):
        np.testing.assert_allclose(cm.mass[:, i], probs[:, tok] / first.count(tok), rtol=1e-9)


def test_frontier_nodes_are_distances_from_the_person():
    record = {"root": 0, "edges": [[0, 2], [2, 3], [3, 4], [0, 4], [1, 5]],
              "idx_to_symbol": ["Tom", "Ann", "wumpus", "yumpus", "zumpus", "dumpus"]}
    assert analysis.frontier_nodes(record) == {0: 0, 2: 1, 4: 1, 3: 2}


def test_accuracy_by_thoughts_matches_the_training_evaluation(trained, tiny_run):
    t = trained
    acc = analysis.accuracy_by_thoughts(t.model, t.params, t.val_examples, t.val_records, t.cur, t.tokens, t.tok,
                                        max_k=2, batch_size=evaluate.eval_rows_for(t.c),
                                        max_new_tokens=evaluate.max_new_tokens_for(t.c),
                                        multiple=t.c.pad_to_multiple)
    assert sorted(acc) == [0, 1, 2] and all(0.0 <= a <= 1.0 for a in acc.values())
    final = [e for e in read_metrics(os.path.join(tiny_run, "metrics.jsonl")) if "eval/acc" in e][-1]
    assert final["stage"] == 2 and acc[2] == pytest.approx(final["eval/acc"])


def test_report_writes_plots(trained, tmp_path):
    out = analysis.report(trained, question=0, top_k=3, max_k=1, out_dir=str(tmp_path))
    for key in ("concept_plot", "accuracy_plot"):
        with open(out[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(out["accuracy_by_k"]) == [0, 1]
