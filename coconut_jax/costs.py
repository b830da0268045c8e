"""What a training step costs: per-device memory from XLA's analysis of the compiled step, and
model FLOPs for utilisation. The run reports both as it starts and goes; `coconut_jax.plan`
computes the memory before any weight is read; `benchmarks/train_step.py` times the step.

The step is two programs (`steps.accumulate` per micro-batch, then the update). Their peak is
what is resident outside a program (the optimizer state during accumulation, the frozen params
during the update) plus what the program itself holds live: its arguments, temporaries and the
outputs that do not reuse a donated argument's buffer.
"""
from __future__ import annotations

import functools

import numpy as np

# Dense bf16 peak FLOP/s by device kind (vendor figures), for model FLOP utilisation.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5e": 197e12,
             "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}
GB = 2 ** 30


def peak_flops(kind: str) -> float | None:
    """bf16 peak FLOP/s of a device kind (`jax.devices()[0].device_kind`), None if unknown."""
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def count(shapes) -> int:
    """The number of scalars in a tree of arrays or shapes."""
    import jax
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@functools.lru_cache(maxsize=None)
def _matmul_params(model) -> int:
    """The params the matmuls use: all but the position table, the input embedding counted
    once, as the head (per model, once: the run asks every step)."""
    shapes = model.param_shapes()
    n = count(shapes)
    n -= int(np.prod(shapes["wpe"].shape)) if "wpe" in shapes else 0
    n -= int(np.prod(shapes["wte"].shape)) if "lm_head" in shapes else 0
    return n


def model_flops(model, tokens: int, length: int) -> float:
    """FLOPs of a training step over `tokens` tokens of sequences of `length`: 6 x the matmuls'
    params x tokens + the attention matmuls (PaLM's count)."""
    cfg = model.config
    width = getattr(cfg, "num_attention_heads", 0) * getattr(cfg, "head_dim", 0) or cfg.n_embd
    return 6.0 * _matmul_params(model) * tokens + 12.0 * cfg.n_layer * width * length * tokens


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s with shardings
    (the largest shard: what the busiest device holds)."""
    import jax
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def batch_shapes(mesh, shapes: dict) -> dict:
    """Abstract arrays on the mesh of a micro-batch given as {name: (shape, dtype)} (what a
    method's `plan_batch` says), split over the data-parallel devices by their first axis."""
    import jax

    from coconut_jax import sharding
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in shapes.items()}


def global_shapes(mesh, arrays: dict, processes: int = 1) -> dict:
    """Abstract arrays of a micro-batch on the mesh, from one host's arrays of it (each host
    holds its share of the rows)."""
    import jax

    from coconut_jax import sharding
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((a.shape[0] * processes, *a.shape[1:]), a.dtype, sharding=sh)
            for k, a in arrays.items()}


def _live(mem) -> int:
    return mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes


def step_memory(model, layout, update, method, arrays: dict, *, prefix_len: int, n_latent: int,
                loss_chunk: int = 0) -> dict:
    """Per-device memory (GiB) of the training step at one batch shape, from XLA's analysis of
    the two compiled programs: params, optimizer state, gradient accumulator, the micro-batch,
    the larger program's temporaries, and the total live at the step's peak. Compiling here
    fills the same cache the run's first step reads (no second compilation)."""
    import jax

    from coconut_jax import steps
    key = (jax.random.key(0), np.int32(0), np.int32(0))
    acc = steps.accumulate.lower(model, layout.trained, layout.acc, arrays, key, steps.abstract_scales(method),
                                 method=method, prefix_len=prefix_len, n_latent=n_latent, loss_chunk=loss_chunk,
                                 frozen=layout.frozen, part_models=layout.part_models,
                                 frozen_parts=layout.frozen_parts).compile().memory_analysis()
    upd = update.lower(layout.trained, layout.opt_state, layout.acc).compile().memory_analysis()
    parts = layout.trained["parts"] if layout.part_models else {}
    frozen_parts = device_bytes(layout.frozen_parts) if layout.frozen_parts else 0
    params = device_bytes(layout.params) + device_bytes(parts) + frozen_parts
    opt, grads = device_bytes(layout.opt_state), device_bytes(layout.acc)
    frozen = (device_bytes(layout.frozen) if layout.frozen else 0) + frozen_parts
    out = {"params_gb": params / GB, "optimizer_gb": opt / GB, "accumulator_gb": grads / GB,
           "batch_gb": device_bytes(arrays) / GB}
    if acc is None or upd is None:  # a backend without the analysis
        return {k: round(v, 4) for k, v in out.items()}
    out["temporaries_gb"] = max(acc.temp_size_in_bytes, upd.temp_size_in_bytes) / GB
    out["total_gb"] = max(opt + _live(acc), frozen + _live(upd)) / GB
    return {k: round(v, 4) for k, v in out.items()}
