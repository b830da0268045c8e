"""Data pipeline: tokenization, per-method sequences, batching, order, preparation scripts."""
import dataclasses
import json

import numpy as np
import pytest

from coconut_jax import data, hf, latent_vocab, methods
from coconut_jax.data import IGNORE, Example, collate, training_sequence, eval_prompt
from coconut_jax.methods import Curriculum
from tests.conftest import SAMPLE_RECORDS, shared_file

TOK = latent_vocab.LatentTokens(start=100, end=101, latent=102, eos=0, pad=0)
S, E, L = TOK.start, TOK.end, TOK.latent
EX = Example(idx=7, question=(1, 2), steps=((10,), (20, 21), (30,)), answer=(40, 0))


# -- tokenization ---------------------------------------------------------------------------

def test_concatenation_invariant(tiny_dir):
    tok = hf.load_tokenizer(tiny_dir)
    examples = data.tokenize_records(SAMPLE_RECORDS, tok)
    for r, ex in zip(SAMPLE_RECORDS, examples):
        if not r["steps"]:  # the whole text then has "\n\n###": the invariant is about records with steps
            assert list(ex.answer) == tok("### " + r["answer"])["input_ids"] + [tok.eos_token_id]
            continue
        whole = r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"]
        expected = tok(whole)["input_ids"] + [tok.eos_token_id]
        assert list(ex.question) + [t for s in ex.steps for t in s] + list(ex.answer) == expected
        assert ex.question == tuple(tok(r["question"] + "\n")["input_ids"])
        assert ex.answer[-1] == tok.eos_token_id


def test_real_prosqa_tokenizes_and_caches(tiny_dir, tmp_path):
    path = shared_file("prosqa_valid.json")
    tok = hf.load_tokenizer(tiny_dir)
    records, ex = data.load_dataset(path, tok, max_size=50, cache_dir=str(tmp_path))
    assert len(ex) == 50 and len(list(tmp_path.iterdir())) == 1
    _, again = data.load_dataset(path, tok, max_size=50, cache_dir=str(tmp_path))
    assert again == ex


# -- sequences --------------------------------------------------------------------------------

CASES = [
    # method, stage, c_thought, max_stage, pad_to_max, expected input ids
    ("coconut", 0, 1, 2, True, [1, 2, S, E, 10, 20, 21, 30, 40, 0]),
    ("coconut", 1, 1, 2, True, [1, 2, S, L, E, 20, 21, 30, 40, 0]),
    ("coconut", 2, 2, 2, True, [1, 2, S, L, L, L, L, E, 30, 40, 0]),
    ("coconut", 3, 1, 2, True, [1, 2, S, L, L, E, 40, 0]),            # stage > max: all steps dropped
    ("coconut", 5, 1, 6, True, [1, 2, S, L, L, L, L, L, E, 40, 0]),   # stage > number of steps
    ("coconut", 9, 1, 6, True, [1, 2, S] + [L] * 6 + [E, 40, 0]),    # beyond max, padded to max
    ("coconut", 9, 1, 6, False, [1, 2, S, L, L, L, E, 40, 0]),       # beyond max, not padded
    ("cot", 0, 1, 2, True, [1, 2, 10, 20, 21, 30, 40, 0]),
    ("no_cot", 0, 1, 2, True, [1, 2, 40, 0]),
    ("no_thoughts", 1, 1, 2, True, [1, 2, 20, 21, 30, 40, 0]),
    ("no_thoughts", 3, 2, 2, True, [1, 2, 40, 0]),
    ("pause_as_thought", 1, 1, 2, True, [1, 2, S, L, E, 20, 21, 30, 40, 0]),
]


