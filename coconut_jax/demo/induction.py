"""Starting a small GPT-2 with an in-context lookup circuit (induction heads) wired in.

A pretrained GPT-2 brings heads that find an earlier occurrence of a pattern and copy what
followed it; Coconut's ProsQA results rest on them. A GPT-2 trained from random weights has to
grow them first, and on ProsQA-style facts that takes far longer than the demo's CPU budget
(`benchmarks/lookup.py` measures it). `wire_induction_heads` sets the initial weights of a
2+-layer GPT-2 so that, for facts written "<subject> is a <object>" (or "Every <subject> is a
<object>"), the position after "<subject> is a" attends to the object of the fact with the same
subject. The architecture is unchanged (an ordinary GPT-2 checkpoint comes out) and every weight
stays trainable; only where training starts differs.

The residual stream is split into four blocks of one head's width `D`:

    [0, D)     token identity (the token embeddings live here at first)
    [D, 2D)    copy of the token `query_offset` places back, written by layer-0 head 0
    [2D, 3D)   copy of the token `key_offset` places back, written by layer-0 head 1
    [3D, 4D)   position: sines and cosines of D/2 frequencies

Layer-0 heads attend to a fixed offset through the position block: the position embedding of
step i holds (sin wi, cos wi) pairs, and a query rotated by w*k matches the key k steps back.
Layer-1 head 0 matches the two copy blocks (its query reads block 1, its key block 2, one basis)
and copies the token at the matched position back into the token block, which the tied LM head
reads as that token's logit.
"""
from __future__ import annotations

import numpy as np

from coconut_jax.models.gpt2 import GPT2Config

# Logit margin (in units of a matching dot product) that makes an initial head attend to its
# target with weight ~1: large enough to be sharp, small enough to leave gradients through softmax.
_SHARPNESS = 2.0
_POSITION_RMS = 0.05


def _frequencies(n: int, rng: np.random.Generator) -> np.ndarray:
    # Incommensurate frequencies in (0.15, 3): their cosines add up to n only at offset 0, so a
    # shifted match has no aliases within a sequence (evenly spaced ones would repeat).
    return np.sort(rng.uniform(0.15, 3.0, n))


