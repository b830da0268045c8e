"""Training state on the mesh and the jitted steps that update it.

`TrainState` holds the params and optimizer state, both placed by the params' logical axes
(the optimizer's moments exactly like the params they follow), and the jitted functions,
each built once per run. Gradient accumulation sums token losses and token counts over
micro-batches and divides once, so accumulating equals the full batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from coconut_jax import coconut, sharding


def make_optimizer(c):
    return optax.adamw(c.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay)


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent", "feedback"), donate_argnums=(2,))
def accumulate(model, params, acc, arrays, key, *, prefix_len, n_latent, feedback):
    """Adds one micro-batch's gradient of the summed token loss (and the sums) to `acc`."""
    def f(p):
        return coconut.loss_terms(model, p, arrays, prefix_len, n_latent, feedback=feedback, dropout_key=key)
    (s, n), g = jax.value_and_grad(f, has_aux=True)(params)
    return {"grads": jax.tree.map(jnp.add, acc["grads"], g), "loss": acc["loss"] + s, "count": acc["count"] + n}


def mean_gradient(acc):
    """(token-weighted mean gradient, mean token loss) of the accumulated micro-batches."""
    count = jnp.maximum(acc["count"], 1.0)
    return jax.tree.map(lambda g: g / count, acc["grads"]), acc["loss"] / count


def apply_update(tx, params, opt_state, acc):
    """One optimizer step on the token-weighted mean gradient of the accumulated micro-batches."""
    grads, loss = mean_gradient(acc)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent", "feedback"))
def eval_loss_terms(model, params, arrays, *, prefix_len, n_latent, feedback):
    return coconut.loss_terms(model, params, arrays, prefix_len, n_latent, feedback=feedback)


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def like_params(tree_shapes, params, replicated):
    """Shardings for a tree (an optimizer state) whose param-shaped subtrees follow the params.

    A leaf whose path ends with a parameter's path and has its shape takes that parameter's
    sharding; anything else (step counts) is replicated."""
    by_path = {_names(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        names = _names(path)
        for i in range(len(names)):
            x = by_path.get(names[i:])
            if x is not None and x.shape == leaf.shape:
                return x.sharding
        return replicated
    return jax.tree_util.tree_map_with_path(pick, tree_shapes)


class TrainState:
    """Params + optimizer state on the mesh, and the jitted update functions of a run."""

    def __init__(self, model, params_host, mesh, tx):
        """`params_host`: NumPy params (the same on every process), or None for zeros of the
        model's shapes (a template that a checkpoint restore fills)."""
        self.model, self.mesh, self.tx = model, mesh, tx
        shapes = model.param_shapes()
        self.param_sh = sharding.param_shardings(mesh, model.logical_axes(), shapes)
        if params_host is None:
            self.params = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                                  out_shardings=self.param_sh)()
        else:
            self.params = sharding.put_params(params_host, self.param_sh)
        opt_shapes = jax.eval_shape(tx.init, self.params)
        self.opt_sh = like_params(opt_shapes, self.params, NamedSharding(mesh, P()))
        self._init = jax.jit(tx.init, out_shardings=self.opt_sh)
        self._update = jax.jit(functools.partial(apply_update, tx), donate_argnums=(0, 1),
                               out_shardings=(self.param_sh, self.opt_sh, None))
        self._zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=self.param_sh)
        self.opt_state = self._init(self.params)

    def reset_optimizer(self) -> None:
        self.opt_state = self._init(self.params)

    def new_accumulator(self):
        return {"grads": self._zeros(self.params), "loss": jnp.float32(0), "count": jnp.float32(0)}

    def update(self, acc):
        """Applies the accumulated gradient; returns the mean token loss (a device scalar)."""
        self.params, self.opt_state, loss = self._update(self.params, self.opt_state, acc)
        return loss

    def abstract(self) -> dict:
        """Shapes, dtypes and shardings of the state, the target of a checkpoint restore."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": self.params, "opt_state": self.opt_state})

    def load(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