@pytest.mark.parametrize("method,stage,c,max_stage,pad,expected", CASES)
def test_training_sequences(method, stage, c, max_stage, pad, expected):
    cur = Curriculum(method=method, c_thought=c, max_latent_stage=max_stage, pad_latent_to_max=pad)
    ids, labels = training_sequence(EX, stage, cur, TOK)
    assert ids == expected
    n_head = len(EX.question) + (ids.count(L) + 2 if cur.markers else 0)
    assert labels == [IGNORE] * n_head + ids[n_head:]


@pytest.mark.parametrize("method,stage,c,max_stage,pad,expected", [
    ("coconut", 0, 1, 6, True, [1, 2, S, E]),
    ("coconut", 2, 2, 6, True, [1, 2, S, L, L, L, L, E]),
    ("coconut", 9, 1, 6, True, [1, 2, S] + [L] * 6 + [E]),
    ("coconut", 9, 1, 6, False, [1, 2, S, L, L, L, E]),
    ("cot", 0, 1, 6, True, [1, 2]),
    ("no_thoughts", 4, 1, 6, True, [1, 2]),
])
def test_eval_prompts(method, stage, c, max_stage, pad, expected):
    cur = Curriculum(method=method, c_thought=c, max_latent_stage=max_stage, pad_latent_to_max=pad)
    assert eval_prompt(EX, stage, cur, TOK) == expected


def test_stage_schedule():
    assert [Curriculum("coconut", epochs_per_stage=3).stage(e) for e in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert {Curriculum(m, epochs_per_stage=3).stage(9) for m in ("cot", "no_cot")} == {0}


def test_uniform_prob_draws_are_deterministic_and_in_range():
    n_steps = np.full(2000, len(EX.steps))
    cur = Curriculum(uniform_prob=0.5)
    a = data.draw_stages(n_steps, 2, cur, seed=1, epoch=3)
    assert np.array_equal(a, data.draw_stages(n_steps, 2, cur, seed=1, epoch=3))
    assert not np.array_equal(a, data.draw_stages(n_steps, 2, cur, seed=1, epoch=4))
    # half the records redraw uniformly from 0..3, of which 3/4 differ from 2
    assert set(a.tolist()) <= {0, 1, 2, 3} and abs(np.mean(a != 2) - 0.5 * 0.75) < 0.04


def test_unknown_method():
    with pytest.raises(ValueError, match="method 'latent' is not one of"):
        Curriculum(method="latent")


# -- batching ---------------------------------------------------------------------------------

def _seq(n_q, n_lat, n_tail):
    ids = list(range(1, n_q + 1)) + [S] + [L] * n_lat + [E] + [50] * n_tail
    return ids, [IGNORE] * (n_q + n_lat + 2) + [50] * n_tail


def test_batch_alignment_positions_masks_and_buckets():
    seqs = [_seq(5, 2, 3), _seq(9, 1, 7), _seq(3, 0, 2), _seq(7, 2, 1)]
    b = collate(seqs, [0, 1, 2, 3], latent_id=L, pad_id=0, batch_size=6, multiple=8)
    assert b.input_ids.shape == (6, 32) and b.input_ids.shape[1] % 8 == 0
    assert b.prefix_len == 16 and b.n_latent == 2
    for r, (ids, labels) in enumerate(seqs):
        real = np.nonzero(b.attention_mask[r])[0]
        assert b.input_ids[r, real].tolist() == ids and b.labels[r, real].tolist() == labels
        assert b.position_ids[r, real].tolist() == list(range(len(ids)))
        pads = b.attention_mask[r] == 0
        assert (b.position_ids[r, pads] == 0).all() and (b.labels[r, pads] == IGNORE).all()
        if L in ids:
            assert np.nonzero(b.input_ids[r] == L)[0][0] == b.prefix_len
    assert b.latent_mask.sum(1).tolist() == [2, 1, 0, 2, 0, 0]
    assert b.latent_mask[:, b.prefix_len:b.prefix_len + b.n_latent].sum() == b.latent_mask.sum()
    assert b.indices.tolist() == [0, 1, 2, 3, -1, -1] and b.attention_mask[4:].sum() == 0


def test_batch_without_latents_is_right_padded():
    b = collate([([1, 2, 3], [1, 2, 3]), ([4], [4])], [0, 1], latent_id=L, pad_id=0, batch_size=2, multiple=4)
    assert b.prefix_len == 0 and b.n_latent == 0
    assert b.input_ids.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]