def wire_induction_heads(config: GPT2Config, params: dict, query_offset: int = 2, key_offset: int = 3,
                         seed: int = 0) -> dict:
    """`params` (a fresh random GPT-2, left unchanged) with the lookup circuit described above.

    The arrays it rewrites come back as numpy arrays, the others as they were.
    """
    if not isinstance(config, GPT2Config):
        raise ValueError(f"induction heads wire GPT-2 weights; a {type(config).__name__} has none to wire")
    e, h = config.n_embd, config.n_head
    d = e // h
    if config.n_layer < 2 or e != 4 * d or d % 2:
        raise ValueError(f"induction init needs >= 2 layers and n_embd = 4 x an even head width "
                         f"(n_head=4); got n_layer={config.n_layer}, n_embd={e}, n_head={h}")
    rng = np.random.default_rng(seed)
    tok, copy_q, copy_k, pos = (slice(i * d, (i + 1) * d) for i in range(4))
    p = {k: v for k, v in params.items()}
    p["h"] = {name: {m: dict(w) for m, w in layer.items()} for name, layer in params["h"].items()}

    wte = np.array(params["wte"], np.float32)
    wte[:, d:] = 0.0
    wte *= 2.0  # keep each embedding's norm: its energy now sits in a quarter of the dims
    omega = _frequencies(d // 2, rng)
    angle = omega[None, :] * np.arange(config.n_positions)[:, None]
    wpe = np.zeros((config.n_positions, e), np.float32)
    wpe[:, pos.start::2][:, :d // 2] = _POSITION_RMS * np.sin(angle)
    wpe[:, pos.start + 1::2][:, :d // 2] = _POSITION_RMS * np.cos(angle)
    p["wte"], p["wpe"] = wte, wpe

    # After ln_1 (no learned scale yet) an input is divided by its standard deviation.
    tok_rms = float(np.sqrt((wte[:, tok] ** 2).mean()))
    ln_gain = 1.0 / np.sqrt((d * tok_rms ** 2 + d * _POSITION_RMS ** 2 / 2) / e)
    pos_gain = np.sqrt(_SHARPNESS * np.sqrt(d)) / (ln_gain * _POSITION_RMS)
    copy_basis, _ = np.linalg.qr(rng.normal(size=(d, d)))  # one basis for both copies

    qkv, bias, proj, heads = _cleared_heads(p["h"]["0"], e, d, n_heads=2)
    for head, ((q, k, v), offset, block) in enumerate(zip(heads, (query_offset, key_offset), (copy_q, copy_k))):
        for f, w in enumerate(omega):
            s, c = pos.start + 2 * f, pos.start + 2 * f + 1
            qs, qc = q.start + 2 * f, q.start + 2 * f + 1
            # query = (sin w(i-k), cos w(i-k)) so that it matches the key (sin wj, cos wj) at j = i-k
            qkv[s, qs], qkv[c, qs] = pos_gain * np.cos(w * offset), -pos_gain * np.sin(w * offset)
            qkv[s, qc], qkv[c, qc] = pos_gain * np.sin(w * offset), pos_gain * np.cos(w * offset)
            qkv[s, k.start + 2 * f] = qkv[c, k.start + 2 * f + 1] = pos_gain
        qkv[tok, v] = copy_basis
        proj[head * d:(head + 1) * d, block] = np.eye(d) / ln_gain
    _set_attention(p["h"]["0"], qkv, bias, proj)

    qkv, bias, proj, [(q, k, v)] = _cleared_heads(p["h"]["1"], e, d, n_heads=1)
    match_gain = np.sqrt(_SHARPNESS * 4 * np.sqrt(d) / d)
    qkv[copy_q, q] = np.eye(d) * match_gain
    qkv[copy_k, k] = np.eye(d) * match_gain
    out_basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    qkv[tok, v] = out_basis
    proj[:d, tok] = out_basis.T / ln_gain
    _set_attention(p["h"]["1"], qkv, bias, proj)
    return p


def _cleared_heads(layer: dict, e: int, d: int, n_heads: int):
    """Copies of a layer's qkv kernel/bias and output projection with its first `n_heads` heads
    cleared (query, key and value columns, and their rows of the projection), and those heads'
    (q, k, v) column slices."""
    qkv, bias = np.array(layer["c_attn"]["kernel"]), np.array(layer["c_attn"]["bias"])
    proj = np.array(layer["attn_proj"]["kernel"])
    heads = [tuple(slice(j * e + head * d, j * e + (head + 1) * d) for j in range(3)) for head in range(n_heads)]
    for cols in (c for head in heads for c in head):
        qkv[:, cols] = 0.0
        bias[cols] = 0.0
    proj[:n_heads * d, :] = 0.0
    return qkv, bias, proj, heads


def _set_attention(layer: dict, qkv, bias, proj) -> None:
    layer["c_attn"] = {"kernel": qkv, "bias": bias}
    layer["attn_proj"] = {"kernel": proj, "bias": np.array(layer["attn_proj"]["bias"])}


# -- the task the circuit is built for, for tests and benchmarks/lookup.py --------------------
EVERY, IS, A, DOT = 1, 2, 3, 4  # token ids of a toy vocabulary: subjects 10..29, objects 30..49
LOOKUP_VOCAB = 50


def fact_lookup_batch(rng: np.random.Generator, size: int, n_facts: int = 12):
    """`size` rows of "Every X is a Y ." for `n_facts` distinct subjects, then "Every X is a" for
    one of them. Returns (ids [size,T], each row's objects [size,n_facts], the answers [size]).

    Objects are never subjects: an object X followed by another fact would also match the
    initial key (the token three back), which only training teaches the model to tell apart.
    """
    ids, objects, answers = [], [], []
    for _ in range(size):
        subj = rng.permutation(20)[:n_facts] + 10
        obj = rng.permutation(20)[:n_facts] + 30
        q = int(rng.integers(n_facts))
        ids.append([t for s, o in zip(subj, obj) for t in (EVERY, s, IS, A, o, DOT)] + [EVERY, subj[q], IS, A])
        objects.append(obj)
        answers.append(obj[q])
    return np.array(ids), np.array(objects), np.array(answers)


def _last_hidden(model, params, ids):
    """Final hidden state at the last position of unpadded rows of token ids."""
    import jax.numpy as jnp
    ids = jnp.asarray(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden, _ = model.body(params, model.embed(params, ids), positions, jnp.ones(ids.shape, bool))
    return hidden[:, -1]


def lookup_accuracy(model, params, ids, objects, answers) -> float:
    """Share of rows whose last position ranks the queried fact's object first among the objects."""
    logits = np.asarray(model.logits(params, _last_hidden(model, params, ids)))
    picked = objects[np.arange(len(objects)), np.argmax(np.take_along_axis(logits, objects, 1), 1)]
    return float(np.mean(picked == answers))


def train_on_lookup(model, params, steps: int, rng: np.random.Generator, lr: float = 1e-3, batch: int = 16,
                    n_facts: int = 12, every: int = 0, test=None):
    """Adam on the answer's cross-entropy; returns (params, [(step, test accuracy)] every `every` steps)."""
    import jax
    import jax.numpy as jnp
    import optax
    tx = optax.adam(lr)

    def loss(p, ids, target):
        logp = jax.nn.log_softmax(model.logits(p, _last_hidden(model, p, ids)))
        return -jnp.take_along_axis(logp, target[:, None], 1).mean()

    @jax.jit
    def step(p, opt, ids, target):
        updates, opt = tx.update(jax.grad(loss)(p, ids, target), opt, p)
        return optax.apply_updates(p, updates), opt

    params = jax.tree.map(jnp.asarray, params)
    opt, curve = tx.init(params), []
    for i in range(1, steps + 1):
        ids, _, answers = fact_lookup_batch(rng, batch, n_facts)
        params, opt = step(params, opt, jnp.asarray(ids), jnp.asarray(answers))
        if every and i % every == 0:
            curve.append((i, lookup_accuracy(model, params, *test)))
    return params, curve
