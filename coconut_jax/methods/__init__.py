"""Latent-reasoning methods, each a declarative `Method` record in a registry keyed by name.

Everything that differs between methods is read from the record, never by comparing names:
the curriculum and sequences (`data`), config validation, the run's weight rules (`rundir`:
which methods carry the latent tokens), the training and evaluation loss, and generation
(whether thoughts feed back). No module outside this package tests `method == ...`.

Adding a method
---------------
1. Write `coconut_jax/methods/NAME.py` holding `METHOD = Method(name="NAME", ...)`; the fields
   of `Method` (methods/base.py) say what each one decides. A method whose training loss is not
   the language-model loss over the sequence's labels overrides `Method.loss_terms` (a subclass;
   the record stays hashable, since jitted steps take it as a static argument).
2. Add the module to `_MODULES` below; `--config.method=NAME` then works with every config.
3. Test it beside tests/test_methods.py: its sequences at each stage (tests/test_data.py shows
   the literal form), and a short run through the CLI.

A method with a loss of several terms names them with their weights in `loss`, returns each
(sum, count) from `loss_terms` and each count alone from `term_counts` (from the batch's arrays:
counts never depend on the params). A step sums the counts over its micro-batches first, then
takes one backward pass per micro-batch with each term's cotangent weighed by its count, so that
every term is divided by its own count over the whole optimizer step (`steps.term_scales`).

A method may add modules of its own beside the model (`parts`, `Part`: created from `model_id`'s
pretrained weights, sharded, trained, checkpointed and restored with the model, used in training
only) and freeze model parameters (`trains`). SIM-CoT (`simcot.py`) does the first, the test
probe (tests/probe_method.py) both.
"""
from __future__ import annotations

import importlib

from coconut_jax.methods.base import Method

_MODULES = ("coconut", "cot", "no_thoughts", "no_cot", "pause_as_thought", "simcot")
REGISTRY: dict[str, Method] = {}
for _name in _MODULES:
    _method = importlib.import_module(f"coconut_jax.methods.{_name}").METHOD
    REGISTRY[_method.name] = _method
NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    """The method called `name`; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"method {name!r} is not one of {', '.join(NAMES)}") from None


def carries_latent_tokens(name: str | None) -> bool:
    """Whether weights saved by method `name` (None or unknown: a plain model) hold the latent rows."""
    method = REGISTRY.get(name) if name else None
    return bool(method and method.latent_tokens)
