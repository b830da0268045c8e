"""Model families, chosen by `config.json`'s `model_type`.

Every family is a `common.FunctionalModel` (embed / body over any slice against explicit
past keys/values / logits); the Coconut code sees only that interface.
"""
from __future__ import annotations

from typing import Any

from coconut_jax.models.common import FunctionalModel
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
from coconut_jax.models.llama import LlamaConfig, LlamaModel

# model_type -> (config class, model class)
FAMILIES = {"gpt2": (GPT2Config, GPT2Model), "llama": (LlamaConfig, LlamaModel),
            "qwen2": (LlamaConfig, LlamaModel), "qwen3": (LlamaConfig, LlamaModel)}


def config_from_hf(d: dict[str, Any]):
    """The config of a `config.json` dict; ValueError naming an unsupported model_type or setting."""
    kind = d.get("model_type", "gpt2")
    if kind not in FAMILIES:
        raise ValueError(f"model_type {kind!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[kind][0].from_hf_dict(d)


def family(model_type: str) -> type[FunctionalModel]:
    """The model class of a `model_type`, which holds the family's knowledge: its HF tensor
    names, its tokenizers' kinds, its small configs."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type][1]


def tokenizer_class(model_type: str | None) -> str | None:
    """The tokenizer class a family's checkpoints load as when their files name none."""
    family = FAMILIES.get(model_type or "")
    return family[1].hf_names.tokenizer_class if family else None


def model_type(config) -> str:
    return getattr(config, "model_type", "gpt2")


def build(config, *args, **kwargs) -> FunctionalModel:
    """The model of `config`'s family (`FunctionalModel` arguments pass through)."""
    return FAMILIES[model_type(config)][1](config, *args, **kwargs)
