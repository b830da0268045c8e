"""LoRA: low-rank adapters on a model's projections, and trained rows of chosen tokens.

A projection `y = x W (+ b)` with an adapter computes `y + scale * (dropout(x) A) B`, with
A [in..., r] and B [r, out...] in f32 beside the frozen W (kernel axes split as the family's
`HFNames.layer` says: its first `split` axes are the input), scale = alpha / r. B starts at
zero (the model is unchanged at the start), A uniform in +-1/sqrt(fan_in) (PEFT's default).

Adapters live in the params tree next to the kernel they adapt
(`params["h"][i][proj]["lora_a" | "lora_b"]`), so the layer loop, the scan over stacked
layers and the sharding treat them like any parameter. Trained token rows (Coconut's latent
tokens: PEFT's `trainable_token_indices`) live at `params["token_rows"]` [n, E]: the
embedding of those ids is read there, and a tied head uses them for those columns too (an
untied head keeps its rows, as PEFT does).

Which parameters train under LoRA is `trains(path)`; everything else is the frozen base.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_A, ADAPTER_B = "lora_a", "lora_b"
TOKEN_ROWS = "token_rows"
EMBEDDING, HEAD = "wte", "lm_head"  # as in common.py, which imports this module


@dataclasses.dataclass(frozen=True)
class Lora:
    """A model's adapters (static: part of the model's description).

    targets: our names of the adapted projections in every layer (`resolve_targets`).
    token_ids: vocabulary rows that train (held at `token_rows`).
    train_embeddings: the whole embedding and head train instead (PEFT's `modules_to_save`).
    """
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    train_embeddings: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def record(self) -> dict:
        """As a checkpoint's metadata records it (JSON)."""
        return {**dataclasses.asdict(self), "targets": list(self.targets), "token_ids": list(self.token_ids)}

    @classmethod
    def from_record(cls, d: dict) -> "Lora":
        return cls(**{**d, "targets": tuple(d["targets"]), "token_ids": tuple(d["token_ids"])})


def projections(family) -> dict[str, tuple[str, int]]:
    """{our projection name: (its Hugging Face module path in a layer, e.g. "attn.c_proj", its
    number of input axes)} of a model family, from the family's HF names."""
    out = {}
    for hf_name, (path, split) in family.hf_names.layer.items():
        if path[-1] == "kernel" and hf_name.endswith(".weight"):
            out[path[0]] = (hf_name[:-len(".weight")], split or 1)
    return out


def resolve_targets(family, targets) -> tuple[str, ...]:
    """Our projection names for `targets`: Hugging Face module names as PEFT's `target_modules`
    take them ("q_proj", "c_attn", "c_proj": every module so named), or our own names; empty:
    every projection. ValueError naming an unknown one."""
    proj = projections(family)
    if not targets:
        return tuple(proj)
    out = []
    for t in targets:
        hits = [ours for ours, (hf, _) in proj.items() if t in (ours, hf, hf.split(".")[-1])]
        if not hits:
            names = sorted({hf.split(".")[-1] for hf, _ in proj.values()})
            raise ValueError(f"lora.targets: {t!r} is not a projection of this model (one of {', '.join(names)})")
        out += [h for h in hits if h not in out]
    return tuple(out)


def template(lora: Lora, n_layer: int, kernels: dict, family) -> list:
    """(path, shape, logical axes) of every adapter and of the token rows, given each adapted
    projection's kernel (shape, axes) in layer 0 ({name: (shape, axes)}) and the embedding's."""
    proj = projections(family)
    out = []
    for i in range(n_layer):
        for name in lora.targets:
            shape, axes = kernels[name]
            n_in = proj[name][1]
            out.append((("h", str(i), name, ADAPTER_A), tuple(shape[:n_in]) + (lora.rank,), tuple(axes[:n_in]) + (None,)))
            out.append((("h", str(i), name, ADAPTER_B), (lora.rank,) + tuple(shape[n_in:]), (None,) + tuple(axes[n_in:])))
    if lora.token_ids and not lora.train_embeddings:
        shape, axes = kernels[EMBEDDING]
        out.append(((TOKEN_ROWS,), (len(lora.token_ids), shape[1]), (None, axes[1])))
    return out


def trains(lora: Lora):
    """Which params train: the adapters, the token rows, and with `train_embeddings` the
    embedding and an untied head."""
    def f(path) -> bool:
        return (path[-1] in (ADAPTER_A, ADAPTER_B) or path[0] == TOKEN_ROWS
                or (lora.train_embeddings and path[0] in (EMBEDDING, HEAD)))
    return f


def _specs(spec: str, n_in: int):
    """The einsum specs of x -> x A and x A -> x A B for a projection's `spec` ("lhs,kernel->out")."""
    lhs, rest = spec.split(",")
    kernel, out = rest.split("->")
    k_in, k_out = kernel[:n_in], kernel[n_in:]
    kept = "".join(ch for ch in lhs if ch not in k_in)
    return f"{lhs},{k_in}z->{kept}z", f"{kept}z,z{k_out}->{out}"


def adapter(p, x, spec: str, lora: Lora):
    """scale * (x A) B of a projection with params `p` and input `x` (already through the
    adapter's dropout): the adapter's share of y."""
    a, b = p[ADAPTER_A], p[ADAPTER_B]
    to_a, to_b = _specs(spec, a.ndim - 1)
    xa = jnp.einsum(to_a, x, a.astype(x.dtype))
    return (jnp.einsum(to_b, xa, b.astype(x.dtype)) * lora.scale).astype(x.dtype)


def embed_rows(x, ids, rows, token_ids):
    """Embeddings `x` of `ids` with the trained rows in place for `token_ids`."""
    for j, t in enumerate(token_ids):
        x = jnp.where((ids == t)[..., None], rows[j].astype(x.dtype), x)
    return x


def head_rows(logits, hidden, head, rows, token_ids):
    """Logits of a tied head with the columns of `token_ids` computed from the trained rows.

    Written as an added low-rank term, (hidden . (rows - head rows)) one-hot, not as a scatter
    into the logits: a scatter and its gradient hold several extra [B,T,V] f32 buffers, the
    added term fuses into one elementwise pass."""
    ids = jnp.asarray(token_ids)
    delta = rows.astype(jnp.float32) - jnp.take(head, ids, axis=0).astype(jnp.float32)
    cols = jnp.einsum("...e,ne->...n", hidden, delta.astype(hidden.dtype)).astype(jnp.float32)
    onehot = jax.nn.one_hot(ids, logits.shape[-1], dtype=jnp.float32)
    return logits + jnp.einsum("...n,nv->...v", cols, onehot)


# -- host side: attaching, merging, identifying the base ---------------------------------------

def attach(model, params: dict, seed: int = 0) -> dict:
    """Host params with fresh adapters (B = 0, so the model computes what it did) and token
    rows copied from the embedding; the base arrays are shared, not copied."""
    lora = model.lora
    rng = np.random.default_rng(seed)
    out = {**params, "h": {i: dict(layer) for i, layer in params["h"].items()}}
    for path, shape, _ in template(lora, model.config.n_layer, model.kernel_shapes(), type(model)):
        if path[0] == TOKEN_ROWS:
            out[TOKEN_ROWS] = np.asarray(params[EMBEDDING], np.float32)[list(lora.token_ids)]
            continue
        _, i, name, which = path
        layer = out["h"][i]
        layer[name] = dict(layer[name])
        if which == ADAPTER_A:
            fan_in = int(np.prod(shape[:-1]))
            bound = 1.0 / np.sqrt(fan_in)
            layer[name][which] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            layer[name][which] = np.zeros(shape, np.float32)
    return out


def has_adapters(params: dict) -> bool:
    """Whether a params tree holds adapters already (a checkpoint's part, say)."""
    def walk(tree):
        return any(k == ADAPTER_A or (isinstance(v, dict) and walk(v)) for k, v in tree.items())
    return walk(params)


def merged(model, params: dict) -> dict:
    """Host f32 params of the plain model (no adapters): W + scale * A B in every adapted
    kernel, the token rows written into the embedding (and into a tied head by tying)."""
    lora = model.lora
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    out = {k: v for k, v in params.items() if k != TOKEN_ROWS}
    out["h"] = {}
    for i, layer in params["h"].items():
        out["h"][i] = {}
        for name, p in layer.items():
            p = dict(p) if isinstance(p, dict) else p
            if isinstance(p, dict) and ADAPTER_A in p:
                a, b = p.pop(ADAPTER_A), p.pop(ADAPTER_B)
                n_in = a.ndim - 1
                delta = a.reshape(-1, lora.rank) @ b.reshape(lora.rank, -1)
                p["kernel"] = p["kernel"] + lora.scale * delta.reshape(a.shape[:n_in] + b.shape[1:])
            out["h"][i][name] = p
    if TOKEN_ROWS in params:
        out[EMBEDDING] = params[EMBEDDING].copy()
        out[EMBEDDING][list(lora.token_ids)] = params[TOKEN_ROWS]
    return out


def digest(params: dict) -> str:
    """A short content hash of host params (dtype and every element's bits): what a LoRA
    checkpoint records of the base it was trained on."""
    from coconut_jax.checkpoint import host_fingerprint
    return hashlib.sha256(json.dumps(host_fingerprint(params), sort_keys=True).encode()).hexdigest()[:16]


def from_config(c, family, token_ids=()) -> Lora | None:
    """The `Lora` of a run config's `lora` block (None when rank is 0); ValueError naming a bad
    target."""
    if not c.lora.rank:
        return None
    return Lora(rank=int(c.lora.rank), alpha=float(c.lora.alpha), dropout=float(c.lora.dropout),
                targets=resolve_targets(family, tuple(c.lora.targets)), token_ids=tuple(int(t) for t in token_ids),
                train_embeddings=bool(c.lora.train_embeddings))
