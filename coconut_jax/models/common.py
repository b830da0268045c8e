"""What every model family shares: parameter creation with logical axes, attention over
segments of keys/values, and the functional wrapper (`FunctionalModel`) the Coconut code uses.

A family (gpt2.py, llama.py) defines its parameter modules and four functions over the
params pytree: how inputs enter (`_inputs`), one layer (`_layer`), the final norm (`_final`)
and the head (`logits`). The layer loop, scanned or not, rematerialised or not, with keys and
values of earlier segments passed explicitly, is written once here.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coconut_jax.models import lora as lora_lib
from coconut_jax.models import weight_product

# Logical axis names. `sharding.LOGICAL_RULES` maps them to mesh axes.
VOCAB, EMBED, POSITION, MLP = "vocab", "embed", "position", "mlp"
QKV, HEADS, KV_HEADS, HEAD_DIM = "qkv", "heads", "kv_heads", "head_dim"

Params = dict  # nested {name: {...: array}} with string keys, e.g. params["h"]["0"]["c_fc"]["kernel"]

# Every family's token embedding is `wte` [V,E] and an untied head is `lm_head` [V,E] (rows
# per token, like the embedding), so vocabulary growth treats both the same way.
EMBEDDING, HEAD = "wte", "lm_head"


def param(rngs: nnx.Rngs, shape, axes, std: float | None):
    value = (jnp.zeros(shape, jnp.float32) if std is None
             else std * jax.random.normal(rngs.params(), shape, jnp.float32))
    return annotated(value, axes)


def ones(shape, axes):
    return annotated(jnp.ones(shape, jnp.float32), axes)


def annotated(value, axes):
    # Placement happens in `coconut_jax.sharding` (jit with out_shardings), not at creation.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def segment_attention(q, segments, dropout_rate: float, key):
    """Attention of q [B,T,H,D] over every segment's keys at once (one softmax), without
    concatenating them: the form for decoding against a long cache, and with dropout.
    segments: (k, v [B,K,S,D], allowed [B,T|1,S]) each, K key/value heads shared by H/K
    query heads each (grouped-query attention; K = H is plain multi-head). Keys/values are
    kept heads-major so that a decode step reads the cache in place (a [B,S,H,D] cache is
    transposed, i.e. copied, by every step: 10x slower on CPU)."""
    b, t, h, d = q.shape
    kv_heads = segments[0][0].shape[1]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scale = jnp.sqrt(jnp.float32(d))
    scores = [jnp.where(allowed[:, None, None],
                        jnp.einsum("btkgd,bksd->bkgts", qg, sk.astype(q.dtype)).astype(jnp.float32) / scale,
                        jnp.finfo(jnp.float32).min)
              for sk, _, allowed in segments]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    probs = dropout(probs, dropout_rate, key).astype(q.dtype)
    bounds = np.cumsum([sk.shape[2] for sk, _, _ in segments])[:-1]
    out = sum(jnp.einsum("bkgts,bksd->btkgd", pr, sv.astype(q.dtype))
              for pr, (_, sv, _) in zip(jnp.split(probs, bounds, axis=-1), segments))
    return out.reshape(b, t, h, d)


def fused_attention(q, segments):
    """The same attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel on
    GPUs when the dtype allows, XLA's otherwise; grouped heads natively), the segments'
    keys concatenated."""
    k = jnp.concatenate([sk.astype(q.dtype) for sk, _, _ in segments], axis=2).swapaxes(1, 2)
    v = jnp.concatenate([sv.astype(q.dtype) for _, sv, _ in segments], axis=2).swapaxes(1, 2)
    t = q.shape[1]
    mask = jnp.concatenate([jnp.broadcast_to(allowed, allowed.shape[:1] + (t,) + allowed.shape[2:])
                            for _, _, allowed in segments], axis=-1)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def attention(q, k, v, self_allowed, past, *, fused: bool, dropout_rate: float, key):
    """Attention of the inputs' queries over the keys/values of `past` segments and their
    own (k, v [B,K,T,D], causal `self_allowed`). The fused kernel serves when there is no
    attention dropout and more than one query (a decode step keeps the per-segment form,
    which does not copy the cache)."""
    segments = [*past, (k, v, self_allowed)]
    if fused and q.shape[1] > 1 and (key is None or dropout_rate == 0.0):
        return fused_attention(q, segments)
    return segment_attention(q, segments, dropout_rate, key)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,         # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def split_keys(key, n):
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def path_str(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class FunctionalModel:
    """Static description of a model: config, compute dtype and how the layers run
    (hashable, a static jit argument).

    Functional interface over a params pytree (nested dict of arrays, f32 unless stored
    otherwise):
      init(seed) -> params
      embed(params, ids) -> token embeddings [B,T,E]
      body(params, embeds, positions, key_mask, past=(), dropout_key=None)
          -> (final hidden states after the final norm [B,T,E], keys/values of the inputs)
      logits(params, hidden) -> [B,T,V] in f32

    `scan_layers`: the layers run as one `lax.scan` over their stacked params (compile time
    independent of depth); `remat`: a key of REMAT_POLICIES, what the backward pass keeps
    of each layer; `fused_attention`: `jax.nn.dot_product_attention` where it applies.

    A family sets `module` (its nnx parameter module, built from the config), `keys_per_layer`
    (dropout keys one layer takes) and defines `_inputs`, `_layer`, `_final` and `logits`.
    The config provides `n_layer`, `n_positions` (the context) and `vocab_size`.
    """
    module: type
    keys_per_layer: int = 1
    hf_names: "HFNames"

    def __init__(self, config, dtype=jnp.float32, *, scan_layers: bool = False, remat: str = "none",
                 fused_attention: bool = True, lora: "lora_lib.Lora | None" = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.scan_layers, self.remat, self.fused_attention = scan_layers, remat, fused_attention
        self.lora = lora
        _, state = nnx.split(nnx.eval_shape(lambda: self.module(config, nnx.Rngs(0))), nnx.Param)
        # (path, shape, logical axes, whether stored in f32 whatever the params' dtype)
        self._template = [(path_str(path), var.get_value().shape, tuple(var.get_metadata()["out_sharding"]), False)
                          for path, var in nnx.to_flat_state(state)]
        if lora is not None:
            self._template += [(path, shape, axes, True) for path, shape, axes in
                               lora_lib.template(lora, config.n_layer, self.kernel_shapes(), type(self))]

    def _key(self):
        return (type(self), self.config, self.dtype, self.scan_layers, self.remat, self.fused_attention, self.lora)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, FunctionalModel) and self._key() == other._key()

    def __repr__(self):
        return (f"{type(self).__name__}({self.config}, dtype={self.dtype.name}, scan_layers={self.scan_layers}, "
                f"remat={self.remat}, fused_attention={self.fused_attention}, lora={self.lora})")

    def replace(self, **kw) -> "FunctionalModel":
        args = dict(dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat,
                    fused_attention=self.fused_attention, lora=self.lora)
        args.update(kw)
        return type(self)(self.config, **args)

    def with_dtype(self, dtype) -> "FunctionalModel":
        return self.replace(dtype=dtype)

    def init(self, seed: int = 0) -> Params:
        """The family's random initialisation (with fresh adapters under LoRA)."""
        _, state = nnx.split(self.module(self.config, nnx.Rngs(seed)), nnx.Param)
        params: Params = {}
        for path, var in nnx.to_flat_state(state):
            set_path(params, path_str(path), var.get_value())
        return params if self.lora is None else lora_lib.attach(self, jax.tree.map(np.asarray, params), seed)

    def kernel_shapes(self) -> dict:
        """{projection: (shape, logical axes)} of layer 0's kernels, and the embedding's."""
        out = {}
        for path, shape, axes, _ in self._template:
            if path[:2] == ("h", "0") and path[-1] == "kernel":
                out[path[2]] = (shape, axes)
            elif path == (EMBEDDING,):
                out[EMBEDDING] = (shape, axes)
        return out

    def _per_param(self, fn) -> Params:
        out: Params = {}
        for path, shape, axes, f32 in self._template:
            set_path(out, path, fn(shape, axes, f32))
        return out

    def logical_axes(self) -> Params:
        """Logical axis names of every parameter, in the params' tree structure."""
        return self._per_param(lambda shape, axes, f32: axes)

    def param_shapes(self, dtype=jnp.float32) -> Params:
        """Shapes and storage dtypes: `dtype`, except LoRA's adapters and token rows (f32)."""
        return self._per_param(lambda shape, axes, f32: jax.ShapeDtypeStruct(shape, jnp.float32 if f32 else
                                                                             jnp.dtype(dtype)))

    def embed(self, params, ids):
        x = jnp.take(params[EMBEDDING], ids, axis=0).astype(self.dtype)
        if lora_lib.TOKEN_ROWS in params:
            x = lora_lib.embed_rows(x, ids, params[lora_lib.TOKEN_ROWS], self.lora.token_ids)
        return x

    def head_keys(self) -> tuple[str, ...]:
        """The top-level params `logits` reads."""
        return (EMBEDDING, HEAD, lora_lib.TOKEN_ROWS)

    def logits(self, params, hidden):
        """Through the tied embedding, or the untied `lm_head` when the params hold one."""
        head = params.get(HEAD, params[EMBEDDING])
        logits = jnp.einsum("...e,ve->...v", hidden, head.astype(hidden.dtype)).astype(jnp.float32)
        if lora_lib.TOKEN_ROWS in params and HEAD not in params:
            logits = lora_lib.head_rows(logits, hidden, head, params[lora_lib.TOKEN_ROWS], self.lora.token_ids)
        return logits

    def project(self, p, x, spec: str, key=None):
        """A projection (`linear`), plus its LoRA adapter when `p` holds one (`key`: the
        adapter's dropout key, None in evaluation)."""
        y = linear(p, x, spec)
        if lora_lib.ADAPTER_A in p:
            y = y + lora_lib.adapter(p, dropout(x, self.lora.dropout, key), spec, self.lora)
        return weight_product.tap(p, x, y, spec)  # y itself unless a thought scan records

    def adapter_keys(self, key, n: int):
        """`n` dropout keys for a layer's adapters, derived from one of the layer's own keys (so
        a run without adapters draws exactly what it drew before)."""
        if key is None or self.lora is None or self.lora.dropout == 0.0:
            return [None] * n
        return list(jax.random.split(jax.random.fold_in(key, 0x10FA), n))

    def stack_layers(self, params):
        """Params whose layers are stacked along a leading axis (what the scan runs over).

        Callers that run `body` several times per step stack once and pass the result, so
        the copy is made once; `body` accepts either form."""
        if not self.scan_layers or "0" not in params["h"]:
            return params
        layers = [params["h"][str(i)] for i in range(self.config.n_layer)]
        return {**params, "h": jax.tree.map(lambda *a: jnp.stack(a), *layers)}

    def _layer_fn(self, found: dict | None = None):
        """One layer as the loop runs it (rematerialised per `remat`). With `found` (inside a
        `weight_product.scan`), it takes the layer's projection taps after its params and also
        returns the projections' inputs, leaving what it found of them in `found`."""
        def recorded(p, taps, *args):
            with weight_product.layer(p, taps) as rec:
                out = self._layer(p, *args)
            found.update(rec.projections)
            return out, rec.inputs
        fn = self._layer if found is None else recorded
        policy = REMAT_POLICIES[self.remat]
        return fn if self.remat == "none" else jax.checkpoint(fn, policy=policy)

    def body(self, params, embeds, positions, key_mask, past=(), dropout_key=None, taps=None):
        """Runs the transformer on `embeds` (token embeddings or continuous thoughts).

        `key_mask` [B,T] says which inputs are real tokens; attention among the inputs is
        causal. `past` holds keys/values computed earlier for positions that precede all
        the inputs: a sequence of segments {"k", "v": [L,B,K,S,D], "mask": [B,S]}, every
        valid key of which each input attends to. Returns (final hidden states [B,T,E],
        {"k", "v": [L,B,K,T,D]} of the inputs), so a caller can extend `past`.

        `taps` [B] (an input index per row): also returns every layer's hidden state at it,
        [n_layer + 1, B, E] in Hugging Face's `hidden_states` convention: the first layer's
        input, the outputs of layers 0..n-2, and the final-normed output of the last layer.
        """
        n, per = self.config.n_layer, self.keys_per_layer
        t = embeds.shape[1]
        keys = split_keys(dropout_key, 1 + per * n)
        x, ctx = self._inputs(params, embeds.astype(self.dtype), positions, keys[0])
        self_allowed = jnp.tril(jnp.ones((t, t), bool))[None] & key_mask.astype(bool)[:, None, :]
        past_allowed = [seg["mask"].astype(bool)[:, None, :] for seg in past]
        recording = weight_product.active()
        found = None if recording is None else {}
        layer_taps = None if recording is None else recording.next_taps()
        layer = self._layer_fn(found)

        def run_layer(p, taps, *args):  # (x, kv, the projections' inputs or None)
            if found is None:
                return (*layer(p, *args), None)
            (x, kv), inputs = layer(p, taps, *args)
            return x, kv, inputs
        rows = jnp.arange(x.shape[0])

        def tap(x):
            return None if taps is None else x[rows, taps]
        first = tap(x)
        if self.scan_layers:
            def step(x, xs):
                p, seg_kv, layer_keys, t = xs
                layer_past = [(k, v, allowed) for (k, v), allowed in zip(seg_kv, past_allowed)]
                x, kv, inputs = run_layer(p, t, x, self_allowed, layer_past, ctx,
                                          [None] * per if layer_keys is None else list(layer_keys))
                return x, (kv, tap(x), inputs)
            stacked = self.stack_layers(params)["h"]
            seg_kv = [(seg["k"], seg["v"]) for seg in past]
            layer_keys = None if dropout_key is None else jnp.stack(keys[1:]).reshape(n, per)
            x, ((new_k, new_v), tapped, inputs) = jax.lax.scan(step, x, (stacked, seg_kv, layer_keys, layer_taps))
        else:
            new_k, new_v, tapped, inputs = [], [], [], []
            for i in range(n):
                layer_past = [(seg["k"][i], seg["v"][i], allowed) for seg, allowed in zip(past, past_allowed)]
                x, (k, v), layer_inputs = run_layer(
                    params["h"][str(i)], None if layer_taps is None else jax.tree.map(lambda a: a[i], layer_taps),
                    x, self_allowed, layer_past, ctx, keys[1 + per * i: 1 + per * (i + 1)])
                new_k.append(k)
                new_v.append(v)
                tapped.append(tap(x))
                inputs.append(layer_inputs)
            new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
            tapped = None if taps is None else jnp.stack(tapped)
            inputs = None if found is None else jax.tree.map(lambda *a: jnp.stack(a), *inputs)
        if recording is not None:
            weight_product.body_done(found, inputs if layer_taps is not None else None)
        hidden, kv = self._final(params, x), {"k": new_k, "v": new_v}
        if taps is None:
            return hidden, kv
        # The last layer's entry is its final-normed output, as Hugging Face reports it.
        return hidden, kv, jnp.concatenate([first[None], tapped[:-1], tap(hidden)[None]]).astype(hidden.dtype)

    # -- what a family defines ----------------------------------------------------------------
    def _inputs(self, params, embeds, positions, key):
        """(the first layer's input, what every layer needs of the positions or None)."""
        raise NotImplementedError

    def _layer(self, p, x, self_allowed, past, ctx, keys):
        """One layer: (new x, this layer's (k, v) of the inputs, [B,K,T,D])."""
        raise NotImplementedError

    def _final(self, params, x):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class HFNames:
    """How a family's Hugging Face checkpoints name its tensors (hf.py reads them; a family
    module holds its own). Per-layer names are `{layer_prefix}.{i}.{name}`; a `split` > 0 marks
    an HF Linear weight [out, in] whose transpose is our kernel with its first `split` axes the
    input."""
    prefix: str             # of the base model's tensors in a ...ForCausalLM state dict
    top: dict               # HF name -> our path
    layer_prefix: str
    layer: dict             # HF name after "{layer_prefix}.{i}." -> (our path after ("h", i), split)
    buffers: str            # regex of stored buffers that hold no learned weights
    tokenizer_class: str | None = None  # for checkpoints whose tokenizer_config.json names none


def linear(p, x, spec: str = "...i,io->...o"):
    """The projection of every family: `x` against `p["kernel"]` (an einsum `spec`), plus
    `p["bias"]` when the layer has one, in `x`'s dtype."""
    y = jnp.einsum(spec, x, p["kernel"].astype(x.dtype))
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """How tiny.py builds a family's tokenizer offline: byte-level BPE with these special tokens,
    saved as the class the family's hub checkpoints load as."""
    specials: tuple[str, ...]
    hf_class: str
    hf_kwargs: dict         # the special-token arguments of `hf_class` (token strings or None)
    split: str | None = None  # a split pattern applied before the byte-level step (None: GPT-2's own)
    nfc: bool = False         # NFC-normalise the text first
    bos: str | None = None    # a token the post-processor puts before every text
