"""Llama 3.x, Qwen2/2.5 and Qwen3 decoders in Flax NNX, used functionally (see
`common.FunctionalModel`).

One model covers the three families, which differ only in switches of the config:
Qwen2 adds biases to the q/k/v projections, Qwen3 normalises queries and keys per head
(RMSNorm over the head dimension) before RoPE. All have grouped-query attention, RoPE
(Llama 3.1+ with its `llama3` frequency scaling), RMSNorm, a SwiGLU MLP and a tied or
untied head. RoPE is applied from the explicit position ids, so left padding and the
latent alignment of Coconut batches work as for GPT-2.

Projections keep heads as their own axis ([E,H,D], [H,D,E]) so that the `tensor` mesh axis
splits whole heads, and key/value heads only when it divides their number.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coconut_jax.models.common import (EMBED, HEAD_DIM, HEADS, KV_HEADS, MLP, VOCAB, FunctionalModel, HFNames,
                                       TokenizerKind, attention, ones, param)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The defaults are Llama-3.2-1B's shape."""
    model_type: str = "llama"
    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 64
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # The llama3 scaling as sorted (name, value) pairs (hashable); () for plain RoPE.
    rope_scaling: tuple = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                           ("original_max_position_embeddings", 8192))
    tie_word_embeddings: bool = True
    attention_bias: bool = False   # Llama/Qwen3: biases on q, k, v and o
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    # -- the names the rest of coconut_jax uses ----------------------------------------------
    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    # -- family switches ---------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """From a `config.json` (the hub's `rope_scaling`/`rope_theta` form or transformers
        5's `rope_parameters`); a setting this model does not compute is a ValueError naming it."""
        kind = d.get("model_type", "llama")
        if kind not in ARCHITECTURES:
            raise ValueError(f"model_type {kind!r} is not a Llama/Qwen2/Qwen3 model")

        def refuse(what):
            raise ValueError(f"{kind} with {what} is not supported")
        if d.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act={d['hidden_act']!r} (only silu)")
        if d.get("mlp_bias"):
            refuse("mlp_bias=true")
        if d.get("use_sliding_window"):
            refuse("use_sliding_window=true (sliding-window layers)")
        if any(t != "full_attention" for t in d.get("layer_types") or ()):
            refuse(f"layer_types {sorted(set(d['layer_types']))} (sliding-window layers)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if any(isinstance(v, dict) for v in rope.values()):
            refuse("per-layer-type rope_parameters")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            refuse(f"rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(f"partial_rotary_factor={rope['partial_rotary_factor']}")
        missing = [k for k in _LLAMA3_KEYS if k not in rope] if rope_type == "llama3" else []
        if missing:
            refuse(f"llama3 rope scaling without {', '.join(missing)}")
        heads = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        if heads % kv:
            refuse(f"num_attention_heads={heads} not a multiple of num_key_value_heads={kv}")
        return cls(
            model_type=kind, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_scaling=tuple(sorted((k, rope[k]) for k in _LLAMA3_KEYS)) if rope_type == "llama3" else (),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) and kind != "qwen2",
            attention_dropout=float(d.get("attention_dropout", 0.0)), initializer_range=d.get("initializer_range", 0.02))

    def to_hf_dict(self) -> dict[str, Any]:
        rope = dict(self.rope_scaling, rope_type="llama3") if self.rope_scaling else None
        d = {"model_type": self.model_type, "architectures": [ARCHITECTURES[self.model_type]],
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
             "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
             "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
             "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": rope,
             "tie_word_embeddings": self.tie_word_embeddings, "attention_dropout": self.attention_dropout,
             "hidden_act": "silu", "initializer_range": self.initializer_range}
        if self.model_type != "qwen2":
            d["attention_bias"] = self.attention_bias
        return d


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """RoPE's inverse frequencies [D/2] in f32, computed as transformers does (with the
    llama3 scaling: long wavelengths slowed by `factor`, a smooth blend in between)."""
    d = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
    if not cfg.rope_scaling:
        return inv
    s = dict(cfg.rope_scaling)
    factor, low, high, old = (np.float32(s[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                          "original_max_position_embeddings"))
    wavelen = 2 * np.float32(np.pi) / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_tables(cfg: LlamaConfig, positions, dtype):
    """(cos, sin) [B,T,D] of each position, in the compute dtype."""
    freqs = positions[..., None].astype(jnp.float32) * inverse_frequencies(cfg)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B,T,H,D] rotated in transformers' layout (the two halves of each head pair up)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def rms_norm(p, x, eps: float):
    # Statistics in f32 whatever the compute dtype; the scale applies after the cast back,
    # as transformers does.
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return p["scale"].astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, axis: str):
        self.scale = ones((dim,), (axis,))


class Projection(nnx.Module):
    """A linear map with optional bias; kernel axes as given (heads kept as their own axes)."""

    def __init__(self, shape, axes, bias_axes, std, rngs: nnx.Rngs):
        self.kernel = param(rngs, shape, axes, std)
        if bias_axes:
            self.bias = param(rngs, shape[len(shape) - len(bias_axes):], bias_axes, None)


