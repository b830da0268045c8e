"""Device mesh, logical-axis rules, multi-host start-up, and host-local -> global batches."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from coconut_jax import hosts

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axes -> mesh axes. Embedding rows / hidden units split over `fsdp`
# (ZeRO-3 style), projections' wide dimension over `tensor`.
# Attention splits whole heads (`heads`, `kv_heads`), never a head's width (`head_dim`).
LOGICAL_RULES = {"vocab": "tensor", "embed": "fsdp", "qkv": "tensor", "heads": "tensor", "kv_heads": "tensor",
                 "mlp": "tensor", "head_dim": None, "position": None}


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Starts JAX's multi-process runtime when asked to (flags/config or the JAX_* environment).

    Set `coordinator_address`, `num_processes`, `process_id` in the config, or the variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. On Cloud TPU pods and SLURM,
    `COCONUT_DISTRIBUTED=auto` lets JAX discover them itself.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if coordinator:
        n = num_processes or int(os.environ["JAX_NUM_PROCESSES"])
        pid = process_id if process_id >= 0 else int(os.environ["JAX_PROCESS_ID"])
        # Cross-process collectives on CPU devices need gloo; it does not affect GPU/TPU runs.
        # (No backend query here: that would start JAX before `initialize`, which must come first.)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
    elif os.environ.get("COCONUT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    n = jax.device_count()
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide {n} devices")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {n} devices")
    # Auto axes: XLA's sharding propagation places intermediates (no explicit-sharding typing).
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def param_shardings(mesh, logical_axes: dict, shapes: dict):
    """NamedSharding of each parameter from its logical axes; a dimension the mesh axis does
    not divide is replicated instead."""
    def spec(axes, shape):
        out = []
        for name, dim in zip(axes, shape.shape):
            mesh_axis = LOGICAL_RULES.get(name)
            out.append(mesh_axis if mesh_axis and dim % mesh.shape[mesh_axis] == 0 else None)
        return NamedSharding(mesh, P(*out))
    return jax.tree.map(spec, logical_axes, shapes, is_leaf=lambda x: isinstance(x, tuple))


def put_params(params, shardings, dtype=np.float32):
    """Host NumPy params (the same on every process) -> global arrays of `dtype` (one for all,
    or a tree of dtypes like the params) placed by `shardings`."""
    def put(x, s, d):
        x = np.asarray(x).astype(d, copy=False)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    dtypes = dtype if isinstance(dtype, dict) else jax.tree.map(lambda _: dtype, params)
    return jax.tree.map(put, params, shardings, dtypes)


def batch_sharding(mesh):
    return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(mesh, arrays: dict[str, np.ndarray]):
    """This process's rows -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    procs = jax.process_count()

    def put(x):
        global_shape = (x.shape[0] * procs,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return {k: put(v) for k, v in arrays.items()}


def gather(x) -> np.ndarray:
    """A (possibly multi-host) global array as NumPy on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    hosts.barrier("gather")  # what is gathered took each host its own time
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
