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
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from coconut_jax import sharding, trainable
from coconut_jax.models import lora as lora_lib
from coconut_jax.optimizer import carry_schedule


def part_trains(part_models) -> dict:
    """{name: which of a part's params train}: its adapters when it has LoRA's, else all (None)."""
    return {name: None if getattr(m, "lora", None) is None else lora_lib.trains(m.lora) for name, m in part_models}


def _part_args(part_models, parts) -> dict:
    """{name: (model, params)}, what a method's `loss_terms` receives as `parts`."""
    return {name: (m, parts[name]) for name, m in part_models}


@functools.partial(jax.jit, static_argnames=("method", "prefix_len", "n_latent", "part_models"))
def term_counts(arrays, *, method, prefix_len, n_latent, part_models=()):
    """{term: count} of one micro-batch (`method.term_counts`, on the mesh: every host's rows)."""
    return method.term_counts(arrays, prefix_len=prefix_len, n_latent=n_latent, parts=dict(part_models))


@functools.partial(jax.jit, static_argnames=("loss",))
def _scales(totals, *, loss):
    (first, w0), rest = loss[0], loss[1:]
    n0 = jnp.maximum(totals[first], 1.0)
    return {t: (w / w0) * n0 / jnp.maximum(totals[t], 1.0) for t, w in rest}


def term_scales(method, micro_batches, part_models=()) -> dict | None:
    """The cotangents that make one backward pass give a several-term step's gradient: each
    term after the first weighs its sum by (w_t / w_0) x N_0 / N_t, N being a term's count over
    the step's micro-batches [(arrays, prefix_len, n_latent), ...] (from `term_counts`, before
    any gradient); `mean_gradient` then divides once, by the first term's N_0 / w_0. None for a
    one-term loss (its cotangent is 1: exactly `value_and_grad`)."""
    if len(method.loss) == 1:
        return None
    totals = None
    for arrays, prefix_len, n_latent in micro_batches:
        counts = term_counts(arrays, method=method, prefix_len=prefix_len, n_latent=n_latent, part_models=part_models)
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    return _scales(totals, loss=method.loss)


def abstract_scales(method) -> dict | None:
    """`term_scales`' shapes, for compiling a step without data."""
    return None if len(method.loss) == 1 else {t: jax.ShapeDtypeStruct((), jnp.float32) for t, _ in method.loss[1:]}


@functools.partial(jax.jit, static_argnames=("model", "method", "prefix_len", "n_latent", "loss_chunk", "part_models"),
                   donate_argnums=(2,))
def accumulate(model, trained, acc, arrays, key, scales=None, *, method, prefix_len, n_latent, loss_chunk=0,
               frozen=None, part_models=(), frozen_parts=None):
    """Adds one micro-batch's gradient of the loss (and each term's sum and count) to `acc`.

    `trained`: the optimizer's tree (`trainable`: the model's params when everything trains and
    the method adds no part); `frozen`: the model's params that do not train (None: none);
    `part_models`: ((name, model), ...) of the method's parts, whose params are in `trained`
    (their frozen params, under LoRA on a part, in `frozen_parts`: {name: params}).
    `method`: the run's `methods.Method`, whose `loss_terms` is the loss. One backward pass
    whatever the number of terms: the first term's sum gets cotangent 1 and each other term
    the step's `scales` (`term_scales`), so the accumulated gradient divided once by the first
    term's count over the step (`mean_gradient`) is the step's objective's; a one-term loss is
    exactly `value_and_grad`.

    `key`: the dropout key, or (base key, step, micro-batch) from which it is derived inside
    the program (no per-step host dispatch for key arithmetic)."""
    if isinstance(key, tuple):
        base, step, micro = key
        key = jax.random.fold_in(jax.random.fold_in(base, step), micro)

    def f(t):
        params, parts = trainable.unpack(t, frozen, bool(part_models), frozen_parts)
        terms = method.loss_terms(model, params, arrays, prefix_len=prefix_len, n_latent=n_latent, dropout_key=key,
                                  loss_chunk=loss_chunk, parts=_part_args(part_models, parts))
        return {t: s for t, (s, _) in terms.items()}, {t: n for t, (_, n) in terms.items()}
    sums, pull, counts = jax.vjp(f, trained, has_aux=True)
    first = method.loss[0][0]
    if len(sums) > 1 and scales is None:
        raise ValueError(f"method {method.name!r} has {len(sums)} loss terms: accumulate needs their scales "
                         f"(steps.term_scales)")
    cotangent = {t: jnp.ones_like(v) if t == first else scales[t].astype(v.dtype) for t, v in sums.items()}
    return {"grads": jax.tree.map(jnp.add, acc["grads"], pull(cotangent)[0]),
            "sums": {t: acc["sums"][t] + sums[t] for t in sums},
            "counts": {t: acc["counts"][t] + counts[t] for t in sums}}


