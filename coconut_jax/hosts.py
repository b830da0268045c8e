"""What the processes of a multi-host run wait for together.

Collectives between CPU processes (gloo) give up when a peer is 30 s late to the first one, and a
host can be late by far more for honest reasons: host 0 building the demo's data while the others
wait, a host reading weights from a slower disk, a host whose questions take longer to answer.
So every collective that follows uneven per-host work is preceded by `barrier`, a wait on JAX's
coordination service (no devices involved) that lasts up to `TIMEOUT_S`; a host that dies is
reported by the service's heartbeat long before that.
"""
from __future__ import annotations

import itertools

import jax
import numpy as np

TIMEOUT_S = 1800
_calls = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str, timeout_s: int = TIMEOUT_S) -> None:
    """Returns once every process has called it (with the same `name`); at once in one process."""
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp
    ocp.multihost.get_barrier_sync_fn()(key=f"coconut_jax.{name}.{next(_calls)}", timeout_ms=timeout_s * 1000)


def all_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (a restore must succeed everywhere or nowhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    barrier("all_agree")
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))
