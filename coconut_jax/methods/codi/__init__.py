"""CODI (Shen et al., EMNLP 2025): one model trained on two views of each record at once.

A teacher reads the question, the written chain and the answer; a student reads the question,
runs `num_latent` continuous thoughts through a small projection network (`projection`, a part
built fresh and needed at inference) and then writes the answer. A distillation term pulls
the student's hidden state of every layer at the token before the answer towards the
teacher's (docs/codi.md):

    loss = student CE + teacher_factor x teacher CE + distill_factor x distillation

There is no curriculum (every epoch is stage 0); evaluation asks each question with the same
`num_latent` thoughts. This package is the method whole: its text and batches (`data`, no
JAX) and its computation (`forward`).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from coconut_jax.methods.base import HFStateDict, Method, Part

# The text and batches (codi/data.py) import the data pipeline, which imports this registry:
# read them when a method function runs, not when the registry is built.
PHRASE, ANSWERS = "The answer is:", ("number", "text")


def _data():
    from coconut_jax.methods.codi import data
    return data

SETTINGS = (
    ("codi.num_latent", 6),             # continuous thoughts, in training and at evaluation
    ("codi.prj_dim", 0),                # the projection's hidden width (0: the model's width, both recipes' choice)
    ("codi.prj_norm", True),            # the projection ends with a LayerNorm
    ("codi.distill_factor", 1.0),       # the distillation term's weight (the Llama recipe: 20)
    ("codi.teacher_factor", 1.0),       # the teacher's token loss weight (the reference's ref_loss_factor)
    ("codi.include_last_cot", False),   # the teacher reads the chain's last step too (the reference drops it)
    ("codi.max_token_num", 1000),       # records longer (question + steps + answer, in tokens) do not train
    ("codi.mask_pads", False),          # our fix: mask the student's left pads and start positions after them
    ("codi.answers", "number"),         # "number": GSM8K's (the last word, numeric answers train, the last number
                                   # scores); "text": the whole answer, scored by its text (ProsQA, ProntoQA)
)

_NUMBER = re.compile(r"-?\d+\.?\d*")


def last_number(text: str) -> float | None:
    """The reference's answer: the last number in the text (commas removed), as a float."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def score(text: str, gold: str, answers: str) -> tuple[str, bool]:
    """(the answer read from generated `text`, whether it is right). "number": the reference's
    (the last number, as a float, equal to the gold's); "text": what follows "The answer is:",
    equal to the gold answer (both stripped)."""
    if answers == "text":
        got = text.split(PHRASE, 1)[-1].strip()
        return got, got == gold.strip()
    got, want = last_number(text), last_number(gold)
    return ("" if got is None else f"{got:g}"), got is not None and got == want