def train_step(state: "TrainState", micro_batches, *, method, base_key, step: int, loss_chunk: int = 0):
    """One optimizer step: the micro-batches' gradients accumulated (token-weighted), then the
    update. `micro_batches` yields (batch, its arrays on the mesh); micro-batch k of step
    `step` draws its dropout from `base_key` folded with (step, k) inside the program. Returns
    the step's losses as device scalars ("loss", and each term of a several-term loss), read
    back when the caller wants them."""
    micro_batches = list(micro_batches)
    scales = term_scales(method, [(arrays, b.prefix_len, b.n_latent) for b, arrays in micro_batches],
                         state.part_models)
    acc = state.take_accumulator()
    for k, (batch, arrays) in enumerate(micro_batches):
        acc = accumulate(state.model, state.trained, acc, arrays, (base_key, np.int32(step), np.int32(k)), scales,
                         method=method, prefix_len=batch.prefix_len, n_latent=batch.n_latent, loss_chunk=loss_chunk,
                         frozen=state.frozen, part_models=state.part_models, frozen_parts=state.frozen_parts)
    losses, acc = state.update(acc)
    state.keep_accumulator(acc)
    return losses


def zero_accumulator(trained, terms) -> dict:
    """An empty accumulator for `accumulate`: one gradient tree like `trained`, and a sum and a
    count per term (each scalar its own buffer, since `accumulate` donates them)."""
    return {"grads": jax.tree.map(jnp.zeros_like, trained), "sums": {t: jnp.zeros((), jnp.float32) for t in terms},
            "counts": {t: jnp.zeros((), jnp.float32) for t in terms}}


def _weighted(x, w: float):
    return x if w == 1.0 else x * w  # a weight of 1 leaves the figures exactly as they were


def mean_gradient(acc, loss=(("lm", 1.0),)):
    """(gradient, losses) of the accumulated micro-batches: the gradient (every term already
    weighed by its count relative to the first's, `term_scales`) divided once by the first
    term's count and times its weight; each term's sum over its own count (token-weighted for
    "lm"), weighted as the method's `loss` says and added up. `losses` holds "loss", the
    objective, and each term's mean when there are several."""
    first, w0 = loss[0]
    n0 = jnp.maximum(acc["counts"][first], 1.0)
    # In the gradients' own dtype: an f32 quotient would turn bf16 Adam moments into f32.
    grads = jax.tree.map(lambda x: _weighted(x / n0, w0).astype(x.dtype), acc["grads"])
    total, losses = None, {}
    for term, w in loss:
        mean = acc["sums"][term] / jnp.maximum(acc["counts"][term], 1.0)
        total = _weighted(mean, w) if total is None else total + _weighted(mean, w)
        losses[term] = mean
    return grads, {"loss": total, **(losses if len(loss) > 1 else {})}


def apply_update(tx, params, opt_state, acc, loss=(("lm", 1.0),)):
    """One optimizer step on the mean gradient of the accumulated micro-batches."""
    grads, losses = mean_gradient(acc, loss)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses


def zeros_like_acc(acc):
    return jax.tree.map(jnp.zeros_like, acc)


@functools.partial(jax.jit, static_argnames=("model", "method", "prefix_len", "n_latent", "loss_chunk", "part_models"))
def eval_loss_terms(model, params, arrays, *, method, prefix_len, n_latent, loss_chunk=0, parts=None, part_models=()):
    """{term: (sum, count)} of a validation batch (no dropout); `parts`: {name: params} of the
    method's parts, `part_models` as for `accumulate`."""
    return method.loss_terms(model, params, arrays, prefix_len=prefix_len, n_latent=n_latent, loss_chunk=loss_chunk,
                             parts=_part_args(part_models, parts or {}))


