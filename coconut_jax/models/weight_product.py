"""A scan of short model passes whose layer-kernel gradients are formed once, after it.

The continuous thoughts run as a `lax.scan` of passes of one position per row. Left to
`jax.grad`, the scan's backward adds a full-size weight gradient, a rank-B product, into its
carry once per pass: per thought it reads and writes every kernel's gradient besides reading
the kernels, several times the pass's own weight traffic. `scan` here keeps instead what each
pass's projections took in (their inputs, [B,1,...]) and, in the backward, what came back to
their outputs (the cotangents), and forms every kernel's gradient as one product over all
passes' rows after the scan; everything else (norms, biases, adapters, the carry, the
constants) is differentiated as before.

How the passes are seen: `FunctionalModel.body` asks `active()` whether a scan here is
recording; if so each layer runs under `layer(...)`, and `FunctionalModel.project` hands
every projection's input and output to `tap` (which adds a zero "tap" to the output, the
handle its cotangent comes back through). Nothing changes when no scan here is active.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp

from coconut_jax import trainable

KERNEL = "kernel"
_BODY = contextvars.ContextVar("weight_product_body", default=None)
_LAYER = contextvars.ContextVar("weight_product_layer", default=None)


@dataclasses.dataclass
class Projection:
    """What a projection of a layer is, found while tracing: its einsum spec and the shapes of
    one layer's input and output."""
    spec: str
    x: jax.ShapeDtypeStruct
    y: jax.ShapeDtypeStruct


class _Body:
    """The body calls of one pass. `taps`: per body call, {projection path: zeros
    [n_layer, *output]} (None while the projections are being found); each call leaves its
    projections ({path: Projection}) and, when tapped, their inputs ({path: [n_layer, *input]})."""

    def __init__(self, taps=None):
        self.taps = taps
        self.projections: list[dict] = []
        self.inputs: list[dict] = []

    def next_taps(self):
        return None if self.taps is None else self.taps[len(self.projections)]


class _Layer:
    def __init__(self, params, taps):
        # Each projection's params are a dict of the layer's params: found by identity.
        self.paths = {}

        def walk(tree, prefix):
            for k, v in tree.items():
                if isinstance(v, dict):
                    self.paths[id(v)] = prefix + (k,)
                    walk(v, prefix + (k,))
        walk(params, ())
        self.taps = taps
        self.projections: dict = {}
        self.inputs: dict = {}


def active():
    """The recording body-call log of a pass of `scan`, or None."""
    return _BODY.get()


@contextlib.contextmanager
def layer(params, taps):
    """Records the projections of one layer's computation (`params`: the layer's params; `taps`:
    {path: the zero added to that projection's output}, or None)."""
    rec = _Layer(params, taps)
    token = _LAYER.set(rec)
    try:
        yield rec
    finally:
        _LAYER.reset(token)


def tap(p, x, y, spec: str):
    """`y` = the projection of `x` by the params `p` (within `layer`, else returned as is): its
    input recorded and its tap added."""
    rec = _LAYER.get()
    if rec is None or KERNEL not in p:
        return y
    path = rec.paths[id(p)]
    rec.projections[path] = Projection(spec, jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       jax.ShapeDtypeStruct(y.shape, y.dtype))
    if rec.taps is None:
        return y
    rec.inputs[path] = x
    return y + rec.taps[path].astype(y.dtype)


def body_done(projections: dict, inputs: dict | None) -> None:
    """Called by a body once its layers ran under `layer`: what they recorded, stacked over layers."""
    rec = _BODY.get()
    rec.projections.append(projections)
    if inputs is not None:
        rec.inputs.append(inputs)


def _is_kernel(path) -> bool:
    return path[0] == "h" and path[-1] == KERNEL


def _with_body(taps, fn, *args):
    rec = _Body(taps)
    token = _BODY.set(rec)
    try:
        out = fn(*args)
    finally:
        _BODY.reset(token)
    return out, rec


