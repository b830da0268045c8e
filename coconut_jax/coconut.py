"""The Coconut latent forward pass, its loss, and batched KV-cached greedy generation.

Thought k of a row is the final hidden state (after ln_f) at the position before its k-th
latent, fed back as the input embedding of that latent. Batches align the first latent of
every row at `prefix_len` (see `data.collate`), so thought k of all rows is computed at the
same position p+k-1, and one pass over the sequence suffices, split as:

  prefix   [0, p)           one pass; its last hidden state is thought 1
  thoughts p .. p+n-2       `lax.scan`, one position each against the keys/values before it
  rest     [p+n-1, T)       one pass, its first input is thought n

Every position is computed exactly once. `latent_mask` (precomputed by the collator) says
which rows take a thought at each latent position; nothing here looks at token ids.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from coconut_jax.labels import IGNORE
from coconut_jax.models import weight_product
from coconut_jax.models.common import FunctionalModel


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _segment(kv, mask):
    return {"k": kv["k"], "v": kv["v"], "mask": mask}


def _write(cache, kv, slot):
    """`cache` with the keys/values `kv` written at positions slot.. (axis 3 of [L,B,H,T,D])."""
    return jax.tree.map(lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, slot, axis=3), cache, kv)


def latent_forward(model: FunctionalModel, params, arrays, prefix_len: int, n_latent: int, *, feedback: bool = True,
                   dropout_key=None, with_kv: bool = False, deferred: bool = True):
    """Hidden states [B,T,E] of a batch with its continuous thoughts.

    `feedback=False` is a plain LM pass over the same tokens (pause-as-thought and the
    non-latent methods). With `with_kv`, also returns the keys/values of every position
    ({"k", "v": [L,B,H,T,D]}), ready to seed a decoding cache.

    Each part attends to the keys/values of the parts before it; the thought passes carry
    only their own n-1 positions' keys/values through the scan (the prefix's are a
    constant), so a thought pass costs one position against p+n keys, and the backward
    pass stores no per-thought copy of a full-length cache. The layers' kernel gradients of the
    thought passes are formed once after them (`weight_product.scan`; `deferred=False`: by
    `jax.grad` of the plain scan, one full-size product per thought, the same values).
    """
    ids, mask, pos = arrays["input_ids"], arrays["attention_mask"], arrays["position_ids"]
    params = model.stack_layers(params)
    embeds = model.embed(params, ids)
    k_pre, k_mid, k_rest = _keys(dropout_key, 3)
    n = n_latent if feedback else 0
    if n == 0:
        hidden, kv = model.body(params, embeds, pos, mask, dropout_key=k_pre)
        return (hidden, kv) if with_kv else hidden
    p, m, latent = prefix_len, n_latent - 1, arrays["latent_mask"]

    def take(x, i):
        return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=True)

    h_pre, kv_pre = model.body(params, embeds[:, :p], pos[:, :p], mask[:, :p], dropout_key=k_pre)
    past = [_segment(kv_pre, mask[:, :p])]
    thought = h_pre[:, -1]
    if m:
        mid_mask = mask[:, p:p + m].astype(bool)
        kv_mid = jax.tree.map(lambda a: jnp.zeros(a.shape[:3] + (m,) + a.shape[4:], a.dtype), kv_pre)
        mid = slice(p, p + m)
        consts = dict(latent=latent[:, mid], embeds=embeds[:, mid], pos=pos[:, mid], mask=mask[:, mid],
                      mid_mask=mid_mask, past=past, key=k_mid)

        def thought_pass(params, c, carry, k):
            kv_mid, thought = carry
            x = jnp.where(take(c["latent"], k)[..., None], thought[:, None], take(c["embeds"], k))
            filled = c["mid_mask"] & (jnp.arange(m) < k)[None]
            key = None if c["key"] is None else jax.random.fold_in(c["key"], k)
            h, kv = model.body(params, x, take(c["pos"], k), take(c["mask"], k), c["past"] + [_segment(kv_mid, filled)],
                               key)
            return (_write(kv_mid, kv, k), h[:, 0]), h[:, 0]

        (kv_mid, thought), h_mid = weight_product.scan(thought_pass, params, consts, (kv_mid, thought), jnp.arange(m),
                                                       n_layer=model.config.n_layer, deferred=deferred)
        past.append(_segment(kv_mid, mid_mask))
    r = p + m
    rest = embeds[:, r:]
    rest = rest.at[:, 0].set(jnp.where(latent[:, r][:, None], thought, rest[:, 0]))
    h_rest, kv_rest = model.body(params, rest, pos[:, r:], mask[:, r:], past, k_rest)
    parts = [h_pre] + ([jnp.swapaxes(h_mid, 0, 1).astype(h_pre.dtype)] if m else []) + [h_rest]
    hidden = jnp.concatenate(parts, axis=1)
    if not with_kv:
        return hidden
    kv = {name: jnp.concatenate([part[name] for part in past + [kv_rest]], axis=3) for name in ("k", "v")}
    return hidden, kv


def _nll_parts(logits, targets):
    """(log-probabilities, labelled mask, targets with 0 where unlabelled, summed NLL of the
    labelled targets, their count); logits and targets already aligned."""
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(valid, targets, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return logp, valid, safe, jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def _nll_sums(logits, targets):
    """(sum of the negative log-likelihoods of `targets` under `logits` where a target is
    labelled, the number labelled)."""
    return _nll_parts(logits, targets)[3:]


def label_count(labels):
    """The labelled next-token positions of a batch: the count `token_nll` divides by."""
    return jnp.sum(labels[:, 1:] != IGNORE).astype(jnp.float32)


def token_nll(logits, labels):
    """(sum of next-token negative log-likelihoods over labelled positions, their count)."""
    return _nll_sums(logits[:, :-1], labels[:, 1:])


def chunked_token_nll(model: FunctionalModel, params, hidden, labels, chunk: int):
    """`token_nll(model.logits(params, hidden), labels)` without the [B,T,V] f32 logits: the
    positions go through the head `chunk` at a time in a scan (`_chunked_nll`), so no pass
    holds more than one chunk's logits."""
    h, targets = hidden[:, :-1], labels[:, 1:]
    b, t, e = h.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, n, chunk).swapaxes(0, 1)
    head = {k: params[k] for k in model.head_keys() if k in params}
    return _chunked_nll(model, head, h, targets)


