"""A slow PyTorch transliteration of the reference CODI's training forward (its model.py's
forward, train.py's data preparation and collator), in evaluation mode: what
tests/test_codi.py checks our loss terms against. It tokenizes the records itself, finds
the answer's position by searching for "The answer is:" as the reference does, and runs
transformers' own model with its KV cache, one call per pass, as the reference runs it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _find(seq: list[int], sub: list[int]) -> int:
    """The index after the first occurrence of `sub` in `seq` (the reference's
    get_answer_token_position; exactly one match is required there)."""
    hits = [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]
    assert len(hits) == 1, hits
    return hits[0] + len(sub)


def prepare(records, tok, vocab: int, include_last_cot: bool = False, llama_shift: bool = False):
    """train.py's per-record tensors and the collator's padding (pad = vocab, bot = vocab + 1,
    eot = vocab + 2; bos stripped from chains and answers when the tokenizer adds one)."""
    pad, bot, eot, eos = vocab, vocab + 1, vocab + 2, tok.eos_token_id
    enc, ref, ref_lab, dec, p_t, p_s = [], [], [], [], [], []
    bos = tok.bos_token_id if tok("x")["input_ids"][0] == tok.bos_token_id else None
    phrase = tok("The answer is:")["input_ids"]
    if bos is not None and phrase[0] == bos:
        phrase = phrase[1:]
    for r in records:
        cot = " ".join(r["steps"] if include_last_cot else r["steps"][:-1])
        a = r["answer"].split(" ")[-1]
        q_ids = tok(r["question"], truncation=True, max_length=256)["input_ids"]
        c_ids = tok(cot, truncation=True, max_length=256)["input_ids"]
        a_ids = tok("The answer is: " + a.replace("####", ""), truncation=True, max_length=256)["input_ids"]
        if bos is not None:
            c_ids, a_ids = c_ids[1:], a_ids[1:]
        a_ids = a_ids + [eos]
        enc.append(q_ids + [bot])
        ref.append(q_ids + c_ids + a_ids)
        ref_lab.append([-100] * len(q_ids) + c_ids + a_ids)
        dec.append([eot] + a_ids)
        shift = 1 if llama_shift else 0
        p_t.append(_find(ref[-1], phrase) - 1 + shift)
        p_s.append(_find(dec[-1], phrase) - 1 + shift)

    def right(rows, value):
        w = max(map(len, rows))
        return torch.tensor([x + [value] * (w - len(x)) for x in rows])
    we = max(map(len, enc))
    enc_ids = torch.tensor([[pad] * (we - len(x)) + x for x in enc])
    return {"enc": enc_ids, "enc_mask": (enc_ids != pad).long(), "ref": right(ref, pad), "ref_labels": right(ref_lab, -100),
            "dec": right(dec, pad), "labels": right(dec, -100), "p_t": torch.tensor(p_t), "p_s": torch.tensor(p_s)}


class Projection(torch.nn.Module):
    """model.py's prj: Dropout(0) -> Linear -> GELU -> Linear -> LayerNorm."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.fc2, self.ln = torch.nn.Linear(d, h), torch.nn.Linear(h, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(self.fc2(F.gelu(self.fc1(x))))


