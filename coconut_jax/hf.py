"""Hugging Face checkpoints (GPT-2, Llama 3.x, Qwen2/2.5, Qwen3) <-> coconut_jax params.

Loads a hub id or a local directory (`config.json` + `model.safetensors` (sharded or not,
any float dtype, bf16 included), or `pytorch_model.bin` through torch with
`weights_only=True`), the tokenizer with the three
latent tokens, imports checkpoints written by the reference PyTorch implementation, and
exports params back to a directory that `transformers` loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Any

import numpy as np

from coconut_jax import models
from coconut_jax.models.common import EMBEDDING, HEAD, Params, get_path, set_path

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

@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and where it lives in our params. `split` > 0: an HF Linear weight
    [out, in] whose transpose is our kernel, with its first `split` axes the input (heads
    keep their own axes in ours, flattened in HF's)."""
    name: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    split: int = 0

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.split:
            return (int(np.prod(self.shape[self.split:])), int(np.prod(self.shape[:self.split])))
        return (int(np.prod(self.shape)),) if self.path[-1] == "bias" else self.shape

    def to_ours(self, value: np.ndarray) -> np.ndarray:
        return (value.T if self.split else value).reshape(self.shape)

    def to_hf(self, value) -> np.ndarray:
        value = np.asarray(value, np.float32)
        if self.split:
            return np.ascontiguousarray(value.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(value.reshape(self.hf_shape))


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a family names its tensors: the prefix of the base model's tensors (a bare base
    model's state dict omits it), the tensors, and buffers that hold no learned weights."""
    prefix: str
    tensors: tuple[Tensor, ...]
    buffers: re.Pattern


_GPT2_LAYER = {  # HF name after "h.{i}." -> our path after ("h", i)
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("c_attn", "kernel"), "attn.c_attn.bias": ("c_attn", "bias"),
    "attn.c_proj.weight": ("attn_proj", "kernel"), "attn.c_proj.bias": ("attn_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("c_fc", "kernel"), "mlp.c_fc.bias": ("c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp_proj", "kernel"), "mlp.c_proj.bias": ("mlp_proj", "bias"),
}
_GPT2_TOP = {"wte.weight": ("wte",), "wpe.weight": ("wpe",), "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")}
_LLAMA_LAYER = {  # HF name after "layers.{i}." -> (our path after ("h", i), Tensor.split)
    "input_layernorm.weight": (("attn_norm", "scale"), 0),
    "self_attn.q_proj.weight": (("q", "kernel"), 1), "self_attn.q_proj.bias": (("q", "bias"), 0),
    "self_attn.k_proj.weight": (("k", "kernel"), 1), "self_attn.k_proj.bias": (("k", "bias"), 0),
    "self_attn.v_proj.weight": (("v", "kernel"), 1), "self_attn.v_proj.bias": (("v", "bias"), 0),
    "self_attn.o_proj.weight": (("o", "kernel"), 2), "self_attn.o_proj.bias": (("o", "bias"), 0),
    "self_attn.q_norm.weight": (("q_norm", "scale"), 0), "self_attn.k_norm.weight": (("k_norm", "scale"), 0),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), 0),
    "mlp.gate_proj.weight": (("gate", "kernel"), 1), "mlp.up_proj.weight": (("up", "kernel"), 1),
    "mlp.down_proj.weight": (("down", "kernel"), 1),
}
_LLAMA_TOP = {"embed_tokens.weight": ("wte",), "norm.weight": ("ln_f", "scale")}
HEAD_NAME = "lm_head.weight"