def _nll_and_logit_cotangent(logits, targets):
    """(summed nll, count, d sum / d logits) of one chunk: softmax minus the target's one-hot on
    labelled positions, formed without a [.., V] one-hot."""
    logp, valid, safe, total, count = _nll_parts(logits, targets)
    hit = jnp.arange(logp.shape[-1]) == safe[..., None]
    return total, count, jnp.where(valid[..., None], jnp.exp(logp) - hit, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_nll(model, head, h, targets):
    """(summed nll, count) over chunks [n, B, chunk, ...]. Its gradient is formed in the
    forward pass, one chunk at a time: the head's three products per chunk (logits, then the
    pullback of the logits' cotangent to the head and to h), where rematerialising the chunk
    for the backward would run the head's largest product twice."""
    def step(carry, xs):
        s, c = _nll_sums(model.logits(head, xs[0]), xs[1])
        return (carry[0] + s, carry[1] + c), None
    (total, count), _ = jax.lax.scan(step, (jnp.float32(0), jnp.float32(0)), (h, targets))
    return total, count


def _chunked_nll_fwd(model, head, h, targets):
    def step(carry, xs):
        total, count, d_head = carry
        logits, pull = jax.vjp(model.logits, head, xs[0])
        s, c, d_logits = _nll_and_logit_cotangent(logits, xs[1])
        dp, dh = pull(d_logits)
        return (total + s, count + c, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), d_head, dp)), dh
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), head)
    (total, count, d_head), dh = jax.lax.scan(step, (jnp.float32(0), jnp.float32(0), zeros), (h, targets))
    return (total, count), (d_head, dh, jax.tree.map(lambda a: jnp.zeros((), a.dtype), head))


