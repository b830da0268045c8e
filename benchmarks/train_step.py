"""Train-step cost of the latent forward versus a plain LM step on the same batch shape.

    python benchmarks/train_step.py [--shapes tiny|gpt2|both] [--repeats 3]

Prints one JSON object: per shape, seconds per step (loss + grad + AdamW) for a plain LM
pass and for Coconut at 0/3/6 thoughts, the slow full-recompute reference at 6 thoughts,
and their ratios to the plain step (all measured in the same run).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coconut_jax import coconut, data
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model

SHAPES = {
    "tiny": dict(config=GPT2Config(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4), batch=8, length=256),
    "gpt2": dict(config=GPT2Config(vocab_size=50260), batch=8, length=256),
}


def make_batch(batch, length, n_thoughts, vocab, latent_id):
    """Rows with ~ProsQA layout: question, markers + latents at an aligned position, steps/answer."""
    rng = np.random.default_rng(0)
    seqs = []
    for r in range(batch):
        q = rng.integers(1, vocab - 3, size=length // 2 - 8 - r).tolist()
        tail = rng.integers(1, vocab - 3, size=length - len(q) - n_thoughts - 2 - 4).tolist()
        ids = q + [vocab - 3] + [latent_id] * n_thoughts + [vocab - 2] + tail
        seqs.append((ids, [data.IGNORE] * (len(q) + n_thoughts + 2) + tail))
    return data.collate(seqs, list(range(batch)), latent_id=latent_id, pad_id=0, batch_size=batch, multiple=32)


def timed(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_shape(name, spec, repeats, reference=True):
    cfg = spec["config"]
    model = GPT2Model(cfg)
    params = model.init(0)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt = tx.init(params)
    latent_id = cfg.vocab_size - 1

    def step_fn(loss_terms_of):
        def loss(q, arrays):
            s, n = loss_terms_of(q, arrays)
            return s / n

        @jax.jit
        def step(p, o, arrays):
            value, g = jax.value_and_grad(loss)(p, arrays)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, value
        return step

    out = {}
    for n in (0, 3, 6):
        b = make_batch(spec["batch"], spec["length"], n, cfg.vocab_size, latent_id)
        arrays = {k: jnp.asarray(v) for k, v in b.arrays().items()}
        fast = step_fn(lambda q, a, b=b: coconut.loss_terms(model, q, a, b.prefix_len, b.n_latent))
        plain = step_fn(lambda q, a, b=b: coconut.loss_terms(model, q, a, b.prefix_len, b.n_latent, feedback=False))
        out[f"plain_lm_s@{n}"] = timed(lambda: plain(params, opt, arrays), repeats)
        out[f"coconut_s@{n}"] = timed(lambda: fast(params, opt, arrays), repeats)
        out[f"ratio@{n}"] = out[f"coconut_s@{n}"] / out[f"plain_lm_s@{n}"]
        if n == 6 and reference:
            # The reference locates latents on the host: it gets the concrete mask.
            slow = step_fn(lambda q, a: coconut.token_nll(model.logits(q, coconut.reference_hidden(
                model, q, {**a, "latent_mask": b.latent_mask})), a["labels"]))
            out["reference_recompute_s@6"] = timed(lambda: slow(params, opt, arrays), max(1, repeats // 2))
            out["reference_ratio@6"] = out["reference_recompute_s@6"] / out["plain_lm_s@6"]
            out["speedup_vs_reference@6"] = out["reference_recompute_s@6"] / out["coconut_s@6"]
    out.update(batch=spec["batch"], length=int(b.input_ids.shape[1]), n_layer=cfg.n_layer, n_embd=cfg.n_embd)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="tiny", choices=["tiny", "gpt2", "both"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the full-recompute reference (at GPT-2 shapes it needs more than 24 GB on CPU)")
    a = p.parse_args()
    names = ["tiny", "gpt2"] if a.shapes == "both" else [a.shapes]
    result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    for name in names:
        result[name] = bench_shape(name, SHAPES[name], a.repeats, reference=not a.no_reference)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
