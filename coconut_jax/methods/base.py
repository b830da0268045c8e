"""What a method is: the declarative record every part of a run reads (no JAX imported here,
so the data pipeline can read it too)."""
from __future__ import annotations

import dataclasses

import numpy as np


def _plain(v):
    """A setting's value in a hashable form (the record is a static argument of jitted steps)."""
    return tuple(v) if isinstance(v, list) else v


class HFStateDict(dict):
    """A part's weights as a Hugging Face model's state dict (a reference's saved decoder), for
    coconut_jax.weights to read at the part's own config."""


@dataclasses.dataclass(frozen=True)
class Part:
    """A module a method adds beside the model, with parameters of its own: created when a run
    starts, sharded by its own logical axes, trained by the same optimizer, checkpointed and
    restored with the model (under `parts/<name>`).

    name: its key in the run's parts (and checkpoints).
    source: where a fresh run takes its weights: "pretrained", a copy of `model_id`'s
        pretrained model at its own vocabulary (not resized to the latent tokens); "fresh", the
        module `Method.part_module` builds, initialised from the run's seed. A hand-off
        (`load_model_path`) from a checkpoint that holds the part takes it from there.
    inference: generation needs it too (the method's `predict` receives it); otherwise it is
        used in training only.
    lora_rank: the method's setting ("block.key") whose value, when > 0, puts LoRA adapters of
        that rank on a "pretrained" part (the run's `lora` alpha, dropout and targets): its
        base is then frozen and only the adapters train (None: the part trains whole).
    """
    name: str
    source: str = "pretrained"
    inference: bool = False
    lora_rank: str | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One latent-reasoning method (or baseline), as the reference's flags define it (SPEC §3).

    name: the value of `--config.method`.
    latent_tokens: sequences and prompts carry `<|start-latent|>`, the thoughts' `<|latent|>`
        tokens and `<|end-latent|>`; the vocabulary grows by those three rows (copied from `<<`).
    feedback: at a latent position the model's input is the previous position's last hidden
        state (Coconut's continuous thought); otherwise latent tokens are ordinary tokens.
    thoughts: each replaced step becomes `c_thought` latent positions (False: none, the
        reference's `no_thoughts` forcing c_thought to 0).
    staged: the stage advances every `epochs_per_stage` epochs; otherwise every epoch is stage 0.
    drops_every_step: every reasoning step is left out of every sequence (`no_cot`).
    needs_c_thought: `c_thought` must be at least 1.
    loss: the loss's named terms and their weights. Each term is a (sum, count) pair summed over
        an optimizer step's micro-batches (and, for evaluation, the validation set); the
        objective is the weighted sum of sum/count, logged as `train/loss` (`eval/loss`), each
        term as `train/<name>` when there are several. `loss_terms` returns them by name;
        `term_counts` gives the counts alone, from the batch's arrays (they never depend on the
        params), so that a step of several terms weighs each term by its count over the whole
        step before its one backward pass.
    parts: the modules this method adds beside the model (`Part`); `loss_terms` receives each
        as (its model, its params) under its name.
    step_targets: batches carry each row's step targets (`data.step_targets`: `step_ids`,
        `step_mask` [rows, groups, length]), what each group of thoughts replaced, parsed by the
        config's `step_groups` rule.
    settings: the method's own settings and their defaults, as ("block.key", default): the
        config blocks `--config.<block>.<key>` (validated with the rest of the config, part of the
        run's identity, unknown keys refused); two methods may share a block (a variant reads its
        base method's); `configure` returns the record with a run's values.
    step_decoding: a step decoder attached to the method (`methods.step_decoder.StepDecoding`:
        the part "decoder" writes out, from the thoughts, the steps they replaced); None: none.
    loss_per_batch: a term of the loss is normalised per batch (not per token), so the
        validation loss is taken in batches of `eval_batch_size` rows, the file's records in
        order, as the reference forms them.
    """
    name: str
    summary: str
    latent_tokens: bool = False
    feedback: bool = False
    thoughts: bool = True
    staged: bool = True
    drops_every_step: bool = False
    needs_c_thought: bool = False
    loss: tuple[tuple[str, float], ...] = (("lm", 1.0),)
    parts: tuple[Part, ...] = ()
    step_targets: bool = False
    settings: tuple[tuple[str, object], ...] = ()
    loss_per_batch: bool = False
    format_key: str = ""  # a method with its own text format names it (token caches key on it)
    step_decoding: object = None

    # -- a method's own settings ---------------------------------------------------------------
    def blocks(self) -> tuple[str, ...]:
        """The config blocks the method's settings live in, in order."""
        return tuple(dict.fromkeys(k.split(".")[0] for k, _ in self.settings))

    def values_from(self, c) -> dict:
        """{"block.key": value} of the method's settings in a config (a ConfigDict, or run.json's
        dict of it); a block the config lacks leaves the defaults."""
        out = {}
        for block in self.blocks():
            values = c.get(block) if hasattr(c, "get") else None
            values = values.to_dict() if hasattr(values, "to_dict") else (values or {})
            out.update({f"{block}.{k}": v for k, v in values.items()})
        return out

    def configure(self, values: dict | None) -> "Method":
        """The record with a run's values of `settings` ({"block.key" or "key": value}; a key it
        does not have: ValueError)."""
        if not values:
            return self
        known = dict(self.settings)
        full = {self._key(k): v for k, v in values.items()}
        unknown = sorted(set(full) - set(known))
        if unknown:
            raise ValueError(f"method {self.name!r} has no setting {unknown[0]!r} (its settings: "
                             f"{', '.join(known) or 'none'})")
        return dataclasses.replace(self, settings=tuple((k, _plain(full.get(k, v))) for k, v in self.settings))

    def _key(self, key: str) -> str:
        """A setting's "block.key" from itself or its key alone (when one block has it)."""
        if "." in key:
            return key
        hits = [k for k, _ in self.settings if k.split(".", 1)[1] == key]
        return hits[0] if len(hits) == 1 else key

    def setting(self, key: str):
        return dict(self.settings)[self._key(key)]

    # -- what a run's data is, for this method (defaults: Coconut's text and batches) -----------
    def tokenize(self, records, tokenizer, source: str):
        """Records -> the method's `data.TokenizedSet` (Coconut's text format: SPEC §1)."""
        from coconut_jax.data.tokens import tokenize_records
        return tokenize_records(records, tokenizer, source)

    def training_records(self, examples) -> int:
        """How many of a tokenized training set's records an epoch trains on (all, here)."""
        return len(examples)

    def import_state_dict(self, state_dict: dict):
        """This method's reference implementation's saved state dict -> (the model's state
        dict, Hugging Face names, PEFT-wrapped or not; {part name: params}), or None when
        `state_dict` is not in its layout (the Coconut reference's is read by coconut_jax.weights)."""
        return None

    def special_tokens(self, tok, vocab_size: int):
        """The ids a run's sequences use beyond the text's (`vocab_size`: the pretrained
        model's): Coconut's latent tokens, eos and pad (`latent_vocab.LatentTokens`)."""
        from coconut_jax import latent_vocab
        return latent_vocab.latent_tokens(tok)

    def add_rows(self, config, params, tok, pretrained_vocab: int):
        """(config, params) with the embedding rows the method's tokens need: the latent rows
        when `latent_tokens` (copied from `<<`), none otherwise."""
        if not self.latent_tokens:
            return config, params
        from coconut_jax import latent_vocab
        return latent_vocab.add_latent_rows(config, params, tok)

    def planned_vocab(self, pretrained_vocab: int, tokenizer_len: int) -> int:
        """The embedding's rows after `add_rows`, known before any weight is read."""
        return tokenizer_len if self.latent_tokens else pretrained_vocab

    def epoch_plan(self, examples, cur, tokens, stage: int, epoch: int, settings, shuffle: bool = True,
                   static_shapes: bool | None = None):
        """An epoch's batches (`data.EpochPlan`: `len`, `batch(k)`, `batches()`)."""
        from coconut_jax.data.batching import EpochPlan
        return EpochPlan(examples, cur, tokens, stage, epoch, settings, shuffle, static_shapes)

    def part_module(self, part: Part, model_config):
        """The module of a "fresh" part (`param_shapes`, `logical_axes`, `init(seed)`, hashable)."""
        raise ValueError(f"method {self.name!r}: part {part.name!r} has no module to build")

    def eval_thoughts(self, cur, stage: int) -> tuple[int, bool]:
        """(the thoughts an evaluation prompt at `stage` carries at most, whether every prompt
        carries exactly that many): the stage's, with latent tokens; none otherwise."""
        if not self.latent_tokens:
            return 0, True
        return cur.eval_latents(cur.max_latent_stage, stage), cur.pad_latent_to_max

    def with_thoughts(self, cur, thoughts: int):
        """(curriculum, stage) whose prompts carry exactly `thoughts` thoughts, whatever a
        record's steps (one thought per stage, padded to the last); ValueError for a method
        whose prompts hold none."""
        if not self.latent_tokens:
            raise ValueError(f"method {self.name!r} puts no thoughts in its prompts")
        return dataclasses.replace(cur, c_thought=1, max_latent_stage=thoughts, epochs_per_stage=1,
                                   pad_latent_to_max=True), thoughts

    def thought_states(self, model, params, parts, example, stage: int, cur, tokens):
        """[thoughts, E]: the hidden states a question's thoughts are made from, to read through
        the LM head (`generate --show-thoughts`): Coconut's fed-back states."""
        from coconut_jax import answers, data
        return answers.thoughts(model, params, data.eval_prompt(example, stage, cur, tokens), tokens)

    # -- the memory plan (coconut_jax.plan), before any data exists --------------------------------
    def plan_batch(self, cur, stage: int, rows: int, length: int, step_length: int):
        """({name: (shape, dtype)} of a micro-batch of `rows` sequences of `length` tokens at
        `stage`, prefix_len, n_latent): Coconut's arrays, the first latent mid-sequence, the
        stage's thoughts (with step targets of `step_length` tokens when the method has them)."""
        n_latent = int(cur.latent_steps(cur.max_latent_stage + stage + 1, stage)[1]) * cur.thoughts_per_step
        shapes = {k: ((rows, length), np.int32) for k in ("input_ids", "attention_mask", "position_ids", "labels")}
        shapes["latent_mask"] = ((rows, length), np.bool_)
        if self.step_targets:
            groups = n_latent // cur.thoughts_per_step if cur.thoughts_per_step else 0
            shapes.update({k: ((rows, groups, step_length), np.int32) for k in ("step_ids", "step_mask")})
        marked = n_latent if self.latent_tokens else 0
        return shapes, (length // 2 if marked else 0), marked

    def plan_generation(self, model, params, parts, cur, stage: int, rows: int, prompt: int, max_new_tokens: int,
                        place):
        """The compiled generation program for `rows` prompts of `prompt` tokens at `stage`
        (abstract `params`; `parts`: {name: (module, abstract params)} of the parts it needs;
        `place`: {name: (shape, dtype)} -> abstract arrays on the mesh)."""
        from coconut_jax import coconut
        shapes, _, n_latent = self.plan_batch(cur, stage, rows, prompt, 0)
        arrays = place({k: v for k, v in shapes.items() if k != "labels"})
        return coconut.generate.lower(model, params, arrays, np.int32(0), prefix_len=prompt // 2 if n_latent else 0,
                                      n_latent=n_latent, max_new_tokens=max_new_tokens,
                                      feedback=self.feedback).compile()

    def written_steps(self, model, params, parts, example, tokens):
        """[(decoded tokens, the step's tokens), ...] of a question's thoughts through the step
        decoder, when the method pairs thoughts and steps itself; None: Coconut's pairing
        (`analysis.report_steps`)."""
        return None

    def max_new_tokens(self) -> int | None:
        """The method's own default generation length (None: the reference Coconut's rule)."""
        return None

    def predict(self, model, params, parts, examples, records, stage, cur, tokens, tokenizer, **kw):
        """Greedy answers to `examples`, scored (`answers.Prediction`s); `parts`: {name:
        (module, params)} of the parts generation needs. Coconut's prompts and scoring here."""
        from coconut_jax import answers
        return answers.generate_predictions(model, params, examples, records, stage, cur, tokens, tokenizer, **kw)

    def thoughts_per_step(self, c_thought: int) -> int:
        return c_thought if self.thoughts else 0

    def stage(self, epoch: int, epochs_per_stage: int) -> int:
        """Scheduled stage of a 0-based epoch."""
        return epoch // epochs_per_stage if self.staged else 0

    def latent_steps(self, n_steps, stage, max_latent_stage: int, pad_latent_to_max: bool):
        """(steps dropped, latent steps) for records with `n_steps` steps trained at `stage`
        (scalars or NumPy arrays of records alike; SPEC §3)."""
        n_steps, stage = np.asarray(n_steps), np.asarray(stage)
        if self.drops_every_step:
            return n_steps, np.zeros_like(n_steps)
        over = stage > max_latent_stage
        n_over = max_latent_stage if pad_latent_to_max else np.minimum(n_steps, max_latent_stage)
        return np.where(over, n_steps, np.minimum(stage, n_steps)), np.where(over, n_over, stage)

    def config_errors(self, c) -> list[str]:
        """What in a run's config this method cannot honour."""
        out = []
        if self.needs_c_thought and c.c_thought < 1:
            out.append(f"c_thought must be >= 1 for method {self.name}")
        values = self.configure(self.values_from(c))
        for part in self.parts:
            rank = values.setting(part.lora_rank) if part.lora_rank else 0
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                out.append(f"{part.lora_rank}={rank!r} must be an integer >= 0 (0: the {part.name} trains whole)")
        return out

    def trains(self, path: tuple[str, ...]) -> bool:
        """Whether the model's parameter at `path` (its keys, e.g. ("wte",) or ("h", "0",
        "attn", "c_attn", "kernel")) trains. A frozen one gets no gradient and no optimizer
        state, and stays bit-identical through training. Every parameter trains here."""
        return True

    def lora_tokens(self, tokens) -> tuple[int, ...]:
        """Vocabulary rows that train beside LoRA's adapters (`tokens`: the run's
        `latent_vocab.LatentTokens`): the three latent tokens' when the method adds them, since
        they start as copies of `<<` and mean nothing yet. Their embedding rows train; a tied
        head reads them too."""
        return (tokens.start, tokens.end, tokens.latent) if self.latent_tokens else ()

    def term_counts(self, arrays, *, prefix_len: int, n_latent: int, parts=None) -> dict:
        """{term: count} of a batch: what `loss_terms` returns as each term's count, computed
        from the arrays alone (`parts`: {name: model} of the method's parts). Here the labelled
        next-token positions."""
        from coconut_jax import coconut
        return {"lm": coconut.label_count(arrays["labels"])}

    def loss_terms(self, model, params, arrays, *, prefix_len: int, n_latent: int, dropout_key=None,
                   loss_chunk: int = 0, parts=None) -> dict:
        """{term: (sum, count)} of a batch, one entry per name of `loss`. Here the one term "lm":
        the summed token loss over the sequence's labels and the token count, with thoughts fed
        back when `feedback`. Callers divide once, after summing over micro-batches.
        `parts`: {name: (model, params)} of the method's `parts` ({} without any)."""
        from coconut_jax import coconut
        return {"lm": coconut.loss_terms(model, params, arrays, prefix_len, n_latent, feedback=self.feedback,
                                         dropout_key=dropout_key, loss_chunk=loss_chunk)}