def like_params(tree_shapes, params, replicated):
    """Shardings for a tree (an optimizer state) whose param-shaped subtrees follow the params.

    A leaf whose path ends with a parameter's path and has its shape takes that parameter's
    sharding; anything else (step counts) is replicated."""
    by_path = {trainable.names(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def pick(path, leaf):
        names = trainable.names(path)
        for i in range(len(names)):
            x = by_path.get(names[i:])
            if x is not None and x.shape == leaf.shape:
                return x.sharding
        return replicated
    return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def placed_shapes(model, mesh, dtype=jnp.float32):
    """(shardings, abstract params with those shardings) of a model's params on the mesh."""
    shardings = sharding.param_shardings(mesh, model.logical_axes(), model.param_shapes(dtype))
    return shardings, _abstract(model.param_shapes(dtype), shardings)


class Layout:
    """Where a run's state lives, with no array allocated: the shapes, dtypes and shardings of
    the model's params, the trained tree (`trainable`), the frozen params, the optimizer state
    and the gradient accumulator. `TrainState` places its arrays by it; `coconut_jax.plan`
    compiles the step from it alone. `part_models`: ((name, model), ...) of the method's parts."""

    def __init__(self, model, mesh, tx, param_dtype=jnp.float32, loss=(("lm", 1.0),), part_models=(), trains=None):
        self.terms = [t for t, _ in loss]
        self.part_models = tuple(part_models)
        self.param_sh, self.params = placed_shapes(model, mesh, param_dtype)
        placed = {name: placed_shapes(m, mesh, param_dtype) for name, m in self.part_models}
        self.part_sh = {name: sh for name, (sh, _) in placed.items()}
        parts = {name: shapes for name, (_, shapes) in placed.items()}
        self.part_trains = part_trains(self.part_models)
        model_trained, self.frozen = trainable.split(self.params, trains)
        parts_trained, self.frozen_parts = trainable.split_parts(parts, self.part_trains)
        self.trained = trainable.pack(model_trained, parts_trained)
        self.trained_sh = trainable.pack(trainable.split(self.param_sh, trains)[0],
                                         trainable.split_parts(self.part_sh, self.part_trains)[0])
        self.scalar = NamedSharding(mesh, P())
        opt_shapes = jax.eval_shape(tx.init, self.trained)
        self.opt_sh = like_params(opt_shapes, self.trained, self.scalar)
        self.opt_state = _abstract(opt_shapes, self.opt_sh)
        # One gradient tree whatever the number of terms (`accumulate`), a sum and count per term.
        self.acc_sh = {"grads": self.trained_sh, "sums": {t: self.scalar for t in self.terms},
                       "counts": {t: self.scalar for t in self.terms}}
        zero = jax.ShapeDtypeStruct((), jnp.float32)
        self.acc = _abstract({"grads": self.trained, "sums": {t: zero for t in self.terms},
                              "counts": {t: zero for t in self.terms}}, self.acc_sh)


def make_update(tx, loss, layout: Layout):
    """The jitted update of a layout's state: (trained, opt_state, acc) -> (trained, opt_state,
    the step's losses, the accumulator zeroed), all three inputs donated."""
    def update_and_clear(trained, opt_state, acc):
        # The spent accumulator comes back zeroed in its own (donated) buffers: no
        # gradient-sized allocation per step.
        return (*apply_update(tx, trained, opt_state, acc, loss), zeros_like_acc(acc))
    terms = layout.terms
    loss_sh = {k: layout.scalar for k in ["loss"] + (terms if len(terms) > 1 else [])}
    return jax.jit(update_and_clear, donate_argnums=(0, 1, 2),
                   out_shardings=(layout.trained_sh, layout.opt_sh, loss_sh, layout.acc_sh))


class TrainState:
    """Params + optimizer state on the mesh, and the jitted update functions of a run.

    The optimizer updates the *trained* tree (`trainable`): the model's trained params, and
    the params of the method's parts when it has any; the model's frozen params are held
    beside it. `params` is the model's whole params (what evaluation, generation and export
    read), `parts` the parts' ({name: params})."""

    def __init__(self, model, params_host, mesh, tx, param_dtype=jnp.float32, loss=(("lm", 1.0),), *,
                 parts: dict | None = None, trains=None, base_in_checkpoint: bool = True):
        """`params_host`: NumPy params (the same on every process), or None for zeros of the
        model's shapes (a template that a checkpoint restore fills). `param_dtype`: how the
        params (and so the optimizer's moments and the gradients) are stored; bf16 halves
        their memory for models that do not fit in f32. `loss`: the method's named terms and
        weights (`methods.Method.loss`): one gradient accumulator, a sum and count per term.
        `parts`: {name: (its model, its host params or None)} of the method's parts. `trains`: which of the
        model's params train (`methods.Method.trains`; None: all). `base_in_checkpoint=False`
        (LoRA): checkpoints hold the trained params only, the frozen base being rebuilt from
        its source when a run resumes."""
        self.model, self.mesh, self.tx, self.trains = model, mesh, tx, trains
        self.base_in_checkpoint = base_in_checkpoint
        parts = parts or {}
        part_models = tuple((name, m) for name, (m, _) in sorted(parts.items()))
        self.layout = lay = Layout(model, mesh, tx, param_dtype, loss, part_models, trains)
        self.part_models = lay.part_models
        self.param_sh, self.opt_sh, self.acc_sh = lay.param_sh, lay.opt_sh, lay.acc_sh
        params = self._place(params_host, lay.param_sh, lay.params)
        part_params = {name: self._place(parts[name][1], lay.part_sh[name], m.param_shapes(param_dtype))
                       for name, m in self.part_models}
        model_trained, self.frozen = trainable.split(params, trains)
        parts_trained, self.frozen_parts = trainable.split_parts(part_params, lay.part_trains)
        self.trained = trainable.pack(model_trained, parts_trained)
        terms = lay.terms
        self._init = jax.jit(tx.init, out_shardings=lay.opt_sh)
        self.update_fn = make_update(tx, loss, lay)
        self._zeros = jax.jit(lambda p: zero_accumulator(p, terms), out_shardings=lay.acc_sh)
        self.opt_state = self._init(self.trained)

    @staticmethod
    def _place(host, shardings, shapes):
        """Host params (or zeros, for None) placed by `shardings`, each at its dtype in `shapes`."""
        if host is None:
            return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                           out_shardings=shardings)()
        return sharding.put_params(host, shardings, jax.tree.map(lambda s: s.dtype, shapes))

    @property
    def params(self) -> dict:
        return trainable.unpack(self.trained, self.frozen, bool(self.part_models))[0]

    @property
    def parts(self) -> dict:
        return trainable.unpack(self.trained, self.frozen, bool(self.part_models), self.frozen_parts)[1]

    def reset_optimizer(self) -> None:
        """New moments (the reference resets them every epoch); a schedule keeps its position."""
        self.opt_state = carry_schedule(self._init(self.trained), self.opt_state)

    def new_accumulator(self):
        return self._zeros(self.trained)

    def take_accumulator(self):
        """The zeroed accumulator the last update handed back (a new one the first time): no
        gradient-sized allocation per step."""
        acc, self._acc = getattr(self, "_acc", None), None
        return self.new_accumulator() if acc is None else acc

    def keep_accumulator(self, acc) -> None:
        self._acc = acc

    def update(self, acc):
        """Applies the accumulated gradient; returns (the step's losses as device scalars: "loss",
        and each term's mean when the loss has several; the accumulator zeroed for the next
        step). `acc` is consumed."""
        self.trained, self.opt_state, losses, acc = self.update_fn(self.trained, self.opt_state, acc)
        return losses, acc

    def checkpoint_tree(self) -> dict:
        """What a checkpoint holds: the model's whole params (its trained ones only, when the
        base is not kept: LoRA), the optimizer state and, when the method has parts, their
        params (`parts/<name>`)."""
        params = (self.params if self.base_in_checkpoint
                  else trainable.unpack(self.trained, None, bool(self.part_models))[0])
        tree = {"params": params, "opt_state": self.opt_state}
        return {**tree, "parts": self.parts} if self.part_models else tree

    def abstract(self) -> dict:
        """Shapes, dtypes and shardings of `checkpoint_tree`, the target of a checkpoint restore."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            self.checkpoint_tree())

    def load(self, state: dict) -> None:
        """Takes a restored `checkpoint_tree`."""
        model_trained, frozen = trainable.split(state["params"], self.trains)
        if self.base_in_checkpoint:
            self.frozen = frozen
        parts_trained, self.frozen_parts = trainable.split_parts(state.get("parts") or {}, self.layout.part_trains)
        self.trained = trainable.pack(model_trained, parts_trained)
        self.opt_state = state["opt_state"]
