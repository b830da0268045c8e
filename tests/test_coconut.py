"""The latent forward against the slow reference, the recurrence itself, loss, generation, metrics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coconut_jax import coconut, data, metrics, testing
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model

CFG = GPT2Config(vocab_size=61, n_positions=64, n_embd=32, n_layer=2, n_head=4)
MODEL = GPT2Model(CFG)
PARAMS = MODEL.init(0)
S, E, L, PAD, EOS = 58, 59, 60, 0, 0
TOK = type("T", (), {"start": S, "end": E, "latent": L, "pad": PAD, "eos": EOS})


def _seq(q, n_lat, tail):
    ids = list(range(1, q + 1)) + [S] + [L] * n_lat + [E] + list(range(20, 20 + tail))
    return ids, [data.IGNORE] * (q + n_lat + 2) + ids[q + n_lat + 2:]


def _batch(specs, multiple=8):
    seqs = [_seq(*s) for s in specs]
    return data.collate(seqs, list(range(len(seqs))), latent_id=L, pad_id=PAD, batch_size=len(seqs), multiple=multiple)


BATCHES = {
    "mixed_counts_c2_left_pad": [(5, 4, 6), (9, 2, 3), (3, 0, 8), (7, 4, 2)],   # c_thought 2: even counts
    "one_thought": [(4, 1, 5), (6, 1, 2)],
    "zero_latents": [(4, 0, 5), (6, 0, 2)],
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_fast_forward_equals_slow_reference(name):
    b = _batch(BATCHES[name])
    arrays = b.arrays()
    fast = jax.jit(lambda p: coconut.latent_forward(MODEL, p, arrays, b.prefix_len, b.n_latent))(PARAMS)
    slow = jax.jit(lambda p: testing.reference_hidden(MODEL, p, arrays))(PARAMS)
    real = b.attention_mask.astype(bool)
    assert np.abs(np.asarray(fast)[real] - np.asarray(slow)[real]).max() <= 1e-5
    labelled = np.roll(b.labels != data.IGNORE, -1, axis=1)  # positions that predict a label
    lf, ls = MODEL.logits(PARAMS, fast), MODEL.logits(PARAMS, slow)
    assert np.abs(np.asarray(lf)[labelled] - np.asarray(ls)[labelled]).max() <= 1e-5


def test_fast_gradients_equal_slow_reference():
    b = _batch(BATCHES["mixed_counts_c2_left_pad"])
    arrays = b.arrays()

    def fast(p):
        s, n = coconut.loss_terms(MODEL, p, arrays, b.prefix_len, b.n_latent)
        return s / n

    def slow(p):
        s, n = coconut.token_nll(MODEL.logits(p, testing.reference_hidden(MODEL, p, arrays)), arrays["labels"])
        return s / n

    (lf, gf), (ls, gs) = jax.jit(jax.value_and_grad(fast))(PARAMS), jax.jit(jax.value_and_grad(slow))(PARAMS)
    assert abs(float(lf) - float(ls)) <= 1e-5
    for a, c in zip(jax.tree.leaves(gf), jax.tree.leaves(gs)):
        assert np.abs(a - c).max() / max(np.abs(c).max(), 1e-12) <= 1e-4


def test_first_thought_is_the_hidden_state_before_the_first_latent():
    b = _batch([(5, 1, 3), (8, 1, 2)])
    arrays = b.arrays()
    p = b.prefix_len
    # Replace the latent token's embedding by hand with h[p-1] of a plain pass over the prefix
    # (whose hidden states do not depend on later positions), then run a plain pass.
    plain = MODEL.body(PARAMS, MODEL.embed(PARAMS, arrays["input_ids"]), arrays["position_ids"],
                       arrays["attention_mask"])[0]
    thought = plain[:, p - 1]
    emb = MODEL.embed(PARAMS, arrays["input_ids"]).at[:, p].set(thought)
    by_hand = MODEL.body(PARAMS, emb, arrays["position_ids"], arrays["attention_mask"])[0]
    fast = coconut.latent_forward(MODEL, PARAMS, arrays, p, b.n_latent)
    real = b.attention_mask.astype(bool)
    assert np.abs(np.asarray(fast)[real] - np.asarray(by_hand)[real]).max() <= 1e-5
    # and it differs from the plain LM pass (where the latent keeps its token embedding)
    assert np.abs(np.asarray(fast)[:, p] - np.asarray(plain)[:, p]).max() > 1e-3


def test_no_feedback_is_a_plain_lm_pass():
    b = _batch([(5, 2, 3)])
    arrays = b.arrays()
    plain = MODEL.body(PARAMS, MODEL.embed(PARAMS, arrays["input_ids"]), arrays["position_ids"],
                       arrays["attention_mask"])[0]
    got = coconut.latent_forward(MODEL, PARAMS, arrays, b.prefix_len, b.n_latent, feedback=False)
    assert np.array_equal(np.asarray(got), np.asarray(plain))


def test_token_nll_sum_and_count():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [1.0, 1e-9]]]))
    labels = jnp.array([[data.IGNORE, 1, data.IGNORE]])
    s, n = coconut.token_nll(logits, labels)
    assert float(n) == 1 and abs(float(s) + np.log(0.5)) < 1e-6


# -- generation --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peaked():
    """Random model with sharp next-token distributions, so argmax is stable across batch shapes."""
    params = dict(MODEL.init(5))
    params["wte"] = params["wte"] * 8.0
    return params


def _prompts():
    return [list(range(1, 6)) + [S, L, L, E], list(range(7, 16)) + [S, L, E], [3, 4] + [S, E], list(range(30, 37))]


def _generate(params, prompts, max_new, eos=EOS):
    b = data.collate([(p, None) for p in prompts], list(range(len(prompts))), latent_id=L, pad_id=PAD,
                     batch_size=len(prompts), multiple=8)
    toks, kept = coconut.generate(MODEL, params, b.arrays(), eos, prefix_len=b.prefix_len, n_latent=b.n_latent,
                                  max_new_tokens=max_new)
    return [np.asarray(toks)[r, :int(kept[r])].tolist() for r in range(len(prompts))]


class _JittedModel:
    """MODEL with its passes jitted (the slow reference then runs at compiled speed)."""
    embed, body, logits = jax.jit(MODEL.embed), jax.jit(MODEL.body), jax.jit(MODEL.logits)


def _naive(params, prompt, max_new, eos=EOS):
    """The reference's way: re-run the whole (latent) forward for every new token, batch size 1
    (padded to a multiple of 16, which attention masks out, to bound the compiles)."""
    ids = list(prompt)
    out = []
    for i in range(max_new):
        b = data.collate([(ids, None)], [0], latent_id=L, pad_id=PAD, batch_size=1, multiple=16)
        h = testing.reference_hidden(_JittedModel, params, b.arrays())
        last = int(np.nonzero(b.attention_mask[0])[0][-1])
        nxt = int(jnp.argmax(_JittedModel.logits(params, h[0, last])))
        if i > 0 and nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def test_batched_generation_equals_one_at_a_time(peaked):
    prompts = _prompts()
    batched = _generate(peaked, prompts, 12)
    singles = [_generate(peaked, [p], 12)[0] for p in prompts]
    assert batched == singles
    assert batched == [_naive(peaked, p, 12) for p in prompts]
    assert all(1 <= len(x) <= 12 for x in batched)


def test_eos_stops_a_row_but_the_first_token_is_always_kept(peaked):
    prompts = _prompts()
    free = _generate(peaked, prompts, 12, eos=-1)
    assert all(len(x) == 12 for x in free)
    # Make row 0's first token the EOS: it is still kept, and the reference's loop agrees.
    first = free[0][0]
    got = _generate(peaked, prompts, 12, eos=first)
    assert got[0][0] == first
    assert got == [_naive(peaked, p, 12, eos=first) for p in prompts]
    # Each row, generated without EOS, cut before its first EOS after position 0: rows that
    # repeat the EOS token stop after one token, a row that never makes it runs to the limit.
    expected = [row[:next((j for j in range(1, len(row)) if row[j] == first), len(row))] for row in free]
    assert got == expected
    assert any(len(row) == 1 for row in expected) and any(len(row) == 12 for row in expected), expected


# -- metrics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,gold,correct", [
    ("Q?\n<<2*3=6>>\n### 6", "6", True),
    ("Q?\n### 1,000", "1000", True),
    ("Q?\n### 1000", "1,000", True),
    ("Q?\n### 18 ", " 18", True),
    ("Q?\n#### 18", "18", True),
    ("Q?\n### 19", "18", False),
    ("Q?\nno answer", "18", False),
    ("Every a is b. Is Tom a b or c?\n<|start-latent|><|latent|><|end-latent|>### Tom is a b.", "Tom is a b.", True),
])
def test_answer_extraction(text, gold, correct):
    assert metrics.is_correct(text, gold) is correct


def test_cot_match():
    assert metrics.cot_matches("Q?\n<<1+1=2>>\n<<2*2=4>>\n### 4", ["<<1+1=2>>", "<<2*2=4>>"])
    assert not metrics.cot_matches("Q?\n<<1+1=2>>\n### 2", ["<<1+1=2>>", "<<2*2=4>>"])
    assert not metrics.cot_matches("Q?\n<|start-latent|><|latent|><|end-latent|><<2*2=4>>\n### 4", ["<<2*2=4>>"])
    assert metrics.cot_matches("Q?\n### 4", [])


# -- execution options: the same computation --------------------------------------------------

_REFERENCE_LOSS = {}


def _loss_and_grads(cfg, model, params, b, key):
    def f(p):
        s, n = coconut.loss_terms(model, p, b.arrays(), b.prefix_len, b.n_latent, dropout_key=key)
        return s / n
    return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize("kw,dropout", [(dict(), False), (dict(scan_layers=True), False), (dict(remat="full"), False),
                                        (dict(scan_layers=True, remat="dots"), True)],
                         ids=["fused", "scan", "remat_full", "scan_dots_dropout"])
def test_scanned_rematerialised_fused_layers_give_the_same_loss_and_gradients(kw, dropout):
    """Every way of running the layers gives the loss and gradients of the plain per-layer
    loop with the per-segment attention (the reference form), through the latent passes;
    with dropout, the same keys drop the same units."""
    cfg = GPT2Config(vocab_size=61, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                     **({} if dropout else dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)))
    reference = GPT2Model(cfg, fused_attention=False)
    params = reference.init(1)
    b = _batch(BATCHES["mixed_counts_c2_left_pad"])
    key = jax.random.key(3) if dropout else None
    if dropout not in _REFERENCE_LOSS:
        _REFERENCE_LOSS[dropout] = _loss_and_grads(cfg, reference, params, b, key)
    l0, g0 = _REFERENCE_LOSS[dropout]
    l1, g1 = _loss_and_grads(cfg, reference.replace(**{"fused_attention": True, **kw}), params, b, key)
    assert abs(float(l0) - float(l1)) <= 1e-5 * abs(float(l0))
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(a) - np.asarray(c)).max() <= 1e-4 * max(np.abs(np.asarray(a)).max(), 1e-8)


def test_chunked_loss_equals_full_logits_loss_and_gradients():
    b = _batch(BATCHES["mixed_counts_c2_left_pad"], multiple=8)
    assert b.input_ids.shape[1] - 1 > 5  # several chunks, the last one partial

    @functools.partial(jax.jit, static_argnums=1)
    def f(p, chunk):
        def total(q):
            return coconut.loss_terms(MODEL, q, b.arrays(), b.prefix_len, b.n_latent, loss_chunk=chunk)
        return jax.value_and_grad(total, has_aux=True)(p)
    ((s0, n0), g0), ((s1, n1), g1) = f(PARAMS, 0), f(PARAMS, 5)
    assert float(n0) == float(n1) and abs(float(s0) - float(s1)) <= 1e-6 * abs(float(s0))
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(a) - np.asarray(c)).max() <= 1e-6 * max(np.abs(np.asarray(a)).max(), 1e-8) + 1e-7
