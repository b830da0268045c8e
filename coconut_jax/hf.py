"""Hugging Face GPT-2 checkpoints <-> coconut_jax params.

Loads a hub id or a local directory (`config.json` + `model.safetensors`, or
`pytorch_model.bin` through torch with `weights_only=True`), the tokenizer with the three
latent tokens, imports checkpoints written by the reference PyTorch implementation, and
exports params back to a directory that `transformers` loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from coconut_jax.models.gpt2 import GPT2Config, GPT2Model, Params, get_path, set_path

START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
LATENT_INIT_TOKEN = "<<"
REFERENCE_PREFIX = "base_causallm."
SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be used, with the reason."""


@dataclasses.dataclass(frozen=True)
class LatentTokens:
    start: int
    end: int
    latent: int
    eos: int
    pad: int


# -- names ---------------------------------------------------------------------------------

# HF tensor name (after stripping "transformer.") -> (our param path, transpose?)
_LAYER_MAP = {
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("c_attn", "kernel"), "attn.c_attn.bias": ("c_attn", "bias"),
    "attn.c_proj.weight": ("attn_proj", "kernel"), "attn.c_proj.bias": ("attn_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("c_fc", "kernel"), "mlp.c_fc.bias": ("c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp_proj", "kernel"), "mlp.c_proj.bias": ("mlp_proj", "bias"),
}
_TOP_MAP = {"wte.weight": ("wte",), "wpe.weight": ("wpe",),
            "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")}
# Attention-mask buffers that old GPT-2 files carry; they hold no learned weights.
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")


def _our_path(hf_name: str) -> tuple[str, ...] | None:
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return ("h", m.group(1)) + _LAYER_MAP[m.group(2)]
    return None


def _hf_names(config: GPT2Config) -> list[str]:
    names = list(_TOP_MAP)
    for i in range(config.n_layer):
        names += [f"h.{i}.{k}" for k in _LAYER_MAP]
    return names


def state_dict_to_params(state_dict: dict[str, np.ndarray], config: GPT2Config, source: str) -> Params:
    """Maps a GPT-2 state dict (plain or `transformer.`-prefixed names) onto params.

    Unknown or missing tensors and shape mismatches raise `CheckpointError` naming them.
    """
    model = GPT2Model(config)
    shapes = model.param_shapes()
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in state_dict.items()}
    head = sd.pop("lm_head.weight", None)
    unknown = sorted(k for k in sd if _our_path(k) is None and not _BUFFER.match(k))
    unknown += sorted(k for k in sd if (p := _our_path(k)) and p[0] == "h" and int(p[1]) >= config.n_layer)
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensor(s) for a {config.n_layer}-layer GPT-2: {', '.join(unknown)}")
    missing = [k for k in _hf_names(config) if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {', '.join(missing)}")
    params: Params = {}
    for name in _hf_names(config):
        path = _our_path(name)
        value = np.asarray(sd[name], dtype=np.float32)
        want = get_path(shapes, path).shape
        if value.shape != want:
            raise CheckpointError(f"{source}: tensor {name} has shape {value.shape}, expected {want} "
                                  f"from the config (vocab_size={config.vocab_size}, n_embd={config.n_embd})")
        set_path(params, path, value)
    if head is not None and not np.array_equal(np.asarray(head, np.float32), params["wte"]):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; only the tied GPT-2 head is supported")
    return params


def params_to_state_dict(params: Params, config: GPT2Config) -> dict[str, np.ndarray]:
    """Params -> `transformers.GPT2LMHeadModel` state dict (the head is tied, so not stored)."""
    return {f"transformer.{name}": np.ascontiguousarray(np.asarray(get_path(params, _our_path(name)), np.float32))
            for name in _hf_names(config)}


# -- reading ---------------------------------------------------------------------------------

def resolve_model_dir(model_id: str) -> str:
    """A local directory as is; otherwise a hub id, downloaded (or taken from the HF cache)."""
    if os.path.isdir(os.path.expanduser(model_id)):
        return os.path.expanduser(model_id)
    if model_id.startswith((".", "/", "~")) or os.path.exists(model_id):
        raise CheckpointError(f"{model_id}: model directory not found")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", TORCH_BIN])
    except Exception as e:  # the hub raises many types (offline, 404, auth)
        raise CheckpointError(f"{model_id}: not a local directory and could not be fetched from the "
                              f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def load_config(model_dir: str) -> GPT2Config:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    with open(path) as f:
        d = json.load(f)
    if d.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path}: model_type {d.get('model_type')!r} is not supported; coconut_jax runs GPT-2")
    try:
        return GPT2Config.from_hf_dict(d)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def torch_load(path: str) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict as NumPy arrays (tensors only, `weights_only=True`)."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading PyTorch checkpoints needs torch "
                              f"(pip install 'coconut_jax[torch]')") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def read_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    single, index = os.path.join(model_dir, SAFETENSORS), os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(load_file(os.path.join(model_dir, name)))
        return out
    if os.path.isfile(os.path.join(model_dir, TORCH_BIN)):
        return torch_load(os.path.join(model_dir, TORCH_BIN))
    raise CheckpointError(f"{model_dir}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")


def load_pretrained(model_id: str) -> tuple[GPT2Config, Params]:
    model_dir = resolve_model_dir(model_id)
    config = load_config(model_dir)
    return config, state_dict_to_params(read_state_dict(model_dir), config, model_dir)


