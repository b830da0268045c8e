"""The compiled training step: compile time, XLA's temporary memory, and time per step, for
the ways the model can run, at a plain LM step and a 6-thought Coconut step.

    python benchmarks/train_step.py [--shapes tiny|gpt2|llama_tiny|llama1b|llama3b|llama8b] [--batch B --length T]
                                    [--bf16] [--param-dtype bfloat16] [--time] [--repeats 5]
                                    [--modes before,after,after_remat] [--thought-cost] [--simcot] [--lora R]
                                    [--no-full] [--codi]

Shapes: `tiny` and `llama_tiny` run on 2 CPU cores (a 2-layer GPT-2; a 2-layer Llama with
grouped-query attention, RoPE with llama3 scaling and an untied head); `gpt2` is GPT-2 small,
`llama1b`, `llama3b`, `llama8b` Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (batch 8 x 512;
compile only, for their memory, on a small machine).
Modes (one model, the same computation):
  before       layers a Python loop, per-segment attention, the loss over full f32 logits
  after        layers one lax.scan, jax.nn.dot_product_attention where no attention dropout
               applies, the loss 128 positions at a time (no [B,T,V] logits)
  after_remat  `after` with every layer rematerialised in the backward pass ("full")
Each step is loss + gradient + AdamW on one batch (dropout on, as in training, unless
--no-dropout: attention dropout keeps the per-segment attention, so --no-dropout shows the
fused kernel). Compilation uses abstract params, so GPT-2-small and 1B shapes compile on a small
machine, and reports XLA's memory for the step: arguments (params, optimizer state, batch),
temporaries and the total live at once (outputs reuse the donated params and state); `--time` also runs them: medians of interleaved repeats with their spread, tokens/s
and, on a GPU/TPU of known peak, model FLOP utilisation (6 x params x tokens + attention).
Every ratio of two steps (`..._over_...`) is taken within each round of the interleaved repeats
(both steps timed under the same load) and printed as the median, min and max over the rounds.
`--thought-cost` adds, at each thought count N > 0, the same batch as a plain LM step (`{mode}@N+plain`:
the same rows, positions and padding, the latent positions read as tokens) and the N-thought step
with the thought scan's weight gradients formed per pass as `jax.grad` of the plain scan does
(`{mode}@N+per_pass`), with the ratios `{mode}_thoughts_over_plain@N` (what the thoughts cost)
and `{mode}_per_pass_over_product@N` (what forming their kernel gradients as one product after
the scan saves). The N-thought rows are aligned at their first latent (SPEC's batching), so
their batch is wider than the 0-thought one of as many tokens: `{mode}_6_thoughts_over_0_thoughts`
compares the two batches, alignment padding included.
`--simcot` adds, at each thought count, the SIM-CoT step as a run takes it (Coconut's plus the
step decoder, a second copy of the model without the latent rows, over the thoughts' groups of 2
and 24-token steps; two loss terms, one backward pass) and its ratio to the Coconut step
(`{mode}_simcot_over_coconut@N`), and beside it the same computation with its terms summed into
one loss (`+simcot_summed`, the one-backward floor) and the ratio to it
(`{mode}_simcot_over_summed@N`).
`--lora R` adds the LoRA step (`{mode}@N+lora`): adapters of rank R on every projection and the
three latent rows train in f32 (dropout --lora-dropout, default 0.1, on the adapters' input), the base (stored in --param-dtype) is an argument that gets no
gradient and no optimizer state; with `--time`, its ratio to the full step
(`{mode}_lora_over_full@N`). `--no-full` leaves the full fine-tuning step out (8B shapes).
`--codi` (with `--lora R`) adds, at each thought count, the CODI step as a run takes it
(`{mode}@N+codi`: the teacher's pass and the student's question, N thoughts and answer, three
terms, one backward pass; adapters of rank R and the projection train, the base is frozen),
its ratio to Coconut's LoRA step at as many thoughts (`{mode}_codi_over_coconut_lora@N`), and
where its time goes: the teacher's and the student's terms alone, each over the whole step
(`{mode}_codi_teacher_over_codi@N`, `{mode}_codi_student_over_codi@N`). Its rows: the
teacher `length` tokens (question about half, answer 8), the student question + bot, N
thoughts, eot + answer.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coconut_jax import coconut, data, methods, models, steps, trainable
from coconut_jax.costs import count, model_flops, peak_flops
from coconut_jax.models import lora as lora_lib
from coconut_jax.models.gpt2 import GPT2Config
from coconut_jax.models.llama import LlamaConfig

SHAPES = {
    "tiny": dict(config=GPT2Config(vocab_size=512, n_positions=512, n_embd=64, n_layer=2, n_head=4), batch=8,
                 length=256),
    "gpt2": dict(config=GPT2Config(vocab_size=50260), batch=32, length=512),
    "llama_tiny": dict(config=LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=512, tie_word_embeddings=False,
                                          rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                                        ("low_freq_factor", 1.0),
                                                        ("original_max_position_embeddings", 64))),
                       batch=8, length=256),
    "llama1b": dict(config=LlamaConfig(vocab_size=128259), batch=8, length=512),  # + the 3 latent tokens
    "llama3b": dict(config=LlamaConfig(vocab_size=128259, hidden_size=3072, num_hidden_layers=28,
                                       num_attention_heads=24, head_dim=128), batch=8, length=512),
    "llama8b": dict(config=LlamaConfig(vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                                       num_hidden_layers=32, num_attention_heads=32, head_dim=128,
                                       tie_word_embeddings=False), batch=8, length=512),
}
MODES = {
    "before": dict(model=dict(scan_layers=False, fused_attention=False), loss_chunk=0),
    "after": dict(model=dict(scan_layers=True, fused_attention=True), loss_chunk=128),
    "after_remat": dict(model=dict(scan_layers=True, fused_attention=True, remat="full"), loss_chunk=128),
}


def make_batch(batch, length, n_thoughts, vocab):
    """Rows with a ProsQA-like layout: question, markers + latents aligned, steps and answer."""
    start, end, latent = vocab - 3, vocab - 2, vocab - 1
    rng = np.random.default_rng(0)
    seqs = []
    for r in range(batch):
        q = rng.integers(1, vocab - 3, size=length // 2 - 8 - r % 8).tolist()
        head = q + ([start] + [latent] * n_thoughts + [end] if n_thoughts else [])
        tail = rng.integers(1, vocab - 3, size=length - len(head) - 4).tolist()
        seqs.append((head + tail, [data.IGNORE] * len(head) + tail))
    return data.collate(seqs, list(range(batch)), latent_id=latent, pad_id=0, batch_size=batch, multiple=32)


def step_fn(model, tx, b, loss_chunk, feedback, deferred=True, head=True):
    """The full fine-tuning step; `feedback=False` runs the batch as a plain LM (the latent
    positions read as tokens), `deferred=False` the thought scan's per-pass weight gradients,
    `head=False` the mean hidden state as the loss (no head, no cross-entropy)."""
    def loss(p, arrays, key):
        hidden = coconut.latent_forward(model, p, arrays, b.prefix_len, b.n_latent, feedback=feedback,
                                        dropout_key=key, deferred=deferred)
        if not head:
            return jnp.mean(hidden)
        s, n = coconut.hidden_nll(model, p, hidden, arrays["labels"], loss_chunk)
        return s / n

    def step(p, o, arrays, key):
        value, g = jax.value_and_grad(loss)(p, arrays, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, value
    return jax.jit(step, donate_argnums=(0, 1))


def lora_step_fn(model, tx, b, loss_chunk, feedback):
    """The LoRA step: the trained tree (adapters, latent rows) updated; the frozen base an
    argument with no gradient and no optimizer state."""
    def loss(t, frozen, arrays, key):
        s, n = coconut.loss_terms(model, trainable.merge(t, frozen), arrays, b.prefix_len, b.n_latent,
                                  feedback=feedback, dropout_key=key, loss_chunk=loss_chunk)
        return s / n

    def step(t, o, frozen, arrays, key):
        value, g = jax.value_and_grad(loss)(t, frozen, arrays, key)
        u, o = tx.update(g, o, t)
        return optax.apply_updates(t, u), o, value
    return jax.jit(step, donate_argnums=(0, 1))


def lora_model(cfg, rank: int, dtype=jnp.float32, dropout: float = 0.1, **kw):
    family = models.family(models.model_type(cfg))
    v = cfg.vocab_size
    lora = lora_lib.Lora(rank, 2.0 * rank, dropout, lora_lib.resolve_targets(family, ()),
                         token_ids=(v - 3, v - 2, v - 1))
    return models.build(cfg, dtype, lora=lora, **kw)


def step_arrays(batch: int, n_thoughts: int, vocab: int, length: int = 32, written: int = 24) -> dict:
    """SIM-CoT step targets for groups of 2 thoughts: `written` tokens and eos per group."""
    groups = n_thoughts // 2
    rng = np.random.default_rng(1)
    ids = rng.integers(1, vocab - 3, size=(batch, groups, length)).astype(np.int32)
    mask = np.zeros((batch, groups, length), np.int32)
    mask[:, :, :written + 1] = 1
    return {"step_ids": ids, "step_mask": mask}


class SummedSimCoT(methods.get("simcot").__class__):
    """SIM-CoT's two terms summed into one: lm_sum + steps_sum x N_lm / N_steps over N_lm, the
    same objective as one term (the floor a two-term step is measured against)."""

    def term_counts(self, arrays, **kw):
        return {"lm": super().term_counts(arrays, **kw)["lm"]}

    def loss_terms(self, model, params, arrays, **kw):
        terms = super().loss_terms(model, params, arrays, **kw)
        (s, n), (ss, sn) = terms["lm"], terms["steps"]
        return {"lm": (s + ss * jax.lax.stop_gradient(n / jnp.maximum(sn, 1.0)), n)}


def simcot_step_fn(model, decoder, tx, b, loss_chunk, method=None):
    """The SIM-CoT step as a run takes it (`steps.train_step`'s parts on one micro-batch): each
    term's count and cotangent scale (`steps.term_scales`), one backward pass for both terms
    (`steps.accumulate`), one division (`steps.mean_gradient`), AdamW on (base, decoder).
    `method`: another form of it (`simcot_summed_step_fn`)."""
    method, parts = method or methods.get("simcot"), (("decoder", decoder),)

    def step(t, o, arrays, key):
        trained = trainable.pack(t[0], {"decoder": t[1]})
        scales = steps.term_scales(method, [(arrays, b.prefix_len, b.n_latent)], parts)
        acc = steps.zero_accumulator(trained, [k for k, _ in method.loss])
        acc = steps.accumulate(model, trained, acc, arrays, key, scales, method=method, prefix_len=b.prefix_len,
                               n_latent=b.n_latent, loss_chunk=loss_chunk, part_models=parts)
        g, losses = steps.mean_gradient(acc, method.loss)
        u, o = tx.update((g["model"], g["parts"]["decoder"]), o, t)
        return optax.apply_updates(t, u), o, losses["loss"]
    return jax.jit(step, donate_argnums=(0, 1))


def simcot_summed_step_fn(model, decoder, tx, b, loss_chunk):
    """The floor of the two-term step: the same harness (accumulator, one division, AdamW) on
    the same computation with its terms summed into one loss (`SummedSimCoT`)."""
    base = methods.get("simcot")
    summed = SummedSimCoT(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    return simcot_step_fn(model, decoder, tx, b, loss_chunk, dataclasses.replace(summed, loss=(("lm", 1.0),)))


def codi_batch(batch: int, length: int, n_thoughts: int, vocab: int):
    """A CODI batch like `make_batch`'s rows: the teacher question + chain + answer in `length`
    tokens (question about half, answer 8), the student question + bot, its thoughts, eot + answer."""
    from coconut_jax.data import PlanSettings, TokenizedSet
    from coconut_jax.methods.codi import data as codi_data
    rng = np.random.default_rng(2)
    pieces = []
    for r in range(batch):
        q = rng.integers(1, vocab - 3, size=length // 2 - 8 - r % 8).tolist()
        a = rng.integers(1, vocab - 3, size=8).tolist()
        c = rng.integers(1, vocab - 3, size=length - 4 - len(q) - len(a)).tolist()
        pieces.append((q, c, a, [1, 3]))
    tokens = codi_data.Tokens(vocab - 3, eos=0)
    return codi_data.Plan(TokenizedSet.from_pieces(pieces), tokens, n_thoughts,
                          PlanSettings(seed=0, batch_size=batch, multiple=32), 0, shuffle=False).batch(0)


def codi_method(n: int, only: str | None = None):
    """Method codi at `n` thoughts; `only` "teacher" or "student": that term alone (its pass,
    forward and backward), to see where the step's time goes."""
    from coconut_jax.methods.codi import forward
    base = methods.get("codi").configure({"num_latent": n})
    if only is None:
        return base

    class One(type(base)):
        def term_counts(self, arrays, **kw):
            return {only: super().term_counts(arrays, **kw)[only]}

        def loss_terms(self, model, params, arrays, *, n_latent, dropout_key=None, loss_chunk=0, parts=None, **kw):
            params = model.stack_layers(params)
            if only == "teacher":
                return {only: forward.teacher_pass(model, params, arrays, dropout_key=dropout_key,
                                                   loss_chunk=loss_chunk)[0]}
            prj, prj_params = parts["projection"]
            return {only: forward.student_pass(model, params, prj, prj_params, arrays, n_latent=n_latent,
                                               mask_pads=False, dropout_key=dropout_key, loss_chunk=loss_chunk)[0]}
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return One(**{**fields, "loss": ((only, 1.0),)})


def codi_step_fn(model, prj, tx, n: int, loss_chunk, method):
    """The CODI step as a run takes it: the LoRA adapters and the projection trained, the base
    frozen; the terms' counts and scales, one backward pass (`steps.accumulate`), AdamW."""
    parts = (("projection", prj),)

    def step(t, o, frozen, arrays, key):
        scales = steps.term_scales(method, [(arrays, 0, n)], parts)
        acc = steps.zero_accumulator(t, [k for k, _ in method.loss])
        acc = steps.accumulate(model, t, acc, arrays, key, scales, method=method, prefix_len=0, n_latent=n,
                               loss_chunk=loss_chunk, frozen=frozen, part_models=parts)
        g, losses = steps.mean_gradient(acc, method.loss)
        u, o = tx.update(g, o, t)
        return optax.apply_updates(t, u), o, losses["loss"]
    return jax.jit(step, donate_argnums=(0, 1))


def ratio(a: list[float], b: list[float]) -> dict:
    """Two steps' time ratio per round of interleaved repeats (the two ran within a round, under
    the same load): its median, min and max over the rounds."""
    r = [x / y for x, y in zip(a, b)]
    return {"median": round(float(np.median(r)), 3), "min": round(min(r), 3), "max": round(max(r), 3)}


def is_simcot(name: str) -> bool:
    return name.endswith(("+simcot", "+simcot_summed"))


def is_codi(name: str) -> bool:
    return "+codi" in name


def gib(n: int) -> float:
    return round(n / 2 ** 30, 3)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="tiny", choices=list(SHAPES))
    p.add_argument("--batch", type=int)
    p.add_argument("--length", type=int)
    p.add_argument("--bf16", action="store_true", help="bf16 compute")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="how params and optimizer state are stored")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--time", action="store_true", help="also run the steps (allocates params and batches)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="before,after,after_remat")
    p.add_argument("--thoughts", default="0,6")
    p.add_argument("--simcot", action="store_true", help="also the SIM-CoT step at each thought count > 0")
    p.add_argument("--lora", type=int, default=0, help="also the LoRA step with adapters of this rank")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the adapters' input")
    p.add_argument("--no-full", action="store_true", help="leave the full fine-tuning step out")
    p.add_argument("--thought-cost", action="store_true",
                   help="also, at each thought count > 0, the same batch as a plain LM step (+plain) and the thought "
                        "scan's per-pass weight gradients (+per_pass)")
    p.add_argument("--codi", action="store_true",
                   help="also the CODI step (needs --lora R) at each thought count > 0, and its teacher and student "
                        "terms alone")
    a = p.parse_args()
    if a.codi and not a.lora:
        p.error("--codi trains LoRA adapters: give their rank with --lora R (CODI's recipes: 128)")
    spec = SHAPES[a.shapes]
    cfg = spec["config"]
    if a.no_dropout:
        drop = ("embd_pdrop", "attn_pdrop", "resid_pdrop") if isinstance(cfg, GPT2Config) else ("attention_dropout",)
        cfg = dataclasses.replace(cfg, **{k: 0.0 for k in drop})
    batch, length = a.batch or spec["batch"], a.length or spec["length"]
    dtype = jnp.bfloat16 if a.bf16 else jnp.float32
    tx = optax.adamw(1e-4, weight_decay=0.01)
    abstract = models.build(cfg).param_shapes(a.param_dtype)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    decoder_cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size - 3)  # the pretrained vocabulary
    abstract_sim = (abstract, models.build(decoder_cfg).param_shapes(a.param_dtype))
    abstract_sim_opt = jax.eval_shape(tx.init, abstract_sim)
    if a.lora:
        lm = lora_model(cfg, a.lora, dropout=a.lora_dropout)
        lora_trains = lora_lib.trains(lm.lora)
        abstract_lora, abstract_frozen = trainable.split(lm.param_shapes(a.param_dtype), lora_trains)
        abstract_lora_opt = jax.eval_shape(tx.init, abstract_lora)
    kind = jax.devices()[0].device_kind
    out = {"device": kind, "backend": jax.default_backend(), "shape": a.shapes, "batch": batch, "length": length,
           "family": models.model_type(cfg), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab": cfg.vocab_size,
           "params_m": round(count(abstract) / 1e6, 1),
           **({"lora_rank": a.lora, "lora_dropout": a.lora_dropout, "lora_trained_m": round(count(abstract_lora) / 1e6, 2)} if a.lora else {}),
           "dtype": jnp.dtype(dtype).name, "param_dtype": a.param_dtype, "dropout": not a.no_dropout}
    compiled, batches = {}, {}
    for n in (int(x) for x in a.thoughts.split(",")):
        b = make_batch(batch, length, n, cfg.vocab_size)
        batches[n] = b
        arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.arrays().items()}
        for mode in a.modes.split(","):
            m = MODES[mode]
            model = models.build(cfg, dtype, **m["model"])
            variants = [] if a.no_full else [
                (f"{mode}@{n}", step_fn(model, tx, b, m["loss_chunk"], feedback=n > 0), (abstract, abstract_opt),
                 arrays)]
            if a.thought_cost and n > 0 and not a.no_full:
                variants += [(f"{mode}@{n}+plain", step_fn(model, tx, b, m["loss_chunk"], feedback=False),
                              (abstract, abstract_opt), arrays),
                             (f"{mode}@{n}+per_pass", step_fn(model, tx, b, m["loss_chunk"], feedback=True,
                                                              deferred=False), (abstract, abstract_opt), arrays)]
            if a.lora:
                variants.append((f"{mode}@{n}+lora", lora_step_fn(lora_model(cfg, a.lora, dtype, a.lora_dropout, **m["model"]), tx, b,
                                                                  m["loss_chunk"], feedback=n > 0),
                                 (abstract_lora, abstract_lora_opt, abstract_frozen), arrays))
            if a.simcot and n > 0:
                decoder = models.build(decoder_cfg, dtype, **m["model"])
                sim_arrays = {**arrays, **{k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                           for k, v in step_arrays(batch, n, cfg.vocab_size).items()}}
                for suffix, make in (("+simcot", simcot_step_fn), ("+simcot_summed", simcot_summed_step_fn)):
                    variants.append((f"{mode}@{n}{suffix}", make(model, decoder, tx, b, m["loss_chunk"]),
                                     (abstract_sim, abstract_sim_opt), sim_arrays))
            if a.codi and n > 0:
                lm_codi = lora_model(cfg, a.lora, dtype, a.lora_dropout, **m["model"])
                lm_codi = lm_codi.replace(lora=dataclasses.replace(lm_codi.lora, token_ids=()))  # CODI trains no rows
                prj = codi_method(n).part_module(codi_method(n).parts[0], cfg)
                cb = codi_batch(batch, length, n, cfg.vocab_size)
                batches[f"codi{n}"] = cb
                codi_arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in cb.arrays().items()}
                t_shapes, f_shapes = trainable.split(lm_codi.param_shapes(a.param_dtype), lora_lib.trains(lm_codi.lora))
                trained_shapes = trainable.pack(t_shapes, {"projection": prj.param_shapes()})
                for suffix, only in (("+codi", None), ("+codi_teacher", "teacher"), ("+codi_student", "student")):
                    variants.append((f"{mode}@{n}{suffix}", codi_step_fn(lm_codi, prj, tx, n, m["loss_chunk"],
                                                                        codi_method(n, only)),
                                     (trained_shapes, jax.eval_shape(tx.init, trained_shapes), f_shapes), codi_arrays))
            for name, fn, state_shapes, arrays_shape in variants:
                t0 = time.perf_counter()
                c = fn.lower(*state_shapes, arrays_shape, jax.random.key(0)).compile()
                secs = time.perf_counter() - t0
                mem = c.memory_analysis()
                compiled[name] = c
                out[name] = {"compile_s": round(secs, 2)}
                if mem is not None:
                    out[name].update(argument_gb=gib(mem.argument_size_in_bytes), temp_gb=gib(mem.temp_size_in_bytes),
                                     total_gb=gib(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes))
                print(f"{name}: {out[name]}", flush=True)
    if a.time:
        params = jax.tree.map(lambda x: x.astype(a.param_dtype), models.build(cfg).init(0))
        decoder_params = jax.tree.map(lambda x: x.astype(a.param_dtype), models.build(decoder_cfg).init(1))
        times = {name: [] for name in compiled}

        if a.lora:
            lm = lora_model(cfg, a.lora)
            lora_params = trainable.split(jax.tree.map(jnp.asarray, lora_lib.attach(lm, jax.tree.map(
                np.asarray, models.build(cfg).init(0)))), lora_lib.trains(lm.lora))
            lora_params = (lora_params[0], jax.tree.map(lambda x: x.astype(a.param_dtype), lora_params[1]))

        if a.codi:
            lm_c = lora_model(cfg, a.lora)
            lm_c = lm_c.replace(lora=dataclasses.replace(lm_c.lora, token_ids=()))
            codi_t, codi_frozen = trainable.split(jax.tree.map(jnp.asarray, lora_lib.attach(lm_c, jax.tree.map(
                np.asarray, models.build(cfg).init(0)))), lora_lib.trains(lm_c.lora))
            codi_frozen = jax.tree.map(lambda x: x.astype(a.param_dtype), codi_frozen)
            prj0 = codi_method(6).part_module(codi_method(6).parts[0], cfg)
            codi_t = trainable.pack(codi_t, {"projection": jax.tree.map(jnp.asarray, prj0.init(0))})

        def initial(name):
            if is_codi(name):
                return jax.tree.map(jnp.array, codi_t), tx.init(codi_t), codi_frozen
            if name.endswith("+lora"):
                t, frozen = lora_params
                return jax.tree.map(jnp.array, t), tx.init(t), frozen
            t = (params, decoder_params) if is_simcot(name) else params
            return jax.tree.map(jnp.array, t), tx.init(t)
        state = {name: initial(name) for name in compiled}
        device_arrays = {n: {k: jnp.asarray(v) for k, v in b.arrays().items()} for n, b in batches.items()
                         if isinstance(n, int)}
        sim_arrays = {n: {**device_arrays[n], **{k: jnp.asarray(v) for k, v in step_arrays(batch, n, cfg.vocab_size)
                                                 .items()}} for n in batches if isinstance(n, int) and n}
        codi_arrays_dev = {int(k[4:]): {name: jnp.asarray(v) for name, v in b.arrays().items()}
                           for k, b in batches.items() if isinstance(k, str)}
        for r in range(a.repeats + 1):  # the first round warms up
            for name, c in compiled.items():
                n = int(name.split("@")[1].split("+")[0])
                st = state[name]
                t0 = time.perf_counter()
                arrays_n = (codi_arrays_dev[n] if is_codi(name) else sim_arrays[n] if is_simcot(name)
                            else device_arrays[n])
                p_, o_, loss = c(*st, arrays_n, jax.random.key(r))
                jax.block_until_ready(loss)
                state[name] = (p_, o_, *st[2:])
                if r:
                    times[name].append(time.perf_counter() - t0)
        peak = peak_flops(kind)
        for name, ts in times.items():
            n = int(name.split("@")[1].split("+")[0])
            b_n = batches[f"codi{n}"] if is_codi(name) else batches[n]
            tokens = b_n.token_count() if is_codi(name) else batch * batches[n].input_ids.shape[1]
            med = float(np.median(ts))
            out[name].update(step_s_median=round(med, 5), step_s_spread=[round(min(ts), 5), round(max(ts), 5)],
                             tokens_per_s=round(tokens / med))
            if peak and a.bf16 and not (is_simcot(name) or name.endswith("+lora")):  # the count is the base model's
                out[name]["mfu"] = round(model_flops(models.build(cfg), tokens, batches[n].input_ids.shape[1])
                                         / med / peak, 3)
        for name in times:
            if name.endswith("+simcot"):
                mode, n = name[:-len("+simcot")].split("@")
                if f"{mode}@{n}" in times:
                    out[f"{mode}_simcot_over_coconut@{n}"] = ratio(times[name], times[f"{mode}@{n}"])
                # The one-backward target: the two-term step against its terms summed into one loss.
                out[f"{mode}_simcot_over_summed@{n}"] = ratio(times[name], times[name + "_summed"])
        for name in times:
            if name.endswith("+lora") and name[:-len("+lora")] in times:
                mode, n = name[:-len("+lora")].split("@")
                out[f"{mode}_lora_over_full@{n}"] = ratio(times[name], times[f"{mode}@{n}"])
        for name in times:
            if name.endswith("+codi"):
                mode, n = name[:-len("+codi")].split("@")
                if f"{mode}@{n}+lora" in times:  # against Coconut's LoRA step at as many thoughts
                    out[f"{mode}_codi_over_coconut_lora@{n}"] = ratio(times[name], times[f"{mode}@{n}+lora"])
                for part in ("teacher", "student"):  # where the time goes
                    out[f"{mode}_codi_{part}_over_codi@{n}"] = ratio(times[f"{name}_{part}"], times[name])
        for name in times:
            if name.endswith("+plain"):
                base = name[:-len("+plain")]
                mode, n = base.split("@")
                # The thoughts' own cost: the same batch, positions and padding, without the feedback.
                out[f"{mode}_thoughts_over_plain@{n}"] = ratio(times[base], times[name])
                out[f"{mode}_per_pass_over_product@{n}"] = ratio(times[base + "+per_pass"], times[base])
        for mode in a.modes.split(","):
            if f"{mode}@6" in times and f"{mode}@0" in times:
                # Batches of different widths: the 6-thought rows are aligned at their first latent.
                out[f"{mode}_6_thoughts_over_0_thoughts"] = ratio(times[f"{mode}@6"], times[f"{mode}@0"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