def _kernel_gradient(projection: Projection, xs, gs, n_layer: int):
    """[n_layer, *kernel] = the sum over passes and rows of x^T g, one product per layer.
    xs: [passes, n_layer, *input], gs: [passes, n_layer, *output]."""
    lhs, rest = projection.spec.split(",")
    kernel, out = rest.split("->")

    def merged(a):  # passes into the rows' axis: [n_layer, passes * B, ...]
        a = jnp.swapaxes(a, 0, 1)
        return a.reshape((n_layer, a.shape[1] * a.shape[2]) + a.shape[3:])
    return jax.vmap(lambda x, g: jnp.einsum(f"{lhs},{out}->{kernel}", x, g, preferred_element_type=jnp.float32))(
        merged(xs), merged(gs))


def scan(step, params, consts, init, xs, *, n_layer: int, deferred: bool = True):
    """`jax.lax.scan(lambda c, x: step(params, consts, c, x), init, xs)`, with the gradients of
    the layers' kernels in `params` formed once after the scan (the module's docstring).

    `step(params, consts, carry, x) -> (carry, y)` runs the model's `body` (once or more) and
    must reach traced values only through its arguments. `params`: the model's params, layers
    stacked or not. Gradients equal `jax.grad` of the plain scan up to summation order, which
    `deferred=False` runs."""
    if not deferred:
        return jax.lax.scan(lambda c, x: step(params, consts, c, x), init, xs)
    # Which projections a pass runs, and their shapes: one abstract trace of a pass.
    x0 = jax.tree.map(lambda a: a[0], xs)
    found = _with_body(None, lambda: jax.eval_shape(step, params, consts, init, x0))[1].projections
    if not found:
        return jax.lax.scan(lambda c, x: step(params, consts, c, x), init, xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    taps = [{path: jnp.zeros((n, n_layer) + pr.y.shape, pr.y.dtype) for path, pr in call.items()} for call in found]
    rest, kernels = trainable.split(params, lambda path: not _is_kernel(path))
    kernel_shapes = jax.tree.map(lambda k: jax.ShapeDtypeStruct(k.shape, k.dtype), kernels)

    def tapped_scan(kernels, rest, consts, init, xs, taps):
        p = trainable.merge(rest, kernels)

        def one(carry, x_and_taps):
            x, t = x_and_taps
            (carry, y), rec = _with_body(t, step, p, consts, carry, x)
            return carry, (y, rec.inputs)
        carry, (ys, inputs) = jax.lax.scan(one, init, (xs, taps))
        return (carry, ys), inputs

    @jax.custom_vjp
    def run(kernels, rest, consts, init, xs, taps):
        p = trainable.merge(rest, kernels)
        return jax.lax.scan(lambda c, x: step(p, consts, c, x), init, xs)

    def fwd(kernels, rest, consts, init, xs, taps):
        # The kernels are constants of the pass's backward: their gradients are not formed there.
        out, vjp, inputs = jax.vjp(lambda *a: tapped_scan(kernels, *a), rest, consts, init, xs, taps, has_aux=True)
        return out, (vjp, inputs)

    def bwd(res, ct):
        vjp, inputs = res
        d_rest, d_consts, d_init, d_xs, d_taps = vjp(ct)
        d_kernels = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), kernel_shapes)
        stacked = "0" not in kernel_shapes["h"]
        for call, call_inputs, call_taps in zip(found, inputs, d_taps):
            for path, pr in call.items():
                g = _kernel_gradient(pr, call_inputs[path], call_taps[path], n_layer)
                for i in ([None] if stacked else range(n_layer)):
                    where = ("h",) + (() if stacked else (str(i),)) + path + (KERNEL,)
                    holder = d_kernels
                    for k in where[:-1]:
                        holder = holder[k]
                    holder[KERNEL] = holder[KERNEL] + (g if i is None else g[i])
        d_kernels = jax.tree.map(lambda d, s: d.astype(s.dtype), d_kernels, kernel_shapes)
        return d_kernels, d_rest, d_consts, d_init, d_xs, jax.tree.map(jnp.zeros_like, d_taps)

    run.defvjp(fwd, bwd)
    return run(kernels, rest, consts, init, xs, taps)
