"""Checks every model family passes, shared by test_gpt2.py and test_llama.py."""
import jax
import jax.numpy as jnp
import numpy as np


def padded_batch(first_position: int = 3):
    """Three rows: full (starting at `first_position`), left padded, right padded."""
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12],
                    [0, 0, 0, 13, 14, 15, 16, 17],
                    [18, 19, 20, 21, 22, 0, 0, 0]])
    mask = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])
    pos = np.array([list(range(first_position, first_position + 8)), [0, 0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 0, 0]])
    return ids, mask, pos


def hidden(model, params, ids, mask, pos):
    return model.body(params, model.embed(params, ids), pos, mask)[0]


def assert_incremental_equals_full(model, params, ids, mask, pos):
    """Running a sequence in pieces, each against the keys/values of the pieces before it
    (as the latent passes and the decoding loop do), gives the full forward's states."""
    full = hidden(model, params, ids, mask, pos)
    emb = model.embed(params, ids)
    body = jax.jit(model.body)  # one program per piece instead of one per operation
    h0, kv = body(params, emb[:, :3], pos[:, :3], mask[:, :3])
    past = [{**kv, "mask": mask[:, :3]}]
    # A segment with unused (masked) slots must be ignored, as in a fixed-size decoding cache.
    junk = jax.tree.map(lambda a: jnp.ones_like(a[:, :, :, :2]) * 7.0, kv)
    past.append({**junk, "mask": np.zeros((3, 2), bool)})
    steps = [h0]
    for t in range(3, ids.shape[1]):
        h, kv = body(params, emb[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], past)
        past.append({**kv, "mask": mask[:, t:t + 1]})
        steps.append(h)
    inc = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = mask.astype(bool)
    assert np.abs(inc[real] - np.asarray(full)[real]).max() <= 1e-5
    return kv