def _chunked_nll_bwd(model, res, ct):
    d_head, dh, dtypes = res
    g = ct[0]  # the summed nll's cotangent (the count takes none)
    return (jax.tree.map(lambda d, like: (g * d).astype(like.dtype), d_head, dtypes), (g * dh).astype(dh.dtype), None)


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def loss_terms(model: FunctionalModel, params, arrays, prefix_len: int, n_latent: int, *, feedback: bool = True,
               dropout_key=None, loss_chunk: int = 0):
    """Summed token loss and token count of a batch; callers divide once (exact accumulation).

    `loss_chunk` > 0 computes it `loss_chunk` positions at a time (`chunked_token_nll`)."""
    hidden = latent_forward(model, params, arrays, prefix_len, n_latent, feedback=feedback, dropout_key=dropout_key)
    return hidden_nll(model, params, hidden, arrays["labels"], loss_chunk)


def hidden_nll(model: FunctionalModel, params, hidden, labels, loss_chunk: int = 0):
    """(summed next-token loss, token count) of final hidden states through the model's head;
    `loss_chunk` > 0 and a longer sequence: `chunked_token_nll`."""
    if loss_chunk and hidden.shape[1] - 1 > loss_chunk:
        return chunked_token_nll(model, params, hidden, labels, loss_chunk)
    return token_nll(model.logits(params, hidden), labels)


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent", "max_new_tokens", "feedback"))
def generate(model: FunctionalModel, params, arrays, eos_id, *, prefix_len: int, n_latent: int, max_new_tokens: int,
             feedback: bool = True):
    """Greedy decoding of a batch of prompts, KV-cached, with per-row EOS (SPEC §6).

    The first new token (argmax after each row's last prompt token) is always kept; then up
    to max_new_tokens-1 more, a row stopping before it would append EOS. Prompts may have
    different lengths and latent counts: new tokens go to shared cache slots after the
    prompt block (the cache is the prompt's keys/values from `latent_forward`), with position
    ids continuing each row's own length, and right pads in between are masked.
    Returns (tokens [B, max_new_tokens], number kept per row).
    """
    mask = arrays["attention_mask"]
    b, t = mask.shape
    # Layers scanned whatever the model's setting: a decode step of the per-layer loop slices
    # each layer's keys/values out of the [L,...] cache, a copy per step (2.5x slower on CPU).
    model = model if model.scan_layers else model.replace(scan_layers=True)
    params = model.stack_layers(params)
    hidden, kv = latent_forward(model, params, arrays, prefix_len, n_latent, feedback=feedback, with_kv=True)
    # Fed-back tokens 1..max_new_tokens-1 take slots t.. of a fixed-size cache.
    extra = max_new_tokens - 1
    cache = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))), kv)
    key_mask = jnp.pad(mask.astype(bool), ((0, 0), (0, extra)))
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    first = jnp.argmax(model.logits(params, hidden[jnp.arange(b), last]), axis=-1).astype(jnp.int32)
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), first, cache, key_mask, tokens, jnp.zeros(b, bool), jnp.ones(b, jnp.int32))

    def cond(s):
        step, _, _, _, _, done, _ = s
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(s):
        step, prev, cache, key_mask, tokens, done, kept = s
        slot = t + step - 1
        h, kv = model.body(params, model.embed(params, prev[:, None]), (lengths + step - 1)[:, None],
                           jnp.ones((b, 1), bool), [_segment(cache, key_mask)])
        cache = _write(cache, kv, slot)
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), bool), (0, slot))
        nxt = jnp.argmax(model.logits(params, h[:, 0]), axis=-1).astype(jnp.int32)
        done = done | (nxt == eos_id)
        tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(done, eos_id, nxt)[:, None], (0, step))
        return step + 1, nxt, cache, key_mask, tokens, done, kept + (~done).astype(jnp.int32)

    _, _, _, _, tokens, _, kept = jax.lax.while_loop(cond, body, state)
    return tokens, kept
