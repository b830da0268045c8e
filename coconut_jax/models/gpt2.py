"""GPT-2 in Flax NNX, used functionally.

The module holds parameters only; every call takes the parameter state explicitly
(`GPT2Model.embed/body/logits`), and keys/values are explicit pytrees passed in and
out, so the Coconut code can run the transformer over any slice of a sequence against
keys/values computed earlier.
Every parameter carries logical axis names (`out_sharding` metadata) that
`coconut_jax.sharding` maps onto a device mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Logical axis names. `sharding.LOGICAL_RULES` maps them to mesh axes.
VOCAB, EMBED, POSITION, QKV, HEADS_OUT, MLP = "vocab", "embed", "position", "qkv", "heads", "mlp"


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    activation_function: str = "gelu_new"
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        cfg = cls(**kwargs)
        if cfg.activation_function not in _ACTIVATIONS:
            raise ValueError(f"unsupported GPT-2 activation_function {cfg.activation_function!r}; "
                             f"supported: {sorted(_ACTIVATIONS)}")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def _param(rngs: nnx.Rngs, shape, axes, std: float | None):
    value = (jnp.zeros(shape, jnp.float32) if std is None
             else std * jax.random.normal(rngs.params(), shape, jnp.float32))
    return _annotated(value, axes)


def _ones(shape, axes):
    return _annotated(jnp.ones(shape, jnp.float32), axes)


def _annotated(value, axes):
    # Placement happens in `coconut_jax.sharding` (jit with out_shardings), not at creation.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
        self.scale = _ones((dim,), (EMBED,))
        self.bias = _param(rngs, (dim,), (EMBED,), None)


class Dense(nnx.Module):
    """HF `Conv1D`: y = x @ W + b with W stored as (in, out)."""

    def __init__(self, n_in, n_out, axes, std, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (n_in, n_out), axes, std)
        self.bias = _param(rngs, (n_out,), (axes[1],), None)


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        e, std = cfg.n_embd, cfg.initializer_range
        # GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer).
        proj_std = std / (2 * cfg.n_layer) ** 0.5
        self.ln_1 = LayerNorm(e, cfg.layer_norm_epsilon, rngs)
        self.c_attn = Dense(e, 3 * e, (EMBED, QKV), std, rngs)
        self.attn_proj = Dense(e, e, (HEADS_OUT, EMBED), proj_std, rngs)
        self.ln_2 = LayerNorm(e, cfg.layer_norm_epsilon, rngs)
        self.c_fc = Dense(e, 4 * e, (EMBED, MLP), std, rngs)
        self.mlp_proj = Dense(4 * e, e, (MLP, EMBED), proj_std, rngs)


# -- the forward computation, as functions of the params pytree ---------------------------------

def layer_norm(p, x, eps: float):
    # Statistics in f32 whatever the compute dtype (as mixed-precision PyTorch does).
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = ((xf - mean) ** 2).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


def dense(p, x):
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def segment_attention(q, segments, dropout_rate: float, key):
    """Attention of q [B,T,H,D] over every segment's keys at once (one softmax), without
    concatenating them: the form for decoding against a long cache, and with dropout.
    segments: (k, v [B,H,S,D], allowed [B,T|1,S]) each. Keys/values are kept heads-major
    so that a decode step reads the cache in place (a [B,S,H,D] cache is transposed, i.e.
    copied, by every step: 10x slower on CPU)."""
    scale = jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = [jnp.where(allowed[:, None],
                        jnp.einsum("bthd,bhsd->bhts", q, sk.astype(q.dtype)).astype(jnp.float32) / scale,
                        jnp.finfo(jnp.float32).min)
              for sk, _, allowed in segments]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    probs = _dropout(probs, dropout_rate, key).astype(q.dtype)
    bounds = np.cumsum([sk.shape[2] for sk, _, _ in segments])[:-1]
    return sum(jnp.einsum("bhts,bhsd->bthd", pr, sv.astype(q.dtype))
               for pr, (_, sv, _) in zip(jnp.split(probs, bounds, axis=-1), segments))


def fused_attention(q, segments):
    """The same attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel on
    GPUs when the dtype allows, XLA's otherwise), the segments' keys concatenated."""
    k = jnp.concatenate([sk.astype(q.dtype) for sk, _, _ in segments], axis=2).swapaxes(1, 2)
    v = jnp.concatenate([sv.astype(q.dtype) for _, sv, _ in segments], axis=2).swapaxes(1, 2)
    t = q.shape[1]
    mask = jnp.concatenate([jnp.broadcast_to(allowed, allowed.shape[:1] + (t,) + allowed.shape[2:])
                            for _, _, allowed in segments], axis=-1)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def block(p, x, self_allowed, past, cfg: GPT2Config, keys, fused: bool):
    """One transformer layer. x: [B,T,E]; self_allowed: [B,T,T] bool (causal among the
    inputs); past: (k, v [B,H,S,D], allowed [B,1,S]) per earlier segment of this layer.

    Returns the new x and this layer's (k, v) of the inputs. The fused kernel serves when
    there is no attention dropout and more than one query (a decode step keeps the
    per-segment form, which does not copy the cache).
    """
    b, t, _ = x.shape
    h, d = cfg.n_head, cfg.head_dim
    qkv = dense(p["c_attn"], layer_norm(p["ln_1"], x, cfg.layer_norm_epsilon))
    q, k, v = (a.reshape(b, t, h, d) for a in jnp.split(qkv, 3, axis=-1))
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B,H,T,D], the cache layout
    segments = [*past, (k, v, self_allowed)]
    if fused and t > 1 and (keys[0] is None or cfg.attn_pdrop == 0.0):
        attn = fused_attention(q, segments)
    else:
        attn = segment_attention(q, segments, cfg.attn_pdrop, keys[0])
    x = x + _dropout(dense(p["attn_proj"], attn.reshape(b, t, h * d)), cfg.resid_pdrop, keys[1])
    act = _ACTIVATIONS[cfg.activation_function]
    mlp = dense(p["mlp_proj"], act(dense(p["c_fc"], layer_norm(p["ln_2"], x, cfg.layer_norm_epsilon))))
    x = x + _dropout(mlp, cfg.resid_pdrop, keys[2])
    return x, (k, v)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,         # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class GPT2(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.wte = _param(rngs, (cfg.vocab_size, cfg.n_embd), (VOCAB, EMBED), cfg.initializer_range)
        self.wpe = _param(rngs, (cfg.n_positions, cfg.n_embd), (POSITION, EMBED), 0.01)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, rngs)


def _split_keys(key, n):
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


Params = dict  # nested {name: {...: array}} with string keys, e.g. params["h"]["0"]["c_fc"]["kernel"]


def _path_str(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class GPT2Model:
    """Static description of a GPT-2: config, compute dtype and how the layers run (hashable,
    a static jit argument).

    Functional interface over a params pytree (nested dict of f32 arrays):
      init(seed) -> params
      embed(params, ids) -> token embeddings [B,T,E]
      body(params, embeds, positions, key_mask, past=(), dropout_key=None)
          -> (final hidden states after ln_f [B,T,E], keys/values of the inputs)
      logits(params, hidden) -> [B,T,V] through the tied head, in f32

    `scan_layers`: the layers run as one `lax.scan` over their stacked params (compile time
    independent of depth); `remat`: a key of REMAT_POLICIES, what the backward pass keeps
    of each layer; `fused_attention`: `jax.nn.dot_product_attention` where it applies.
    """

    def __init__(self, config: GPT2Config, dtype=jnp.float32, *, scan_layers: bool = False, remat: str = "none",
                 fused_attention: bool = True):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.scan_layers, self.remat, self.fused_attention = scan_layers, remat, fused_attention
        graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT2(config, nnx.Rngs(0))), nnx.Param)
        self._template = [(path, var) for path, var in nnx.to_flat_state(state)]

    def _key(self):
        return (self.config, self.dtype, self.scan_layers, self.remat, self.fused_attention)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, GPT2Model) and self._key() == other._key()

    def __repr__(self):
        return (f"GPT2Model({self.config}, dtype={self.dtype.name}, scan_layers={self.scan_layers}, "
                f"remat={self.remat}, fused_attention={self.fused_attention})")

    def replace(self, **kw) -> "GPT2Model":
        args = dict(dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat,
                    fused_attention=self.fused_attention)
        args.update(kw)
        return GPT2Model(self.config, **args)

    def with_dtype(self, dtype) -> "GPT2Model":
        return self.replace(dtype=dtype)

    def init(self, seed: int = 0) -> Params:
        """Random GPT-2 initialisation (normal(0.02), residual projections scaled)."""
        _, state = nnx.split(GPT2(self.config, nnx.Rngs(seed)), nnx.Param)
        params: Params = {}
        for path, var in nnx.to_flat_state(state):
            set_path(params, _path_str(path), var.get_value())
        return params

    def _per_param(self, fn) -> Params:
        out: Params = {}
        for path, var in self._template:
            set_path(out, _path_str(path), fn(var))
        return out

    def logical_axes(self) -> Params:
        """Logical axis names of every parameter, in the params' tree structure."""
        return self._per_param(lambda v: tuple(v.get_metadata()["out_sharding"]))

    def param_shapes(self) -> Params:
        return self._per_param(lambda v: jax.ShapeDtypeStruct(v.get_value().shape, jnp.float32))

    def embed(self, params, ids):
        return jnp.take(params["wte"], ids, axis=0).astype(self.dtype)

    def stack_layers(self, params):
        """Params whose layers are stacked along a leading axis (what the scan runs over).

        Callers that run `body` several times per step stack once and pass the result, so
        the copy is made once; `body` accepts either form."""
        if not self.scan_layers or "0" not in params["h"]:
            return params
        layers = [params["h"][str(i)] for i in range(self.config.n_layer)]
        return {**params, "h": jax.tree.map(lambda *a: jnp.stack(a), *layers)}

    def _layer_fn(self):
        cfg, fused = self.config, self.fused_attention

        def layer(p, x, self_allowed, past, keys):
            return block(p, x, self_allowed, past, cfg, keys, fused)
        policy = REMAT_POLICIES[self.remat]
        return layer if self.remat == "none" else jax.checkpoint(layer, policy=policy)

    def body(self, params, embeds, positions, key_mask, past=(), dropout_key=None):
        """Runs the transformer on `embeds` (token embeddings or continuous thoughts).

        `key_mask` [B,T] says which inputs are real tokens; attention among the inputs is
        causal. `past` holds keys/values computed earlier for positions that precede all
        the inputs: a sequence of segments {"k", "v": [L,B,H,S,D], "mask": [B,S]}, every
        valid key of which each input attends to. Returns (final hidden states after ln_f
        [B,T,E], {"k", "v": [L,B,H,T,D]} of the inputs), so a caller can extend `past`.
        """
        cfg, n = self.config, self.config.n_layer
        t = embeds.shape[1]
        keys = _split_keys(dropout_key, 1 + 3 * n)
        x = embeds.astype(self.dtype) + jnp.take(params["wpe"], positions, axis=0).astype(self.dtype)
        x = _dropout(x, cfg.embd_pdrop, keys[0])
        self_allowed = jnp.tril(jnp.ones((t, t), bool))[None] & key_mask.astype(bool)[:, None, :]
        past_allowed = [seg["mask"].astype(bool)[:, None, :] for seg in past]
        layer = self._layer_fn()
        if self.scan_layers:
            def step(x, xs):
                p, seg_kv, layer_keys = xs
                layer_past = [(k, v, allowed) for (k, v), allowed in zip(seg_kv, past_allowed)]
                x, kv = layer(p, x, self_allowed, layer_past, [None] * 3 if layer_keys is None else list(layer_keys))
                return x, kv
            stacked = self.stack_layers(params)["h"]
            seg_kv = [(seg["k"], seg["v"]) for seg in past]
            layer_keys = None if dropout_key is None else jnp.stack(keys[1:]).reshape(n, 3)
            x, (new_k, new_v) = jax.lax.scan(step, x, (stacked, seg_kv, layer_keys))
        else:
            new_k, new_v = [], []
            for i in range(n):
                p = params["h"][str(i)]
                layer_past = [(seg["k"][i], seg["v"][i], allowed) for seg, allowed in zip(past, past_allowed)]
                x, (k, v) = layer(p, x, self_allowed, layer_past, keys[1 + 3 * i: 4 + 3 * i])
                new_k.append(k)
                new_v.append(v)
            new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
        return layer_norm(params["ln_f"], x, cfg.layer_norm_epsilon), {"k": new_k, "v": new_v}

    def logits(self, params, hidden):
        wte = params["wte"]
        return jnp.einsum("...e,ve->...v", hidden, wte.astype(hidden.dtype)).astype(jnp.float32)