def naming(config) -> Naming:
    """The tensors of `config`'s model as HF names them (only those its params hold)."""
    shapes = models.build(config).param_shapes()
    have = lambda path: _has_path(shapes, path)  # noqa: E731
    if models.model_type(config) == "gpt2":
        tensors = [Tensor(k, p, get_path(shapes, p).shape) for k, p in _GPT2_TOP.items()]
        tensors += [Tensor(f"h.{i}.{k}", ("h", str(i)) + p, get_path(shapes, ("h", str(i)) + p).shape)
                    for i in range(config.n_layer) for k, p in _GPT2_LAYER.items()]
        return Naming("transformer.", tuple(tensors), re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$"))
    tensors = [Tensor(k, p, get_path(shapes, p).shape) for k, p in _LLAMA_TOP.items()]
    tensors += [Tensor(f"layers.{i}.{k}", ("h", str(i)) + p, get_path(shapes, ("h", str(i)) + p).shape, t)
                for i in range(config.n_layer) for k, (p, t) in _LLAMA_LAYER.items() if have(("h", str(i)) + p)]
    return Naming("model.", tuple(tensors), re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"))


def _has_path(tree, path) -> bool:
    try:
        get_path(tree, path)
        return True
    except KeyError:
        return False


def _describe(config) -> str:
    return f"{config.n_layer}-layer {models.model_type(config)}"


def state_dict_to_params(state_dict: dict[str, np.ndarray], config, source: str) -> Params:
    """Maps a state dict (HF names, with or without the base model's prefix) onto params.

    Unknown or missing tensors and shape mismatches raise `CheckpointError` naming them. A
    tied model's `lm_head.weight`, when present, must equal the embedding.
    """
    names = naming(config)
    tied = getattr(config, "tie_word_embeddings", True)  # GPT-2's head is always tied
    sd = {(k[len(names.prefix):] if k.startswith(names.prefix) else k): v for k, v in state_dict.items()}
    head = sd.pop(HEAD_NAME, None)
    known = {t.name for t in names.tensors}
    unknown = sorted(k for k in sd if k not in known and not names.buffers.match(k))
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensor(s) for a {_describe(config)}: {', '.join(unknown)}")
    missing = [t.name for t in names.tensors if t.name not in sd] + ([HEAD_NAME] if head is None and not tied else [])
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {', '.join(missing)}")
    params: Params = {}
    for t in names.tensors:
        value = np.asarray(sd[t.name], dtype=np.float32)
        if value.shape != t.hf_shape:
            raise CheckpointError(f"{source}: tensor {t.name} has shape {value.shape}, expected {t.hf_shape} "
                                  f"from the config (vocab_size={config.vocab_size}, n_embd={config.n_embd})")
        set_path(params, t.path, t.to_ours(value))
    head = None if head is None else np.asarray(head, np.float32)
    if tied:
        if head is not None and not np.array_equal(head, params[EMBEDDING]):
            raise CheckpointError(f"{source}: lm_head.weight differs from the embedding, but the config ties them "
                                  f"(tie_word_embeddings)")
    elif head.shape != params[EMBEDDING].shape:
        raise CheckpointError(f"{source}: tensor {HEAD_NAME} has shape {head.shape}, expected "
                              f"{params[EMBEDDING].shape} from the config")
    else:
        params[HEAD] = head
    return params


def params_to_state_dict(params: Params, config) -> dict[str, np.ndarray]:
    """Params -> the state dict of the family's `...ForCausalLM` (a tied head is not stored)."""
    names = naming(config)
    sd = {names.prefix + t.name: t.to_hf(get_path(params, t.path)) for t in names.tensors}
    if HEAD in params:
        sd[HEAD_NAME] = np.ascontiguousarray(np.asarray(params[HEAD], np.float32))
    return sd


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


def load_config(model_dir: str):
    """The model config of `model_dir/config.json` (the family from its `model_type`)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    with open(path) as f:
        d = json.load(f)
    try:
        return models.config_from_hf(d)
    except (ValueError, KeyError) as e:
        what = f"no field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path}: {what}") from e


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


# safetensors dtype names -> NumPy (bf16 through ml_dtypes, which JAX installs: the
# safetensors NumPy reader refuses bf16, the dtype of nearly every Llama/Qwen checkpoint).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A safetensors file as NumPy arrays, memory-mapped (no copy until converted)."""
    import ml_dtypes
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(path) > 8 + n else b""
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be read")
            dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
            start, end = info["data_offsets"]
            out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, struct.error) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def read_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    single, index = os.path.join(model_dir, SAFETENSORS), os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(read_safetensors(os.path.join(model_dir, name)))
        return out
    if os.path.isfile(os.path.join(model_dir, TORCH_BIN)):
        return torch_load(os.path.join(model_dir, TORCH_BIN))
    raise CheckpointError(f"{model_dir}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")


def load_pretrained(model_id: str) -> tuple[Any, Params]:
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


def latent_source_ids(tok) -> list[int]:
    """The token(s) whose rows the latent rows copy: `<<`, as the reference does. A tokenizer
    without a single `<<` token (the reference would copy its unknown token's row, or fail)
    gives the tokens `<<` encodes to; their mean row is used."""
    src = tok.convert_tokens_to_ids(LATENT_INIT_TOKEN)
    if src is not None and src != tok.unk_token_id and tok.convert_ids_to_tokens(src) == LATENT_INIT_TOKEN:
        return [src]
    ids = tok.encode(LATENT_INIT_TOKEN, add_special_tokens=False)
    if not ids:
        raise CheckpointError(f"tokenizer encodes {LATENT_INIT_TOKEN!r} to nothing: no row to initialise the "
                              f"latent tokens from")
    return ids


def add_latent_rows(config, params: Params, tok):
    """Sizes the embedding (and an untied head) to the tokenizer and initialises the latent rows.

    As the reference does for Coconut (`resize_token_embeddings(len(tokenizer))`, then row
    copies): the tables get exactly `len(tok)` rows, grown with the mean row or cut (Qwen's
    embeddings carry unused rows beyond its tokenizer; the reference's resize cuts them too),
    and the rows of the three latent tokens become the row of `<<` (`latent_source_ids`) in
    each table. A checkpoint with `len(tok)` rows already holds its latent rows (a Coconut
    checkpoint) and is returned unchanged.
    """
    n = len(tok)
    if np.shape(params[EMBEDDING])[0] == n:
        return config, params
    sources, ids = latent_source_ids(tok), latent_tokens(tok)
    out = dict(params)
    for name in (EMBEDDING, HEAD):
        if name not in params:
            continue
        table = np.asarray(params[name], np.float32)
        sized = np.concatenate([table, np.repeat(table.mean(0, keepdims=True), max(n - len(table), 0), 0)])[:n]
        for i in (ids.start, ids.end, ids.latent):
            sized[i] = table[sources].mean(0)
        out[name] = sized
    return dataclasses.replace(config, vocab_size=n), out


# -- reference (PyTorch) checkpoints -------------------------------------------------------

def import_reference_checkpoint(path: str, config) -> tuple[Params, str | None]:
    """A `torch.save`d state dict of the reference implementation -> (params, "coconut" or None).

    Keys are the HF model's own names (`transformer.h.0...` for GPT-2, `model.layers.0...`
    for Llama/Qwen, `lm_head.weight`) or, for Coconut checkpoints, the same prefixed by
    `base_causallm.` (then the method returned is "coconut"). The vocabulary size is taken
    from the checkpoint (for GPT-2 50257 for CoT runs, 50260 for Coconut runs).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    sd = torch_load(path)
    method = "coconut" if any(k.startswith(REFERENCE_PREFIX) for k in sd) else None
    if method:
        sd = {k[len(REFERENCE_PREFIX):]: v for k, v in sd.items() if k.startswith(REFERENCE_PREFIX)}
    names = naming(config)
    embedding = next(t.name for t in names.tensors if t.path == (EMBEDDING,))
    wte = sd.get(names.prefix + embedding, sd.get(embedding))
    if wte is None:
        raise CheckpointError(f"{path}: missing tensor(s): {names.prefix + embedding}")
    return state_dict_to_params(sd, dataclasses.replace(config, vocab_size=wte.shape[0]), path), method


# -- writing ---------------------------------------------------------------------------------

def _hf_config_dict(config, tok) -> dict[str, Any]:
    d = config.to_hf_dict()
    if tok is not None:
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        d.update(bos_token_id=bos, eos_token_id=tok.eos_token_id)
    return d


def export_hf(config, params: Params, out_dir: str, tokenizer=None, overwrite: bool = False) -> str:
    """Writes a directory that the family's `...ForCausalLM.from_pretrained` (and
    `AutoTokenizer`) load.

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
