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
2. That is all: every module (or package) of this package with a `METHOD` is registered, and
   `--config.method=NAME` works with every config.
3. Test it beside tests/test_methods.py: its sequences at each stage (tests/test_data.py shows
   the literal form), and a short run through the CLI.

A method with a loss of several terms names them with their weights in `loss`, returns each
(sum, count) from `loss_terms` and each count alone from `term_counts` (from the batch's arrays:
counts never depend on the params). A step sums the counts over its micro-batches first, then
takes one backward pass per micro-batch with each term's cotangent weighed by its count, so that
every term is divided by its own count over the whole optimizer step (`steps.term_scales`).

A method may add modules of its own beside the model (`parts`, `Part`: a copy of `model_id`'s
pretrained model or a module the method builds fresh; sharded, trained, checkpointed and
restored with the model; used in training only or by generation too) and freeze model
parameters (`trains`). SIM-CoT (`simcot.py`) adds a pretrained decoder used in training only,
the test probe (tests/probe_method.py) also freezes; a method may build a small network of its
own that generation needs too (a `Part` with source "fresh" and `inference`).

A method may also own what a record becomes and how an answer is read: its settings (`settings`,
the config block `--config.NAME.KEY`), its text format (`tokenize`, `format_key`), the ids it
adds (`special_tokens`, `add_rows`), its batches (`epoch_plan`: any arrays, any number of
sequences per record, built without JAX; a batch offers `arrays()`, `indices`, `token_count()`,
`width`, `prefix_len` and `n_latent`), its generation and scoring (`predict`,
`max_new_tokens`). The model reports every layer's hidden state at chosen positions
(`FunctionalModel.body(..., taps=)`). The defaults are Coconut's.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil

from coconut_jax.methods.base import Method

# The reference's methods first, in its order; then every other module (or package) of this
# package that defines a METHOD, alphabetically: a new method is a file dropped here.
_REFERENCE = ("coconut", "cot", "no_thoughts", "no_cot", "pause_as_thought")
_OTHERS = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _REFERENCE + ("base",))
REGISTRY: dict[str, Method] = {}
for _name in _REFERENCE + tuple(_OTHERS):
    _method = getattr(importlib.import_module(f"coconut_jax.methods.{_name}"), "METHOD", None)
    if _method is not None:  # a module without one is a piece methods share (step_decoder)
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


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """The sequence-building settings of SPEC §3 (field names as in the reference YAML)."""
    method: str = "coconut"
    c_thought: int = 1
    max_latent_stage: int = 6
    epochs_per_stage: int = 5
    pad_latent_to_max: bool = True
    uniform_prob: float = 0.0
    settings: tuple = ()  # the method's own settings ((key, value), ...; `Method.configure`)

    def __post_init__(self):
        get(self.method).configure(dict(self.settings))  # ValueError naming the known methods or keys

    @classmethod
    def from_config(cls, c) -> "Curriculum":
        """A run config's curriculum (a ConfigDict, or run.json's dict of it)."""
        values = get(c["method"]).values_from(c)
        return cls(c["method"], c["c_thought"], c["max_latent_stage"], c["epochs_per_stage"], c["pad_latent_to_max"],
                   c.get("uniform_prob", 0.0), tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                            for k, v in values.items())))

    @functools.cached_property
    def spec(self) -> Method:
        """The method's definition (methods/), with the run's settings, which decides everything below."""
        return get(self.method).configure(dict(self.settings))

    @property
    def thoughts_per_step(self) -> int:
        return self.spec.thoughts_per_step(self.c_thought)

    @property
    def markers(self) -> bool:
        return self.spec.latent_tokens

    @property
    def feedback(self) -> bool:
        return self.spec.feedback

    def stage(self, epoch: int) -> int:
        """Scheduled stage of a 0-based epoch."""
        return self.spec.stage(epoch, self.epochs_per_stage)

    def latent_steps(self, n_steps, stage):
        """(steps dropped, latent steps) for records with `n_steps` steps trained at `stage`
        (scalars or NumPy arrays of records alike)."""
        return self.spec.latent_steps(n_steps, stage, self.max_latent_stage, self.pad_latent_to_max)

    def eval_latents(self, n_steps: int, stage: int) -> int:
        m = self.max_latent_stage if self.pad_latent_to_max else min(self.max_latent_stage, n_steps)
        return min(m, stage) * self.thoughts_per_step
