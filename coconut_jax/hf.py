"""Hugging Face checkpoints (GPT-2, Llama 3.x, Qwen2/2.5, Qwen3) <-> coconut_jax params.

Loads a hub id or a local directory (`config.json` + `model.safetensors` (sharded or not,
any float dtype, bf16 included), or `pytorch_model.bin` through torch with
`weights_only=True`), the tokenizer with the three
latent tokens, imports checkpoints written by the reference PyTorch implementation, and
exports params back to a directory that `transformers` loads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Any

import numpy as np

from coconut_jax import files, models
from coconut_jax.latent_vocab import END_LATENT, LATENT, START_LATENT
from coconut_jax.models.common import EMBEDDING, HEAD, Params, get_path, set_path

SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be used, with the reason."""


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


HEAD_NAME = "lm_head.weight"


def naming(config) -> Naming:
    """The tensors of `config`'s model as HF names them (only those its params hold), from the
    names its family module declares (`HF_NAMES`)."""
    model = models.build(config)
    shapes, names = model.param_shapes(), model.hf_names
    tensors = [Tensor(k, p, get_path(shapes, p).shape) for k, p in names.top.items()]
    for i in range(config.n_layer):
        for k, (p, split) in names.layer.items():
            path = ("h", str(i)) + p
            if _has_path(shapes, path):
                tensors.append(Tensor(f"{names.layer_prefix}.{i}.{k}", path, get_path(shapes, path).shape, split))
    return Naming(names.prefix, tuple(tensors), re.compile(names.buffers))


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

def resolve_model_dir(model_id: str, weights: bool = True) -> str:
    """A local directory as is; a bucket directory copied to this machine (`files.local_copy`;
    without the weight files unless `weights`: a config or a tokenizer is read); otherwise a
    hub id, downloaded (or taken from the HF cache)."""
    if files.is_remote(model_id):
        if not files.isfile(os.path.join(model_id, "config.json")):
            raise CheckpointError(f"{model_id}: no model directory (config.json) there")
        return files.local_copy(model_id, skip=() if weights else (".safetensors", ".bin", ".pt", ".pth"))
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
            names = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in names:
            out.update(read_safetensors(os.path.join(model_dir, name)))
        return out
    if os.path.isfile(os.path.join(model_dir, TORCH_BIN)):
        return torch_load(os.path.join(model_dir, TORCH_BIN))
    raise CheckpointError(f"{model_dir}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")


def load_pretrained(model_id: str) -> tuple[Any, Params]:
    model_dir = resolve_model_dir(model_id)
    config = load_config(model_dir)
    return config, state_dict_to_params(read_state_dict(model_dir), config, model_dir)


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
            # A checkpoint whose tokenizer_config.json names none (the hub's GPT-2): its family's class
            # (the mapping AutoTokenizer would consult lives beside the torch import).
            or models.tokenizer_class(_read_json_field(os.path.join(model_dir, "config.json"), "model_type")))
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
    model_dir = resolve_model_dir(model_id, weights=False)
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


# -- writing ---------------------------------------------------------------------------------

def _hf_config_dict(config, tok) -> dict[str, Any]:
    d = config.to_hf_dict()
    if tok is not None:
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        d.update(bos_token_id=bos, eos_token_id=tok.eos_token_id)
    return d


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yields a temporary sibling of `out_dir` to fill, renamed into place when the block ends
    (a crash never leaves a half directory); an existing non-empty `out_dir` is a
    FileExistsError unless `overwrite`. A bucket `out_dir` is filled from a local temporary with
    the files readers look for (`config.json`, PEFT's `adapter_config.json`) last: a reader takes
    a directory without them for none (`files.put_tree`)."""
    out_dir = files.abspath(out_dir)
    if files.exists(out_dir) and files.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists and is not empty (pass overwrite=True to replace it)")
    if files.is_remote(out_dir):
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
            files.put_tree(tmp, out_dir, last=("config.json", "adapter_config.json"))
        return
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tree(tree: dict, path: str) -> None:
    """A nested dict of arrays as one safetensors file (keys joined with ".")."""
    from safetensors.numpy import save_file

    def flat(t, prefix=""):
        for k, v in t.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, np.ascontiguousarray(v))]
    save_file(dict(flat(tree)), path)


def read_tree(path: str) -> dict:
    """`write_tree`'s file back as a nested dict of NumPy arrays."""
    out: dict = {}
    for key, value in read_safetensors(path).items():
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = np.asarray(value)
    return out


def write_hf(config, params: Params, out_dir: str, tokenizer=None) -> None:
    """The model files (config.json, safetensors, and the tokenizer's) into an existing directory."""
    from safetensors.numpy import save_file
    save_file(params_to_state_dict(params, config), os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(_hf_config_dict(config, tokenizer), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def export_hf(config, params: Params, out_dir: str, tokenizer=None, overwrite: bool = False) -> str:
    """Writes a directory that the family's `...ForCausalLM.from_pretrained` (and
    `AutoTokenizer`) load, atomically (`atomic_dir`)."""
    with atomic_dir(out_dir, overwrite) as tmp:
        write_hf(config, params, tmp, tokenizer)
    return os.path.abspath(out_dir)
