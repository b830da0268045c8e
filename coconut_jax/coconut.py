"""The Coconut latent forward pass, its loss, and batched KV-cached greedy generation.

Thought k of a row is the final hidden state (after ln_f) at the position before its k-th
latent, fed back as the input embedding of that latent. Batches align the first latent of
every row at `prefix_len` (see `data.collate`), so thought k of all rows is computed at the
same position p+k-1, and one pass over the sequence suffices, split as:

  prefix   [0, p)           one pass, fills the KV cache, its last hidden state is thought 1
  thoughts p .. p+n-2       `lax.scan`, one position each against the cache
  rest     [p+n-1, T)       one pass, its first input is thought n

Every position is computed exactly once. `latent_mask` (precomputed by the collator) says
which rows take a thought at each latent position; nothing here looks at token ids.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax.data import IGNORE
from coconut_jax.models.gpt2 import GPT2Model


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def latent_forward(model: GPT2Model, params, arrays, prefix_len: int, n_latent: int, *, feedback: bool = True,
                   extra_slots: int = 0, dropout_key=None, with_cache: bool = False):
    """Hidden states [B,T,E] of a batch with its continuous thoughts.

    `feedback=False` is a plain LM pass over the same tokens (pause-as-thought and the
    non-latent methods). With `with_cache`, also returns the KV cache (length T+extra_slots)
    and its key mask, ready for decoding.
    """
    ids, mask, pos = arrays["input_ids"], arrays["attention_mask"], arrays["position_ids"]
    b, t = ids.shape
    embeds = model.embed(params, ids)
    k_pre, k_mid, k_rest = _keys(dropout_key, 3)
    n = n_latent if feedback else 0
    if n == 0 and not with_cache:
        return model.body(params, embeds, pos, mask, dropout_key=k_pre)[0]
    key_mask = jnp.pad(mask, ((0, 0), (0, extra_slots)))
    cache = model.init_cache(b, t + extra_slots)
    if n == 0:
        hidden, cache = model.body(params, embeds, pos, key_mask, cache, 0, k_pre)
        return hidden, cache, key_mask
    p, latent = prefix_len, arrays["latent_mask"]

    def take(x, i):
        return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)

    h_pre, cache = model.body(params, embeds[:, :p], pos[:, :p], key_mask, cache, 0, k_pre)

    def thought_pass(carry, k):
        cache, thought = carry
        i = p + k
        x = jnp.where(take(latent, i)[:, None], thought, take(embeds, i))
        key = None if k_mid is None else jax.random.fold_in(k_mid, k)
        h, cache = model.body(params, x[:, None], take(pos, i)[:, None], key_mask, cache, i, key)
        return (cache, h[:, 0]), h[:, 0]

    (cache, thought), h_mid = jax.lax.scan(thought_pass, (cache, h_pre[:, -1]), jnp.arange(n - 1))
    rest = embeds[:, p + n - 1:]
    rest = rest.at[:, 0].set(jnp.where(latent[:, p + n - 1][:, None], thought, rest[:, 0]))
    h_rest, cache = model.body(params, rest, pos[:, p + n - 1:], key_mask, cache, p + n - 1, k_rest)
    hidden = jnp.concatenate([h_pre, jnp.swapaxes(h_mid, 0, 1).astype(h_pre.dtype), h_rest], axis=1)
    return (hidden, cache, key_mask) if with_cache else hidden


def reference_hidden(model: GPT2Model, params, arrays, feedback: bool = True):
    """The slow, obviously correct form (SPEC §5): for k = 1..n, run the whole sequence and
    put the hidden state before each row's k-th latent into that latent; then run once more.
    Finds latents per row from `latent_mask` alone (no alignment assumed). Tests/benchmarks only."""
    ids, mask, pos = arrays["input_ids"], arrays["attention_mask"], arrays["position_ids"]
    latent = np.asarray(arrays["latent_mask"])
    embeds = model.embed(params, ids)
    if feedback:
        where = [np.nonzero(row)[0] for row in latent]
        for k in range(max([len(w) for w in where] + [0])):
            hidden = model.body(params, embeds, pos, mask)[0]
            for r, w in enumerate(where):
                if k < len(w):
                    embeds = embeds.at[r, w[k]].set(hidden[r, w[k] - 1])
    return model.body(params, embeds, pos, mask)[0]


def token_nll(logits, labels):
    """(sum of next-token negative log-likelihoods over labelled positions, their count)."""
    logits, targets = logits[:, :-1], labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def loss_terms(model: GPT2Model, params, arrays, prefix_len: int, n_latent: int, *, feedback: bool = True,
               dropout_key=None):
    """Summed token loss and token count of a batch; callers divide once (exact accumulation)."""
    hidden = latent_forward(model, params, arrays, prefix_len, n_latent, feedback=feedback, dropout_key=dropout_key)
    return token_nll(model.logits(params, hidden), arrays["labels"])


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent", "max_new_tokens", "feedback"))
def generate(model: GPT2Model, params, arrays, eos_id, *, prefix_len: int, n_latent: int, max_new_tokens: int,
             feedback: bool = True):
    """Greedy decoding of a batch of prompts, KV-cached, with per-row EOS (SPEC §6).

    The first new token (argmax after each row's last prompt token) is always kept; then up
    to max_new_tokens-1 more, a row stopping before it would append EOS. Prompts may have
    different lengths and latent counts: new tokens go to shared cache slots after the
    prompt block, with position ids continuing each row's own length, and right pads in
    between are masked. Returns (tokens [B, max_new_tokens], number kept per row).
    """
    mask = arrays["attention_mask"]
    b, t = mask.shape
    hidden, cache, key_mask = latent_forward(model, params, arrays, prefix_len, n_latent, feedback=feedback,
                                             extra_slots=max_new_tokens, with_cache=True)
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
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), key_mask.dtype), (0, slot))
        h, cache = model.body(params, model.embed(params, prev[:, None]), (lengths + step - 1)[:, None],
                              key_mask, cache, slot)
        nxt = jnp.argmax(model.logits(params, h[:, 0]), axis=-1).astype(jnp.int32)
        done = done | (nxt == eos_id)
        tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(done, eos_id, nxt)[:, None], (0, step))
        return step + 1, nxt, cache, key_mask, tokens, done, kept + (~done).astype(jnp.int32)

    _, _, _, _, tokens, _, kept = jax.lax.while_loop(cond, body, state)
    return tokens, kept
