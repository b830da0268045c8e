"""Step supervision (SIM-CoT, Wei et al. ICLR 2026), as a piece any latent method attaches: a
training-only decoder (the part "decoder", a copy of `model_id`'s *pretrained* model at its own
vocabulary) must write out, from the thoughts, each step they replaced.

A group's decoder input is its thoughts (not detached) then the step's tokens embedded with the
*base's* word embedding; its own head predicts the step and an end token. What differs between
the methods it attaches to is a `StepDecoding` their records declare, each value the one their
reference uses:

- `first_position`: position id of the group's first thought (`simcot` passes 1.., as its
  reference does; `codi_simcot` leaves Hugging Face's default 0.., as its reference does);
- `reduce`: "pairs", the summed token NLL over every (row, group) pair with a target divided by
  the number of pairs (`simcot`); "groups", per group the token mean over its rows, then the
  mean over the groups with a target, one value per batch (`codi_simcot`);
- `dropout`: the decoder's own dropout in training (off in `simcot`, on in `codi_simcot`).

Which thoughts meet which group is the method's (`simcot`: each group of `c_thought` thoughts;
`codi_simcot`: one projected thought per step, z1..z_{K+1}), as is where the targets come from
(`data.step_targets` for Coconut's sequences; the teacher's chain for `codi_simcot`).
"""
from __future__ import annotations

import dataclasses

REDUCTIONS = ("pairs", "groups")


@dataclasses.dataclass(frozen=True)
class StepDecoding:
    first_position: int = 1
    reduce: str = "pairs"
    dropout: bool = False


def _row_nll(decoder, decoder_params, h, labels, chunk: int):
    """(summed next-token NLL per row [R], labelled positions per row [R]) of final hidden
    states `h` [R,T,E]. With `chunk` > 0 the rows go through the head a block at a time in a
    rematerialised scan, a block holding about `chunk` x 64 positions (a base's chunk of a
    64-row micro-batch): the decoder's rows are many and short (rows x groups, a step each), so
    blocks of rows, not of positions, keep its [R,T,V] logits from being held at once."""
    import jax
    import jax.numpy as jnp

    from coconut_jax.labels import IGNORE

    def sums(h_c, t_c):
        valid = t_c != IGNORE
        logp = jax.nn.log_softmax(decoder.logits(decoder_params, h_c).astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, t_c, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0.0), axis=-1), jnp.sum(valid, axis=-1).astype(jnp.float32)
    h, targets = h[:, :-1], labels[:, 1:]
    r, t, e = h.shape
    blocks = -(-(r * t) // (chunk * 64)) if chunk else 1
    if blocks <= 1:
        return sums(h, targets)
    per = -(-r // blocks)
    pad = blocks * per - r
    h = jnp.pad(h, ((0, pad), (0, 0), (0, 0))).reshape(blocks, per, t, e)
    targets = jnp.pad(targets, ((0, pad), (0, 0)), constant_values=IGNORE).reshape(blocks, per, t)
    _, (total, count) = jax.lax.scan(lambda carry, xs: (carry, jax.checkpoint(sums)(*xs)), None, (h, targets))
    return total.reshape(-1)[:r], count.reshape(-1)[:r]


def decoder_loss(model, params, decoder, decoder_params, thoughts, ids, mask, how: StepDecoding, dropout_key=None,
                 loss_chunk: int = 0):
    """(sum, count) of the step term: `thoughts` [B, G, c, E] (each group's thoughts), `ids`,
    `mask` [B, G, L] (the steps' tokens, 1 on each target token and its end token). All groups
    of all rows run as one [B*G, c+L] batch (they are independent; right padding never changes
    a counted position). "pairs": (summed NLL, pairs with a target); "groups": (the batch's
    value, 1)."""
    import jax.numpy as jnp

    from coconut_jax import coconut
    from coconut_jax.labels import IGNORE
    b, n_groups, length = ids.shape
    c = thoughts.shape[2]
    x = jnp.concatenate([thoughts.astype(decoder.dtype), model.embed(params, ids).astype(decoder.dtype)], axis=2)
    x = x.reshape(b * n_groups, c + length, -1)
    key_mask = jnp.concatenate([jnp.ones((b, n_groups, c), mask.dtype), mask], axis=2).reshape(b * n_groups, -1)
    labels = jnp.concatenate([jnp.full((b, n_groups, c), IGNORE, ids.dtype), jnp.where(mask > 0, ids, IGNORE)],
                             axis=2).reshape(b * n_groups, -1)
    positions = jnp.broadcast_to(jnp.arange(how.first_position, how.first_position + c + length, dtype=jnp.int32),
                                 labels.shape)
    h, _ = decoder.body(decoder_params, x, positions, key_mask, dropout_key=dropout_key if how.dropout else None)
    if how.reduce == "pairs":
        total, _ = coconut.hidden_nll(decoder, decoder_params, h, labels, loss_chunk)
        return total, pair_count(mask)
    rows, counts = _row_nll(decoder, decoder_params, h, labels, loss_chunk)
    per_group = jnp.sum(rows.reshape(b, n_groups), axis=0)
    tokens = jnp.sum(counts.reshape(b, n_groups), axis=0)
    means = jnp.where(tokens > 0, per_group / jnp.maximum(tokens, 1.0), 0.0)
    value = jnp.sum(means) / jnp.maximum(jnp.sum(tokens > 0), 1).astype(jnp.float32)
    return value, jnp.float32(1.0)


def pair_count(mask):
    """The (row, group) pairs with a step target: what "pairs" divides by."""
    import jax.numpy as jnp
    if mask.shape[1] == 0:
        return jnp.float32(0)
    return jnp.sum(jnp.any(mask > 0, axis=-1)).astype(jnp.float32)


def decode(model, params, decoder, decoder_params, thoughts, end: int, first_position: int = 1,
           max_tokens: int = 40) -> list[list[int]]:
    """The decoder's greedy tokens (the end token excluded) from each group's thoughts
    [G, c, E], as in training: the thoughts, then each token written embedded by the base. One
    full pass per token: a few short sequences."""
    import jax.numpy as jnp
    out = []
    for group in thoughts:
        x = jnp.asarray(group, decoder.dtype)[None]
        written = []
        for _ in range(max_tokens):
            pos = jnp.arange(first_position, first_position + x.shape[1])[None]
            h, _ = decoder.body(decoder_params, x, pos, jnp.ones_like(pos))
            nxt = int(jnp.argmax(decoder.logits(decoder_params, h[:, -1])[0]))
            if nxt == end:
                break
            written.append(nxt)
            x = jnp.concatenate([x, model.embed(params, jnp.array([[nxt]])).astype(decoder.dtype)], axis=1)
        out.append(written)
    return out