def terms(model, prj, b: dict, num_latent: int, grad: bool = False, step_decoder=None) -> dict:
    """(student CE, teacher CE, distillation) of one batch (model.py 262-409), floats, or
    tensors to differentiate with `grad`. `step_decoder`: (decoder, its step groups per row
    (`get_steps`), pad, reference_lengths) adds SIM-CoT's explain loss on z1..z_{K+1}."""
    rows = torch.arange(b["enc"].shape[0])
    with contextlib.nullcontext() if grad else torch.no_grad():
        o = model(input_ids=b["enc"], attention_mask=b["enc_mask"], use_cache=True, output_hidden_states=True)
        kv = o.past_key_values
        z = prj(o.hidden_states[-1][:, -1:])
        zs = [z[:, 0]]
        t = model(input_ids=b["ref"], output_hidden_states=True)
        for i in range(num_latent):
            o = model(inputs_embeds=z, cache=kv, use_cache=True, output_hidden_states=True)
            kv = o.past_key_values
            z = prj(o.hidden_states[-1][:, -1:])  # z_{i+2}; the last (z_{K+1}) only the step decoder reads
            zs.append(z[:, 0])
        s = model(inputs_embeds=model.get_input_embeddings()(b["dec"]), cache=kv, output_hidden_states=True)
        student = F.cross_entropy(s.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
        teacher = F.cross_entropy(t.logits[:, :-1].flatten(0, 1), b["ref_labels"][:, 1:].flatten(), ignore_index=-100)
        layers = []
        for ht, hs in zip(t.hidden_states, s.hidden_states):
            tl, sl = ht[rows, b["p_t"]], hs[rows, b["p_s"]]
            layers.append(F.smooth_l1_loss(sl, tl.detach()) / tl.std())
        distill = sum(layers) / len(layers)
        steps = None
        if step_decoder is not None:
            decoder, groups, pad, reference_lengths = step_decoder
            steps = explain_loss(decoder, model.get_input_embeddings(), zs, groups, pad, reference_lengths)
    if grad:
        return {"student": student, "teacher": teacher, "distill": distill, **({"steps": steps} if steps is not None
                                                                                  else {})}
    return {"student": float(student), "teacher": float(teacher), "distill": float(distill),
            **({"steps": float(steps)} if steps is not None else {}),
            "student_tokens": int((b["labels"][:, 1:] != -100).sum()),
            "teacher_tokens": int((b["ref_labels"][:, 1:] != -100).sum())}


# -- SIM-CoT's step decoder on CODI (SIM-CoT's CODI/src/model.py: get_steps, pad_steps, the explain loss) --

def get_steps(ref_row: list[int], opens, close: int, eot: int, stops, n_groups: int) -> list[list[int]]:
    """A teacher row's step groups: cut at the first stop id, scan `<<`...`>>` (+ eot), the
    first n_groups - 1 kept and the rest joined into the last with one eot, empty groups as
    `[pad]` left to the caller."""
    for i, t in enumerate(ref_row):
        if t in stops:
            ref_row = ref_row[:i]
            break
    steps, i = [], 0
    while i < len(ref_row):
        if ref_row[i] in opens:
            j = i + 1
            while j < len(ref_row) and ref_row[j] != close:
                j += 1
            if j < len(ref_row):
                steps.append(ref_row[i:j + 1] + [eot])
            i = j + 1
        else:
            i += 1
    if len(steps) > n_groups:
        steps = steps[:n_groups - 1] + [[t for s in steps[n_groups - 1:] for t in s[:-1]] + [eot]]
    return steps


def explain_loss(decoder, base_embed, thoughts, groups, pad: int, reference_lengths: bool = False):
    """L_exp of one batch: per group t with targets, the token-mean CE of the decoder writing
    group t from thought t ([u ; E_base(X_t)], positions from 0, labels the step's ids); the
    mean over the groups with targets. `thoughts` [G] of [B, D] tensors; `groups` per row
    lists. `reference_lengths`: row 0 sets each group's length (the reference's quirk)."""
    b, n = len(groups), len(thoughts)
    longest = max([len(g) for gs in groups for g in gs] + [1])
    total, used = 0.0, 0
    for t in range(n):
        rows = [gs[t] if t < len(gs) else [pad] for gs in groups]
        width = longest
        if reference_lengths:
            width = min(len(groups[0][t]) + 1, longest) if t < len(groups[0]) else 1
        x = torch.tensor([(r + [pad] * longest)[:width] for r in rows])
        labels = torch.where(x == pad, torch.tensor(-100), x)
        if not (labels != -100).any():
            continue
        inputs = torch.cat([thoughts[t][:, None], base_embed(x)], dim=1)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.long), (x != pad).long()], dim=1)
        logits = decoder(inputs_embeds=inputs, attention_mask=mask).logits
        full = torch.cat([torch.full((b, 1), -100), labels], dim=1)
        total = total + F.cross_entropy(logits[:, :-1].flatten(0, 1), full[:, 1:].flatten(), ignore_index=-100)
        used += 1
    return total / max(1, used)
