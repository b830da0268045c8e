"""A LoRA run's adapters in PEFT's format: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, DIR)` loads onto the
base model (resized to the tokenizer, latent tokens included).

Tensor names are PEFT's: `base_model.model.<HF module>.lora_A.weight` [r, fan_in] and
`.lora_B.weight` [fan_out, r] (for GPT-2's Conv1D layers too, with `fan_in_fan_out`); the
scaling is PEFT's lora_alpha / r. Trained token rows are PEFT's `trainable_token_indices`
(`...embed.token_adapter.trainable_tokens_delta`, which holds the rows' values, not a
difference); an untied head's rows of those tokens go with them (the base we trained on holds
them copied from `<<`, a freshly resized head would not). `train_embeddings` is PEFT's
`modules_to_save`: the whole embedding (and untied head) stored.
"""
from __future__ import annotations

import json
import os

import numpy as np

from coconut_jax.models import lora as lora_lib
from coconut_jax.models.common import EMBEDDING, HEAD

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _module(names, path: tuple[str, ...]) -> str:
    """The HF module (name without `.weight`) of one of our top-level params."""
    if path == (HEAD,):
        return "lm_head"
    hf = next(k for k, v in names.top.items() if v == path)
    return names.prefix + hf[:-len(".weight")]


def state_dict(model, params) -> dict[str, np.ndarray]:
    """PEFT's tensors of a LoRA model's trained params (host arrays, f32)."""
    lora, names = model.lora, model.hf_names
    proj = lora_lib.projections(type(model))
    sd = {}
    for i, layer in params["h"].items():
        for name in lora.targets:
            p = layer[name]
            a, b = np.asarray(p[lora_lib.ADAPTER_A], np.float32), np.asarray(p[lora_lib.ADAPTER_B], np.float32)
            module = f"{PREFIX}{names.prefix}{names.layer_prefix}.{i}.{proj[name][0]}"
            sd[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)
            sd[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)
    tables = [(EMBEDDING,)] + ([(HEAD,)] if HEAD in params else [])
    if lora.train_embeddings:
        # A tied head is saved as a module of its own holding the trained embedding: PEFT
        # copies each module it saves, so a head tied to the embedding would read the old one.
        for path in ((EMBEDDING,), (HEAD,)):
            sd[f"{PREFIX}{_module(names, path)}.weight"] = np.asarray(params.get(path[0], params[EMBEDDING]),
                                                                      np.float32)
    elif lora.token_ids:
        ids = list(lora.token_ids)
        rows = {EMBEDDING: params[lora_lib.TOKEN_ROWS]}
        if HEAD in params:
            rows[HEAD] = np.asarray(params[HEAD])[ids]
        for path in tables:
            sd[f"{PREFIX}{_module(names, path)}.token_adapter.trainable_tokens_delta"] = np.asarray(
                rows[path[0]], np.float32)
    return sd


def adapter_config(model, params, base_model: str) -> dict:
    lora, names = model.lora, model.hf_names
    proj = lora_lib.projections(type(model))
    tables = [(EMBEDDING,)] + ([(HEAD,)] if HEAD in params else [])
    short = [_module(names, p).split(".")[-1] for p in tables]
    saved = [_module(names, p).split(".")[-1] for p in ((EMBEDDING,), (HEAD,))]
    d = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
         "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
         "target_modules": sorted({proj[t][0].split(".")[-1] for t in lora.targets}),
         # GPT-2's projections are Conv1D ([in, out] weights, stored untransposed); PEFT must be told.
         "fan_in_fan_out": any(split == 0 for path, split in names.layer.values() if path[-1] == "kernel"),
         "inference_mode": True,
         "modules_to_save": saved if lora.train_embeddings else None,
         "trainable_token_indices": None}
    if lora.token_ids and not lora.train_embeddings:
        d["trainable_token_indices"] = {s: list(lora.token_ids) for s in short}
    return d


def write(model, params, out_dir: str, base_model: str) -> None:
    """Writes the two files into `out_dir` (an existing directory)."""
    from safetensors.numpy import save_file
    save_file(state_dict(model, params), os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(model, params, base_model), f, indent=2)


# -- reading a whole PEFT model's state dict (a reference implementation's saved module) --------

def has_adapters(sd: dict) -> bool:
    """Whether a state dict holds PEFT's LoRA adapters (`...lora_A[.default].weight`)."""
    return any(".lora_A." in k for k in sd)


def merge_state_dict(sd: dict, alpha: float, family) -> dict[str, np.ndarray]:
    """A PEFT-wrapped model's full state dict (`base_model.model.*`, the adapted layers'
    weights under `.base_layer.`, adapters `.lora_A[.<adapter>].weight` [r, in] and
    `.lora_B[...].weight` [out, r]) -> the plain model's state dict, every adapter folded into
    its weight at scale alpha / r (in a Conv1D family's [in, out] orientation, PEFT's
    `fan_in_fan_out`). `family`: the model class (its HF names tell the orientation)."""
    conv1d = any(split == 0 for path, split in family.hf_names.layer.values() if path[-1] == "kernel")
    plain = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in sd.items()}
    out, adapters = {}, {}
    for k, v in plain.items():
        if ".lora_A." in k or ".lora_B." in k:
            module, which = k.split(".lora_A." if ".lora_A." in k else ".lora_B.")[0], "A" if ".lora_A." in k else "B"
            adapters.setdefault(module, {})[which] = np.asarray(v, np.float32)
        else:
            out[k.replace(".base_layer.", ".")] = v
    for module, ab in adapters.items():
        a, b = ab["A"], ab["B"]
        delta = (alpha / a.shape[0]) * (b @ a)  # [out, in]
        weight = np.asarray(out[f"{module}.weight"], np.float32)
        out[f"{module}.weight"] = weight + (delta.T if conv1d else delta)
    return out
