"""Which parameters train: the optimizer's tree, split from the frozen ones and joined back.

A run's parameters are the model's (`params`, what generation and export read) and those of
the modules a method adds beside it (`parts`: {name: params}, e.g. SIM-CoT's step decoder).
The optimizer sees one tree, the *trained* tree:

  - the model's trained parameters, when the method adds no part (so a run that trains
    everything has exactly the layout it always had: params, and the optimizer state of
    params);
  - {"model": the model's trained parameters, "parts": {name: params}} otherwise.

Frozen model parameters (those for which the method's `trains(path)` is False) stay outside
it: no gradient, no optimizer moments. Trees are nested dicts of arrays; paths are tuples of
their keys.
"""
from __future__ import annotations

from typing import Callable



def names(path) -> tuple[str, ...]:
    """A pytree path as a tuple of its keys' names."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def split(params: dict, trains: Callable[[tuple[str, ...]], bool] | None):
    """(trained, frozen) halves of a nested dict; frozen is None when everything trains."""
    if trains is None:
        return params, None

    def walk(tree, prefix):
        kept, held = {}, {}
        for k, v in tree.items():
            path = prefix + (str(k),)
            if isinstance(v, dict):
                a, b = walk(v, path)
                if a:
                    kept[k] = a
                if b:
                    held[k] = b
            elif trains(path):
                kept[k] = v
            else:
                held[k] = v
        return kept, held
    trained, frozen = walk(params, ())
    return trained, (frozen or None)


def merge(a: dict, b: dict | None) -> dict:
    """The union of two nested dicts with no leaf in common (the inverse of `split`)."""
    if not b:
        return a
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def pack(model_trained: dict, parts: dict | None) -> dict:
    """The optimizer's tree (see the module docstring)."""
    return {"model": model_trained, "parts": parts} if parts else model_trained


def unpack(tree: dict, frozen: dict | None, has_parts: bool, frozen_parts: dict | None = None) -> tuple[dict, dict]:
    """(the model's full params, the parts' full params) of an optimizer tree and the frozen
    rest (`frozen_parts`: {name: a part's frozen params}, for parts with adapters)."""
    model_trained, parts = (tree["model"], tree["parts"]) if has_parts else (tree, {})
    if frozen_parts:
        parts = {name: merge(p, frozen_parts.get(name)) for name, p in parts.items()}
    return merge(model_trained, frozen), parts


def split_parts(parts: dict, trains: dict) -> tuple[dict, dict | None]:
    """({name: trained params}, {name: frozen params} or None) of the parts' params, by each
    part's `trains` ({name: which of its params train, None: all})."""
    halves = {name: split(p, trains[name]) for name, p in parts.items()}
    frozen = {name: f for name, (_, f) in halves.items() if f}
    return {name: t for name, (t, _) in halves.items()}, (frozen or None)