def _plan(**kw):
    exs = [Example(i, (1,) * (1 + i % 5), ((2,),) * (i % 4), (3, 0)) for i in range(37)]
    args = dict(examples=exs, cur=Curriculum(), tokens=TOK, stage=2, epoch=1)
    settings = dict(seed=0, batch_size=8, multiple=8)
    for k, v in kw.items():
        (settings if k in {f.name for f in dataclasses.fields(data.PlanSettings)} else args)[k] = v
    return data.EpochPlan(**args, settings=data.PlanSettings(**settings))


def test_same_seed_and_epoch_same_batches_and_resume_mid_epoch():
    a, b = list(_plan().batches()), list(_plan().batches())
    assert len(a) == 5
    for x, y in zip(a, b):
        assert all(np.array_equal(x.arrays()[k], y.arrays()[k]) for k in x.arrays())
    assert not np.array_equal(a[0].indices, list(_plan(epoch=2).batches())[0].indices)
    rest = list(_plan().batches(start=3))
    assert [r.indices.tolist() for r in rest] == [x.indices.tolist() for x in a[3:]]
    seen = np.concatenate([x.indices for x in a])
    assert sorted(seen[seen >= 0].tolist()) == list(range(37))


def test_each_host_reads_its_slice():
    full = _plan().batch(1)
    parts = [_plan(host=h, num_hosts=2).batch(1) for h in range(2)]
    assert np.array_equal(np.concatenate([p.input_ids for p in parts]), full.input_ids)
    assert parts[0].prefix_len == parts[1].prefix_len == full.prefix_len


def test_overlong_sequences_error_or_skip(capsys):
    with pytest.raises(data.DataError, match=r"sequence\(s\) longer than the model context of 9 tokens \(records"):
        _plan(max_len=9)
    plan = _plan(max_len=9, overlong="skip")
    assert 0 < plan.num_sequences < 37 and "skipped" in capsys.readouterr().out


# -- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("", "file is empty"),
    ("{not json", "not valid JSON"),
    ('{"question": "q"}', "expected a JSON list of records"),
    ("[]", "the list of records is empty"),
    ('[{"question": "q", "answer": "a", "steps": []}, 3]', "record 1: expected an object"),
    ('[{"question": "q", "answer": "a"}]', "record 0: missing field 'steps'"),
    ('[{"question": "", "answer": "a", "steps": []}]', "record 0: field 'question' must be a non-empty string"),
    ('[{"question": "q", "answer": 4, "steps": []}]', "record 0: field 'answer' must be a string"),
    ('[{"question": "q", "answer": "a", "steps": "x"}]', "record 0: field 'steps' must be a list"),
    ('[{"question": "q", "answer": "a", "steps": ["x", 2]}]', "record 0: field 'steps' item 1 must be a string"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(data.DataError, match=message) as e:
        data.load_records(str(path))
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="dataset file not found"):
        data.load_records(str(tmp_path / "nope.json"))


def test_extra_keys_are_ignored(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps([{**SAMPLE_RECORDS[0], "edges": [[0, 1]], "root": 0}]))
    assert data.load_records(str(path))[0]["root"] == 0


def test_static_shapes_give_one_shape_per_epoch():
    shapes = {(b.input_ids.shape, b.prefix_len) for b in _plan(static_shapes=True, multiple=1).batches()}
    assert len(shapes) == 1
    assert len({(b.input_ids.shape, b.prefix_len) for b in _plan(multiple=1).batches()}) > 1