@dataclasses.dataclass(frozen=True)
class Codi(Method):
    def configure(self, values):
        m = super().configure(values)
        s = {k.split(".", 1)[1]: v for k, v in m.settings}
        steps = (("steps", 1.0),) if m.step_decoding is not None else ()
        return dataclasses.replace(
            m, loss=(("student", 1.0), ("teacher", float(s["teacher_factor"])), ("distill", float(s["distill_factor"])))
            + steps, format_key=f"codi:last={bool(s['include_last_cot'])}:max={int(s['max_token_num'])}:"
                                f"answers={s['answers']}")

    def config_errors(self, c) -> list[str]:
        m = self.configure(self.values_from(c))
        s = {k.split(".", 1)[1]: v for k, v in m.settings}
        out = super().config_errors(c)
        if s["num_latent"] < 1:  # the reference crashes on 0 (SPEC-CODI §7 item 11)
            out.append(f"{self.name}.num_latent={s['num_latent']} must be >= 1")
        if s["prj_dim"] < 0:
            out.append(f"{self.name}.prj_dim={s['prj_dim']} must be >= 0 (0: the model's width)")
        if s["distill_factor"] < 0 or s["teacher_factor"] < 0:
            out.append(f"{self.name}.distill_factor and teacher_factor must be >= 0")
        if s["answers"] not in ANSWERS:
            out.append(f"{self.name}.answers={s['answers']!r} must be one of {', '.join(ANSWERS)}")
        if s["max_token_num"] < 1:
            out.append(f"{self.name}.max_token_num={s['max_token_num']} must be >= 1")
        return out

    # -- text and batches ---------------------------------------------------------------------
    def tokenize(self, records, tokenizer, source):
        return _data().tokenize(records, tokenizer, source, bool(self.setting("include_last_cot")),
                                int(self.setting("max_token_num")), self.setting("answers"))

    def training_records(self, examples) -> int:
        return int(np.sum(_data().verdicts(_data().TokenizedSet.from_examples(examples))[0]))

    def import_state_dict(self, state_dict):
        """The reference's saved CODI module: the model under `codi.` (`codi.base_model.model.*`
        with its PEFT adapters), the projection under `prj.` (nn.Sequential: 1 and 3 the two
        Linear layers, `ln` the LayerNorm); with a step decoder, SIM-CoT's variant's `decoder.*`
        (a Hugging Face model's state dict)."""
        if not any(k.startswith("codi.") for k in state_dict):
            return None
        model = {k[len("codi."):]: v for k, v in state_dict.items() if k.startswith("codi.")}
        prj = {k[len("prj."):]: np.asarray(v, np.float32) for k, v in state_dict.items() if k.startswith("prj.")}
        decoder = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        parts = {"decoder": HFStateDict(decoder)} if decoder and self.step_decoding is not None else {}
        if prj:
            parts["projection"] = {"fc1": {"kernel": prj["1.weight"].T, "bias": prj["1.bias"]},
                                   "fc2": {"kernel": prj["3.weight"].T, "bias": prj["3.bias"]}}
            if "ln.weight" in prj:
                parts["projection"]["ln"] = {"scale": prj["ln.weight"], "bias": prj["ln.bias"]}
        return model, parts

    def special_tokens(self, tok, vocab_size):
        return _data().Tokens(vocab_size, tok.eos_token_id, *_data().step_ids(tok))

    def add_rows(self, config, params, tok, pretrained_vocab):
        """pad, bot and eot after the pretrained rows (a checkpoint that has them is unchanged),
        drawn as transformers' resize draws them: the rows' mean plus noise of 1e-9 x their
        covariance, from a fixed seed, so a LoRA base rebuilds bit-identical."""
        rows = np.shape(params["wte"])[0]
        if rows != pretrained_vocab:
            return config, params
        out = dict(params)
        for name in ("wte", "lm_head"):
            if name in params:
                table = np.asarray(params[name], np.float32)
                mean = table.mean(0)
                g = np.random.default_rng(0xC0D1).standard_normal((table.shape[0], 3)).astype(np.float32)
                noise = ((table - mean).T @ g).T * np.float32(np.sqrt(1e-9 / table.shape[0]))
                out[name] = np.concatenate([table, mean[None] + noise])
        return dataclasses.replace(config, vocab_size=rows + 3), out

    def planned_vocab(self, pretrained_vocab, tokenizer_len):
        return pretrained_vocab + 3

    def epoch_plan(self, examples, cur, tokens, stage, epoch, settings, shuffle=True, static_shapes=None):
        k = int(self.setting("num_latent"))
        decoder = self.step_decoding is not None  # a group per thought, z1..z_{K+1}
        return _data().Plan(examples, tokens, k, settings, epoch, shuffle, static_shapes,
                            exact_encoder=not self.setting("mask_pads"), step_groups=k + 1 if decoder else 0,
                            reference_lengths=decoder and bool(self.setting("reference_lengths")))

    # -- the model's side ---------------------------------------------------------------------
    def part_module(self, part, model_config):
        from coconut_jax.methods.codi.forward import Projection
        width = model_config.n_embd
        return Projection(width, int(self.setting("prj_dim")) or width, bool(self.setting("prj_norm")))

    def term_counts(self, arrays, *, prefix_len, n_latent, parts=None):
        import jax.numpy as jnp

        from coconut_jax import coconut
        per_batch = (jnp.sum(arrays["rows"]) > 0).astype(jnp.float32)
        return {"student": coconut.label_count(arrays["dec_labels"]),
                "teacher": coconut.label_count(arrays["ref_labels"]), "distill": per_batch,
                **({"steps": per_batch} if self.step_decoding is not None else {})}

    def loss_terms(self, model, params, arrays, *, prefix_len, n_latent, dropout_key=None, loss_chunk=0,
                   parts=None):
        from coconut_jax.methods.codi import forward
        prj, prj_params = parts["projection"]
        steps = None if self.step_decoding is None else (*parts["decoder"], self.step_decoding)
        return forward.loss_terms(model, params, prj, prj_params, arrays, n_latent=n_latent,
                                  mask_pads=bool(self.setting("mask_pads")), dropout_key=dropout_key,
                                  loss_chunk=loss_chunk, steps=steps)

    def plan_batch(self, cur, stage, rows, length, step_length):
        """The planned shapes: the teacher `length` tokens, the student's question + bot half of
        it, its eot + answer an eighth (at least 8)."""
        enc, dec = max(length // 2, 2), max(length // 8, 8)
        i32 = np.int32
        k = int(self.setting("num_latent"))
        shapes = {"ref_ids": ((rows, length), i32), "ref_labels": ((rows, length), i32), "ref_pos": ((rows,), i32),
                  "enc_ids": ((rows, enc), i32), "enc_mask": ((rows, enc), i32), "dec_ids": ((rows, dec), i32),
                  "dec_labels": ((rows, dec), i32), "dec_pos": ((rows,), i32), "rows": ((rows,), np.float32)}
        if self.step_decoding is not None:  # a group per thought, `step_length` tokens each
            shapes.update({n: ((rows, k + 1, step_length), i32) for n in ("step_ids", "step_mask")})
        return shapes, 0, k

    def plan_generation(self, model, params, parts, cur, stage, rows, prompt, max_new_tokens, place):
        from coconut_jax.methods.codi import forward
        prj, prj_params = parts["projection"]
        arrays = place({"enc_ids": ((rows, prompt), np.int32), "enc_mask": ((rows, prompt), np.int32)})
        return forward.generate.lower(model, params, prj, prj_params, arrays["enc_ids"], arrays["enc_mask"],
                                      np.int32(0), np.int32(0), n_latent=int(self.setting("num_latent")),
                                      max_new_tokens=max_new_tokens,
                                      mask_pads=bool(self.setting("mask_pads"))).compile()

    # -- evaluation -----------------------------------------------------------------------------
    def max_new_tokens(self):
        return 256  # the reference's test.py

    def eval_thoughts(self, cur, stage):
        return int(self.setting("num_latent")), True

    def written_steps(self, model, params, parts, example, tokens):
        """Each step of the question's teacher chain beside what the step decoder writes from
        its thought (z1..z_{K+1}, as in training)."""
        if self.step_decoding is None:
            return None
        from coconut_jax.methods import step_decoder
        from coconut_jax.methods.codi import forward
        k = int(self.setting("num_latent"))
        prj, prj_params = parts["projection"]
        decoder, decoder_params = parts["decoder"]
        ids = np.array([list(example.question) + [tokens.bot]], np.int32)
        z = forward.thoughts_fed(model, params, prj, prj_params, ids, np.ones_like(ids), n_latent=k)
        groups = _data().chain_groups(list(example.steps[0]), tokens, k + 1)
        written = step_decoder.decode(model, params, decoder, decoder_params, np.asarray(z)[0][:, None],
                                      tokens.eos, self.step_decoding.first_position)
        return [(w, g[:-1]) for w, g in zip(written, groups)]

    def with_thoughts(self, cur, thoughts):
        """The same prompts with `thoughts` passes (0: the question, bot, then eot at once)."""
        if thoughts < 0:
            raise ValueError(f"method {self.name!r} takes 0 thoughts or more, not {thoughts}")
        settings = dict(cur.settings) | {"num_latent": thoughts}
        return dataclasses.replace(cur, settings=tuple(sorted(settings.items()))), 0

    def thought_states(self, model, params, parts, example, stage, cur, tokens):
        """The final hidden state each thought is projected from (at bot, then at each thought
        but the last): what the LM head reads them as."""
        from coconut_jax.methods.codi import forward
        prj, prj_params = parts["projection"]
        ids = np.array([list(example.question) + [tokens.bot]], np.int32)
        return np.asarray(forward.thought_states(model, params, prj, prj_params, ids, np.ones_like(ids),
                                                 n_latent=int(self.setting("num_latent"))), np.float32)[0]

    def predict(self, model, params, parts, examples, records, stage, cur, tokens, tokenizer, *, batch_size,
                max_new_tokens, multiple=32, row_multiple=1, context=None, overlong="error", put=None,
                get=np.asarray, progress=lambda it, **kw: it):
        """The reference's test: the file's questions in order, `batch_size` at a time, left-padded
        (to the longest question of the batch, unless pads are masked: then to `multiple`), the
        thoughts, eot, greedy decoding; the answer is the last number of the generated text."""
        from coconut_jax import answers
        from coconut_jax.data.curriculum import check_lengths
        from coconut_jax.methods.codi import forward
        codi_data = _data()
        prj, prj_params = parts["projection"]
        k, mask_pads = int(self.setting("num_latent")), bool(self.setting("mask_pads"))
        ts = codi_data.TokenizedSet.from_examples(examples)
        questions = [ts.piece(int(ts.records[i])) for i in range(len(ts))]
        order = np.arange(len(ts))
        if context is not None:
            fits = check_lengths([len(q) + 1 + k + max_new_tokens for q in questions], order, context, overlong,
                                 f"prompts with {k} thoughts plus max_new_tokens={max_new_tokens}")
            order = order[fits]
        size = answers.batch_rows(len(order), batch_size, row_multiple) if len(order) else 1
        running = []
        for s in range(0, len(order), size):
            rows = order[s:s + size]
            longest = max(len(questions[i]) for i in rows) + 1
            width = codi_data.round_up(longest, multiple) if mask_pads else longest
            ids, mask = codi_data.encoder_rows([questions[i] for i in rows], size, width, tokens)
            batch = codi_data.Batch({"enc_ids": ids, "enc_mask": mask}, rows, k, tokens.pad)
            arrays = (put or (lambda b: b.arrays()))(batch)
            running.append((rows, forward.generate(model, params, prj, prj_params, arrays["enc_ids"],
                                                   arrays["enc_mask"], tokens.eot, tokens.eos, n_latent=k,
                                                   max_new_tokens=max_new_tokens, mask_pads=mask_pads)))
        preds = []
        for rows, (toks, kept) in progress(running, desc="generate"):
            toks, kept = get(toks), get(kept)
            for r, i in enumerate(rows.tolist()):
                out = [t for t in toks[r, :kept[r]].tolist() if t < tokens.vocab]
                text = tokenizer.decode(out, skip_special_tokens=True)
                answer, correct = score(text, records[i]["answer"], self.setting("answers"))
                preds.append(answers.Prediction(i, text, answer, records[i]["answer"], correct, False, int(kept[r]), k))
        return preds


METHOD = Codi(
    name="codi",
    summary="a teacher reading the chain and a student thinking in projected continuous thoughts, "
            "distilled at every layer (no curriculum)",
    feedback=True, staged=False, loss=(("student", 1.0), ("teacher", 1.0), ("distill", 1.0)),
    parts=(Part("projection", source="fresh", inference=True),), settings=SETTINGS, loss_per_batch=True,
    format_key="codi:last=False:max=1000:answers=number")
