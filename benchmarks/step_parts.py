"""Where a plain GPT-2-small training step's time goes, and how fast it runs against a lone matmul.

    python benchmarks/step_parts.py [--batch 16 --length 256] [--repeats 3]

The step is `train_step.py`'s `after` mode (layers one lax.scan, the loss 128 positions at a
time, f32, dropout on): loss + gradient + AdamW on one batch of `make_batch`'s rows without
thoughts. Printed, as one JSON object:

  - its achieved FLOP/s (the model's count, 6 x matmul params x tokens + attention, over the
    step's median time) beside a lone matmul of the
    step's shapes ([B*T, E] x [E, 4E], the MLP's first projection) timed in the same run;
  - the split of its time by part, by ablation: the same step compiled with one part taken out
    (attention: the output is the queries; MLP: both projections return zeros, so XLA drops
    them and their gradients; norms: identity; loss: the mean hidden state instead of the head
    and cross-entropy). A part's time is the full step's minus the ablated one's, per round of
    the interleaved repeats (median and range); the optimizer's is AdamW's update alone on the
    same params, timed in the same rounds; `rest` is what no ablation removes (embeddings,
    residual adds and dropout, the layer loop's own copies).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import train_step
from coconut_jax import models
from coconut_jax.costs import model_flops
from coconut_jax.models import gpt2


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _zero_mlp(cfg):
    """A `project` whose MLP projections return zeros of their output's shape."""
    wide = 4 * cfg.n_embd
    original = gpt2.GPT2Model.project

    def project(self, p, x, spec, key=None):
        shape = p["kernel"].shape
        if shape == (cfg.n_embd, wide):
            return jnp.zeros(x.shape[:-1] + (wide,), x.dtype)
        if shape == (wide, cfg.n_embd):
            return jnp.zeros(x.shape[:-1] + (cfg.n_embd,), x.dtype)
        return original(self, p, x, spec, key)
    return project


ABLATIONS = {
    "attention": lambda cfg: patched(gpt2, "attention", lambda q, k, v, allowed, past, **kw: q),
    "mlp": lambda cfg: patched(gpt2.GPT2Model, "project", _zero_mlp(cfg)),
    "norms": lambda cfg: patched(gpt2, "layer_norm", lambda p, x, eps: x),
}


def update_alone(tx):
    def update(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o
    return jax.jit(update, donate_argnums=(0, 1))


def lone_matmul(m: int, k: int, n: int, repeats: int = 20) -> dict:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, w))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, w))
        ts.append(time.perf_counter() - t0)
    med = float(np.median(ts))
    return {"shape": [m, k, n], "s_median": round(med, 5), "gflop_per_s": round(2.0 * m * k * n / med / 1e9, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cfg = train_step.SHAPES["gpt2"]["config"]
    model = models.build(cfg, jnp.float32, **train_step.MODES["after"]["model"])
    tx = optax.adamw(1e-4, weight_decay=0.01)
    b = train_step.make_batch(a.batch, a.length, 0, cfg.vocab_size)
    arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
    params = jax.tree.map(jnp.asarray, model.init(0))
    shapes = (jax.eval_shape(lambda: params), jax.eval_shape(tx.init, params))
    variants = {"full": (lambda: contextlib.nullcontext(), {}),
                **{f"no_{part}": (lambda part=part: ABLATIONS[part](cfg), {}) for part in ABLATIONS},
                "no_loss": (lambda: contextlib.nullcontext(), {"head": False})}
    compiled, out = {}, {"device": jax.devices()[0].device_kind, "batch": a.batch, "length": b.input_ids.shape[1],
                         "dtype": "float32", "dropout": True}
    for name, (ctx, kw) in variants.items():
        with ctx():
            compiled[name] = train_step.step_fn(model, tx, b, train_step.MODES["after"]["loss_chunk"], feedback=False,
                                                **kw).lower(*shapes, arrays, jax.random.key(0)).compile()
        print(f"compiled {name}", flush=True)
    update = update_alone(tx)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
    state = {name: (jax.tree.map(jnp.array, params), tx.init(params)) for name in [*compiled, "optimizer"]}
    times = {name: [] for name in state}
    for r in range(a.repeats + 1):  # the first round warms up
        for name in state:
            t0 = time.perf_counter()
            if name == "optimizer":
                state[name] = update(*state[name], grads)
                jax.block_until_ready(state[name])
            else:
                res = compiled[name](*state[name], arrays, jax.random.key(r))
                jax.block_until_ready(res)
                state[name] = res[:2]
            if r:
                times[name].append(time.perf_counter() - t0)
    full = float(np.median(times["full"]))
    tokens = a.batch * b.input_ids.shape[1]
    flops = model_flops(model, tokens, b.input_ids.shape[1])
    out["step_s_median"] = round(full, 3)
    out["model_gflop_per_s"] = round(flops / full / 1e9, 1)
    out["lone_matmul"] = lone_matmul(tokens, cfg.n_embd, 4 * cfg.n_embd)
    split = {}
    for name in times:
        if name == "full":
            continue
        saved = times[name] if name == "optimizer" else [f - x for f, x in zip(times["full"], times[name])]
        split[name.removeprefix("no_")] = {"s_median": round(float(np.median(saved)), 3), "share": round(float(np.median(saved)) / full, 3),
                           "range": [round(min(saved), 3), round(max(saved), 3)]}
    split["rest"] = {"s_median": round(full - sum(v["s_median"] for v in split.values()), 3)}
    split["rest"]["share"] = round(split["rest"]["s_median"] / full, 3)
    out["split"] = split
    print(json.dumps(out))


if __name__ == "__main__":
    main()
