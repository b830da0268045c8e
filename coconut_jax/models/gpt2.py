"""GPT-2 in Flax NNX, used functionally (see `common.FunctionalModel`).

The module holds parameters only; every call takes the parameter state explicitly, and
keys/values are explicit pytrees passed in and out, so the Coconut code can run the
transformer over any slice of a sequence against keys/values computed earlier. Every
parameter carries logical axis names that `coconut_jax.sharding` maps onto a device mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from coconut_jax.models.common import (EMBED, HEADS, MLP, POSITION, QKV, VOCAB, FunctionalModel, HFNames, Params,
                                       TokenizerKind, attention, dropout, get_path, ones, param, set_path)

__all__ = ["GPT2Config", "GPT2Model", "Params", "get_path", "set_path"]


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
        return {**dataclasses.asdict(self), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "tie_word_embeddings": True, "n_ctx": self.n_positions}


_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.scale = ones((dim,), (EMBED,))
        self.bias = param(rngs, (dim,), (EMBED,), None)


class Dense(nnx.Module):
    """HF `Conv1D`: y = x @ W + b with W stored as (in, out)."""

    def __init__(self, n_in, n_out, axes, std, rngs: nnx.Rngs):
        self.kernel = param(rngs, (n_in, n_out), axes, std)
        self.bias = param(rngs, (n_out,), (axes[1],), None)


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        e, std = cfg.n_embd, cfg.initializer_range
        # GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer).
        proj_std = std / (2 * cfg.n_layer) ** 0.5
        self.ln_1 = LayerNorm(e, rngs)
        self.c_attn = Dense(e, 3 * e, (EMBED, QKV), std, rngs)
        self.attn_proj = Dense(e, e, (HEADS, EMBED), proj_std, rngs)
        self.ln_2 = LayerNorm(e, rngs)
        self.c_fc = Dense(e, 4 * e, (EMBED, MLP), std, rngs)
        self.mlp_proj = Dense(4 * e, e, (MLP, EMBED), proj_std, rngs)


class GPT2(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.wte = param(rngs, (cfg.vocab_size, cfg.n_embd), (VOCAB, EMBED), cfg.initializer_range)
        self.wpe = param(rngs, (cfg.n_positions, cfg.n_embd), (POSITION, EMBED), 0.01)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, rngs)


# -- the forward computation, as functions of the params pytree ---------------------------------

def layer_norm(p, x, eps: float):
    # Statistics in f32 whatever the compute dtype (as mixed-precision PyTorch does).
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = ((xf - mean) ** 2).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


def block(p, x, self_allowed, past, cfg: GPT2Config, keys, fused: bool, proj, adapter_keys):
    """One transformer layer. x: [B,T,E]; self_allowed: [B,T,T] bool (causal among the
    inputs); past: (k, v [B,H,S,D], allowed [B,1,S]) per earlier segment of this layer.
    `proj`: how a projection is computed (`FunctionalModel.project`: with its adapter under
    LoRA), `adapter_keys` the adapters' dropout key per projection.
    Returns the new x and this layer's (k, v) of the inputs."""
    spec = "...i,io->...o"
    b, t, _ = x.shape
    h, d = cfg.n_head, cfg.head_dim
    qkv = proj(p["c_attn"], layer_norm(p["ln_1"], x, cfg.layer_norm_epsilon), spec, adapter_keys[0])
    q, k, v = (a.reshape(b, t, h, d) for a in jnp.split(qkv, 3, axis=-1))
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B,H,T,D], the cache layout
    attn = attention(q, k, v, self_allowed, past, fused=fused, dropout_rate=cfg.attn_pdrop, key=keys[0])
    x = x + dropout(proj(p["attn_proj"], attn.reshape(b, t, h * d), spec, adapter_keys[1]), cfg.resid_pdrop, keys[1])
    act = _ACTIVATIONS[cfg.activation_function]
    hidden = act(proj(p["c_fc"], layer_norm(p["ln_2"], x, cfg.layer_norm_epsilon), spec, adapter_keys[2]))
    x = x + dropout(proj(p["mlp_proj"], hidden, spec, adapter_keys[3]), cfg.resid_pdrop, keys[2])
    return x, (k, v)


# Hugging Face's names of GPT-2's tensors (Conv1D weights are stored [in, out]: no transpose).
HF_NAMES = HFNames(
    prefix="transformer.",
    top={"wte.weight": ("wte",), "wpe.weight": ("wpe",), "ln_f.weight": ("ln_f", "scale"),
         "ln_f.bias": ("ln_f", "bias")},
    layer_prefix="h",
    layer={"ln_1.weight": (("ln_1", "scale"), 0), "ln_1.bias": (("ln_1", "bias"), 0),
           "attn.c_attn.weight": (("c_attn", "kernel"), 0), "attn.c_attn.bias": (("c_attn", "bias"), 0),
           "attn.c_proj.weight": (("attn_proj", "kernel"), 0), "attn.c_proj.bias": (("attn_proj", "bias"), 0),
           "ln_2.weight": (("ln_2", "scale"), 0), "ln_2.bias": (("ln_2", "bias"), 0),
           "mlp.c_fc.weight": (("c_fc", "kernel"), 0), "mlp.c_fc.bias": (("c_fc", "bias"), 0),
           "mlp.c_proj.weight": (("mlp_proj", "kernel"), 0), "mlp.c_proj.bias": (("mlp_proj", "bias"), 0)},
    buffers=r"^h\.\d+\.attn\.(bias|masked_bias)$",
    tokenizer_class="GPT2Tokenizer")


TOKENIZERS = {"gpt2": TokenizerKind(
    specials=("<|endoftext|>",), hf_class="GPT2TokenizerFast",
    hf_kwargs={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})}


def tiny_config(model_type: str, vocab_size: int, *, n_layer: int, n_embd: int, n_head: int, n_positions: int,
                dropout: float = 0.0, n_kv_head: int = 0, tied: bool = True) -> GPT2Config:
    """A small GPT-2 (tiny.py); `n_kv_head` and `tied` do not apply (GPT-2's head is tied)."""
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)


class GPT2Model(FunctionalModel):
    """GPT-2 (learned positions, tied head, dropout on embeddings, attention and residuals)."""
    module = GPT2
    keys_per_layer = 3  # attention probabilities, attention output, MLP output
    hf_names = HF_NAMES
    tokenizers = TOKENIZERS
    tiny_config = staticmethod(tiny_config)

    def _inputs(self, params, embeds, positions, key):
        x = embeds + jnp.take(params["wpe"], positions, axis=0).astype(self.dtype)
        return dropout(x, self.config.embd_pdrop, key), None

    def _layer(self, p, x, self_allowed, past, ctx, keys):
        return block(p, x, self_allowed, past, self.config, keys, self.fused_attention, self.project,
                     self.adapter_keys(keys[0], 4))

    def _final(self, params, x):
        return layer_norm(params["ln_f"], x, self.config.layer_norm_epsilon)