class Layer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        e, h, k, d, std = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
            cfg.initializer_range
        self.attn_norm = RMSNorm(e, EMBED)
        self.q = Projection((e, h, d), (EMBED, HEADS, HEAD_DIM), (HEADS, HEAD_DIM) if cfg.qkv_bias else (), std, rngs)
        self.k = Projection((e, k, d), (EMBED, KV_HEADS, HEAD_DIM), (KV_HEADS, HEAD_DIM) if cfg.qkv_bias else (),
                            std, rngs)
        self.v = Projection((e, k, d), (EMBED, KV_HEADS, HEAD_DIM), (KV_HEADS, HEAD_DIM) if cfg.qkv_bias else (),
                            std, rngs)
        self.o = Projection((h, d, e), (HEADS, HEAD_DIM, EMBED), (EMBED,) if cfg.o_bias else (), std, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, HEAD_DIM)
            self.k_norm = RMSNorm(d, HEAD_DIM)
        self.mlp_norm = RMSNorm(e, EMBED)
        self.gate = Projection((e, cfg.intermediate_size), (EMBED, MLP), (), std, rngs)
        self.up = Projection((e, cfg.intermediate_size), (EMBED, MLP), (), std, rngs)
        self.down = Projection((cfg.intermediate_size, e), (MLP, EMBED), (), std, rngs)


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.wte = param(rngs, (cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), cfg.initializer_range)
        self.h = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = RMSNorm(cfg.hidden_size, EMBED)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), cfg.initializer_range)


# Hugging Face's names of the Llama/Qwen tensors (Linear weights [out, in]: transposed, heads
# split out of the flattened axis).
HF_NAMES = HFNames(
    prefix="model.",
    top={"embed_tokens.weight": ("wte",), "norm.weight": ("ln_f", "scale")},
    layer_prefix="layers",
    layer={"input_layernorm.weight": (("attn_norm", "scale"), 0),
           "self_attn.q_proj.weight": (("q", "kernel"), 1), "self_attn.q_proj.bias": (("q", "bias"), 0),
           "self_attn.k_proj.weight": (("k", "kernel"), 1), "self_attn.k_proj.bias": (("k", "bias"), 0),
           "self_attn.v_proj.weight": (("v", "kernel"), 1), "self_attn.v_proj.bias": (("v", "bias"), 0),
           "self_attn.o_proj.weight": (("o", "kernel"), 2), "self_attn.o_proj.bias": (("o", "bias"), 0),
           "self_attn.q_norm.weight": (("q_norm", "scale"), 0), "self_attn.k_norm.weight": (("k_norm", "scale"), 0),
           "post_attention_layernorm.weight": (("mlp_norm", "scale"), 0),
           "mlp.gate_proj.weight": (("gate", "kernel"), 1), "mlp.up_proj.weight": (("up", "kernel"), 1),
           "mlp.down_proj.weight": (("down", "kernel"), 1)},
    buffers=r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# The pre-tokenizer split patterns of Llama 3 and Qwen2 (digits in threes vs one by one).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = TokenizerKind(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), hf_class="Qwen2Tokenizer",
    hf_kwargs={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None},
    split=_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"), nfc=True)
TOKENIZERS = {
    "llama": TokenizerKind(specials=("<|begin_of_text|>", "<|end_of_text|>"), hf_class="PreTrainedTokenizerFast",
                           hf_kwargs={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                           split=_LLAMA3_SPLIT, bos="<|begin_of_text|>"),
    "qwen2": _QWEN2, "qwen3": _QWEN2}


def tiny_config(model_type: str, vocab_size: int, *, n_layer: int, n_embd: int, n_head: int, n_positions: int,
                dropout: float = 0.0, n_kv_head: int = 0, tied: bool = True) -> LlamaConfig:
    """A small Llama/Qwen (tiny.py) with `n_kv_head` key/value heads (0: half of n_head)."""
    kv = n_kv_head or (n_head // 2 if n_head % 2 == 0 else n_head)
    return LlamaConfig(model_type=model_type, vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=4 * n_embd,
                       num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=kv,
                       head_dim=n_embd // n_head, max_position_embeddings=n_positions, rms_norm_eps=1e-6,
                       rope_theta=10000.0, rope_scaling=(), tie_word_embeddings=tied, attention_dropout=dropout)


class LlamaModel(FunctionalModel):
    """Llama 3.x / Qwen2 / Qwen3 (one dropout key per layer: attention probabilities)."""
    module = Llama
    keys_per_layer = 1
    hf_names = HF_NAMES
    tokenizers = TOKENIZERS
    tiny_config = staticmethod(tiny_config)

    def _inputs(self, params, embeds, positions, key):
        return embeds, rope_tables(self.config, positions, self.dtype)

    def _layer(self, p, x, self_allowed, past, ctx, keys):
        cfg = self.config
        eps = cfg.rms_norm_eps
        cos, sin = ctx
        ak = dict(zip(("q", "k", "v", "o", "gate", "up", "down"), self.adapter_keys(keys[0], 7)))
        h = rms_norm(p["attn_norm"], x, eps)
        q, k, v = (self.project(p[n], h, "bte,ehd->bthd", ak[n]) for n in ("q", "k", "v"))
        if cfg.qk_norm:
            q, k = rms_norm(p["q_norm"], q, eps), rms_norm(p["k_norm"], k, eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B,K,T,D], the cache layout
        attn = attention(q, k, v, self_allowed, past, fused=self.fused_attention,
                         dropout_rate=cfg.attention_dropout, key=keys[0])
        x = x + self.project(p["o"], attn, "bthd,hde->bte", ak["o"])
        h = rms_norm(p["mlp_norm"], x, eps)
        gate, up = (self.project(p[n], h, "bte,ef->btf", ak[n]) for n in ("gate", "up"))
        x = x + self.project(p["down"], jax.nn.silu(gate) * up, "btf,fe->bte", ak["down"])
        return x, (k, v)

    def _final(self, params, x):
        return rms_norm(params["ln_f"], x, self.config.rms_norm_eps)
