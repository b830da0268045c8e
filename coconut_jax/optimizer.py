"""The optimizer: AdamW, with what the published recipes of later methods add to it.

    lr_schedule    "constant" (the reference's) or "cosine" (to 0 at the run's last step)
    warmup_ratio   the first ceil(ratio x steps) steps rise linearly from 0 to `lr`
    max_grad_norm  the step's mean gradient clipped to this global norm (0: no clipping)
    decay_norms_and_biases  False: no weight decay on biases and normalisation scales

These follow Hugging Face's Trainer (`get_cosine_schedule_with_warmup`,
`get_constant_schedule_with_warmup`, `clip_grad_norm_` before the step, and its default
split of parameters into decayed and not: biases and norm weights are not), which the
recipes trained with that Trainer run. Their defaults (constant, no warm-up, no clipping, decay on every
parameter) are the Coconut reference's `AdamW(lr, weight_decay)`, built as exactly the
optimizer the project always built, so every earlier figure and checkpoint stays as it was.

The schedule counts optimizer steps from the run's first (the optimizer state's own count, so a
resume restores its position exactly); `reset_optimizer` (the reference resets the moments
every epoch) keeps that count (`carry_schedule`). It spans the steps of the epochs the run
trains, `num_epochs - resume`, at `steps_per_epoch` each (ceil(records / micro-batch) micro-
batches, `gradient_accumulation_steps` a step), as the Trainer counts a dataloader's length.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from coconut_jax import trainable

SCHEDULES = ("constant", "cosine")
# Leaves never decayed with decay_norms_and_biases=False: biases and normalisation scales (the
# only leaves named "scale" in every family).
NO_DECAY = ("bias", "scale")


def is_default(c) -> bool:
    """The reference's optimizer: AdamW at a constant rate, decay on everything, no clipping."""
    return (c.lr_schedule == "constant" and c.warmup_ratio == 0.0 and c.max_grad_norm == 0.0
            and c.decay_norms_and_biases)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def steps_per_epoch(c, records: int) -> int:
    micro = c.global_batch_size // c.gradient_accumulation_steps
    return _ceil_div(_ceil_div(records, micro), c.gradient_accumulation_steps)


def total_steps(c, records: int) -> int:
    """Optimizer steps of the epochs this run trains (what the schedule spans)."""
    return max(1, steps_per_epoch(c, records) * (c.num_epochs - c.resume))


def lr_schedule(c, total: int):
    """step -> learning rate (Hugging Face's schedules with warm-up; `total` steps in all)."""
    warmup = math.ceil(total * c.warmup_ratio)

    def rate(count):
        s = jnp.asarray(count, jnp.float32)
        rising = s / max(warmup, 1)
        if c.lr_schedule == "cosine":
            progress = jnp.clip((s - warmup) / max(1, total - warmup), 0.0, 1.0)
            after = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            after = jnp.ones_like(s)
        return c.lr * jnp.where(s < warmup, rising, after)
    return rate


def decay_mask(params):
    """True where weight decay applies: every leaf but biases and normalisation scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: trainable.names(path)[-1] not in NO_DECAY, params)


def make_optimizer(c, total: int = 1):
    """The run's optimizer (`total`: the optimizer steps the schedule spans; any value gives the
    same state's shapes, which is all a memory plan needs)."""
    if is_default(c):
        return optax.adamw(c.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay)
    adamw = optax.adamw(lr_schedule(c, total), b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay,
                        mask=None if c.decay_norms_and_biases else decay_mask)
    if c.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adamw)
    return adamw


def carry_schedule(new, old):
    """`new` (a freshly initialised state) with the schedule's step count of `old`: resetting
    the moments does not restart the warm-up and decay."""
    if isinstance(new, optax.ScaleByScheduleState):
        return old
    if isinstance(new, tuple):
        items = [carry_schedule(n, o) for n, o in zip(new, old)]
        return type(new)(*items) if hasattr(new, "_fields") else type(new)(items)
    return new


def config_errors(c) -> list[str]:
    out = []
    if c.lr_schedule not in SCHEDULES:
        out.append(f"lr_schedule={c.lr_schedule!r} must be one of {', '.join(SCHEDULES)}")
    if not 0.0 <= c.warmup_ratio < 1.0:
        out.append(f"warmup_ratio={c.warmup_ratio} must be in [0, 1)")
    if c.max_grad_norm < 0:
        out.append(f"max_grad_norm={c.max_grad_norm} must be >= 0 (0: no clipping)")
    return out