# Tokenizer classes by `model_type`, for checkpoints whose tokenizer_config.json names none
# (the hub's GPT-2); the mapping AutoTokenizer would consult lives beside the torch import.
_TOKENIZER_BY_MODEL_TYPE = {"gpt2": "GPT2Tokenizer"}


def _read_json_field(path: str, field: str):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(field)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value.isidentifier() else None


def _tokenizer_class(model_dir: str):
    """The class AutoTokenizer picks for `model_dir` (its fast form first, as AutoTokenizer
    does), imported on its own: AutoTokenizer's module imports torch when it is installed,
    a second of every start. None: ask AutoTokenizer."""
    import transformers
    name = (_read_json_field(os.path.join(model_dir, "tokenizer_config.json"), "tokenizer_class")
            or _TOKENIZER_BY_MODEL_TYPE.get(_read_json_field(os.path.join(model_dir, "config.json"), "model_type")))
    if name is None:
        return None
    for candidate in ((name,) if name.endswith("Fast") else (name + "Fast", name)):
        try:
            return getattr(transformers, candidate)
        except (AttributeError, ImportError):
            continue
    return None


def load_tokenizer(model_id: str):
    """The checkpoint's tokenizer (AutoTokenizer's choice) with pad = eos and the three latent
    tokens (added only when absent)."""
    model_dir = resolve_model_dir(model_id)
    cls = _tokenizer_class(model_dir)
    if cls is None:
        from transformers import AutoTokenizer as cls
    try:
        tok = cls.from_pretrained(model_dir)
    except Exception as e:
        raise CheckpointError(f"{model_dir}: no usable tokenizer ({type(e).__name__}: {e})") from e
    tok.pad_token = tok.eos_token
    vocab = tok.get_vocab()
    for t in (START_LATENT, END_LATENT, LATENT):
        if t not in vocab:
            tok.add_tokens(t)
    return tok


def latent_tokens(tok) -> LatentTokens:
    ids = tok.convert_tokens_to_ids([START_LATENT, END_LATENT, LATENT])
    return LatentTokens(*ids, eos=tok.eos_token_id, pad=tok.pad_token_id)


def add_latent_rows(config: GPT2Config, params: Params, tok) -> tuple[GPT2Config, Params]:
    """Grows the embedding to the tokenizer's vocabulary and initialises the new latent rows.

    As the reference does: the rows of the three latent tokens are copies of the row of
    `<<` (the head is tied, so its rows follow). A checkpoint whose embedding already covers
    the latent tokens is returned unchanged. Other new rows (none for GPT-2) get the mean row.
    """
    wte = np.asarray(params["wte"])
    ids = latent_tokens(tok)
    if max(ids.start, ids.end, ids.latent) < wte.shape[0]:
        return config, params
    src = tok.convert_tokens_to_ids(LATENT_INIT_TOKEN)
    if src is None or src == tok.unk_token_id or tok.convert_ids_to_tokens(src) != LATENT_INIT_TOKEN:
        raise CheckpointError(f"tokenizer has no single token {LATENT_INIT_TOKEN!r} to initialise the latent tokens from")
    n = len(tok)
    grown = np.concatenate([wte, np.repeat(wte.mean(0, keepdims=True), n - wte.shape[0], 0)])
    for i in (ids.start, ids.end, ids.latent):
        grown[i] = wte[src]
    out = dict(params)
    out["wte"] = grown
    return dataclasses.replace(config, vocab_size=n), out


# -- reference (PyTorch) checkpoints -------------------------------------------------------

def import_reference_checkpoint(path: str, config: GPT2Config) -> tuple[Params, str | None]:
    """A `torch.save`d state dict of the reference implementation -> (params, "coconut" or None).

    Keys are plain GPT-2 names (`transformer.h.0...`, `lm_head.weight`) or, for Coconut
    checkpoints, the same prefixed by `base_causallm.` (then the method returned is
    "coconut"). The vocabulary size is taken from the checkpoint (50257 for CoT runs, 50260
    for Coconut runs).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    sd = torch_load(path)
    method = "coconut" if any(k.startswith(REFERENCE_PREFIX) for k in sd) else None
    if method:
        sd = {k[len(REFERENCE_PREFIX):]: v for k, v in sd.items() if k.startswith(REFERENCE_PREFIX)}
    wte = sd.get("transformer.wte.weight", sd.get("wte.weight"))
    if wte is None:
        raise CheckpointError(f"{path}: missing tensor(s): transformer.wte.weight")
    return state_dict_to_params(sd, dataclasses.replace(config, vocab_size=wte.shape[0]), path), method


# -- writing ---------------------------------------------------------------------------------

def _hf_config_dict(config: GPT2Config, tok) -> dict[str, Any]:
    d = config.to_hf_dict()
    d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], tie_word_embeddings=True,
             n_ctx=config.n_positions)
    if tok is not None:
        d.update(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return d


def export_hf(config: GPT2Config, params: Params, out_dir: str, tokenizer=None, overwrite: bool = False) -> str:
    """Writes a directory that `GPT2LMHeadModel.from_pretrained` (and `AutoTokenizer`) load.

    Written to a temporary sibling and renamed into place, so a crash never leaves a half
    directory; an existing non-empty `out_dir` is an error unless `overwrite`.
    """
    from safetensors.numpy import save_file
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists and is not empty (pass overwrite=True to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        save_file(params_to_state_dict(params, config), os.path.join(tmp, SAFETENSORS), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_hf_config_dict(config, tokenizer), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