def _reference_batch(plan, k):
    """The obvious form of a plan's batch: each record's `training_sequence`, then `collate`."""
    order = plan._order[k * plan.settings.batch_size:(k + 1) * plan.settings.batch_size]
    stages = data.draw_stages(plan.ts.n_steps, plan.stage, plan.cur, plan.settings.seed, plan.epoch)
    seqs = [training_sequence(plan.ts[i], int(stages[i]), plan.cur, TOK) for i in order]
    return collate(seqs, order.tolist(), latent_id=L, pad_id=0, batch_size=plan.settings.batch_size,
                   multiple=plan.settings.multiple, min_prefix=plan._min_prefix, min_width=plan._min_width)


@pytest.mark.parametrize("method", methods.NAMES)
@pytest.mark.parametrize("kw", [dict(stage=2), dict(stage=5, static_shapes=True), dict(stage=1, uniform_prob=0.5),
                                dict(stage=4, c_thought=2, pad=False)])
def test_plan_batches_equal_per_record_sequences(method, kw):
    """The flat-array plan builds exactly what collating each record's sequence builds."""
    rng = np.random.default_rng(3)
    exs = [Example(i, tuple(rng.integers(1, 99, 1 + i % 6).tolist()),
                   tuple(tuple(rng.integers(1, 99, 1 + j % 3).tolist()) for j in range(i % 5)), (40 + i % 7, 0))
           for i in range(45)]
    cur = Curriculum(method, c_thought=kw.get("c_thought", 1), max_latent_stage=3, pad_latent_to_max=kw.get("pad", True),
                     uniform_prob=kw.get("uniform_prob", 0.0))
    plan = data.EpochPlan(exs, cur, TOK, kw["stage"], epoch=2, settings=data.PlanSettings(seed=5, batch_size=8,
                                                                                           multiple=4),
                          static_shapes=kw.get("static_shapes", False))
    for k in range(len(plan)):
        got, want = plan.batch(k), _reference_batch(plan, k)
        assert (got.prefix_len, got.n_latent) == (want.prefix_len, want.n_latent)
        for name, a in want.arrays().items():
            assert np.array_equal(got.arrays()[name], a), (name, k)
        assert np.array_equal(got.indices, want.indices)


def test_tokenized_set_round_trips_examples():
    exs = [Example(0, (1, 2), ((3,), (4, 5)), (6, 0)), Example(1, (7,), (), (8, 0))]
    ts = data.TokenizedSet.from_examples(exs)
    assert list(ts) == exs and ts[-1] == exs[1] and ts.n_steps.tolist() == [2, 0]
    assert list(ts.head(1)) == exs[:1]


def _cache_entry(tmp_path):
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return entry


def test_token_cache_is_verified_and_rebuilt(tiny_dir, tmp_path, capsys):
    tok = hf.load_tokenizer(tiny_dir)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(SAMPLE_RECORDS))
    cache = tmp_path / "cache"
    _, first = data.load_dataset(str(path), tok, cache_dir=str(cache))
    entry = _cache_entry(cache)
    # A hit needs no records at all: the JSON is not parsed.
    records, hit = data.load_dataset(str(path), tok, cache_dir=str(cache), with_records=False)
    assert records is None and hit == first and isinstance(hit.tokens, np.memmap)
    # A corrupt cache is reported and rebuilt, never trusted.
    tokens = np.load(entry / "tokens.npy")
    tokens[0] += 1
    np.save(entry / "tokens.npy", tokens)
    _, again = data.load_dataset(str(path), tok, cache_dir=str(cache))
    assert again == first and "unusable" in capsys.readouterr().out
    # Changed contents (same size) are a different cache.
    changed_records = [{**r, "question": r["question"].replace("a", "b")} for r in SAMPLE_RECORDS]
    path.write_text(json.dumps(changed_records))
    _, changed = data.load_dataset(str(path), tok, cache_dir=str(cache))
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2 and changed != first
