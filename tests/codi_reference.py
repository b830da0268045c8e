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


def terms(model, prj, b: dict, num_latent: int, grad: bool = False) -> dict:
    """(student CE, teacher CE, distillation) of one batch (model.py 262-409), floats, or
    tensors to differentiate with `grad`."""
    rows = torch.arange(b["enc"].shape[0])
    with contextlib.nullcontext() if grad else torch.no_grad():
        o = model(input_ids=b["enc"], attention_mask=b["enc_mask"], use_cache=True, output_hidden_states=True)
        kv = o.past_key_values
        z = prj(o.hidden_states[-1][:, -1:])
        t = model(input_ids=b["ref"], output_hidden_states=True)
        for i in range(num_latent):
            o = model(inputs_embeds=z, cache=kv, use_cache=True, output_hidden_states=True)
            kv = o.past_key_values
            if i + 1 < num_latent:
                z = prj(o.hidden_states[-1][:, -1:])
        s = model(inputs_embeds=model.get_input_embeddings()(b["dec"]), cache=kv, output_hidden_states=True)
        student = F.cross_entropy(s.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
        teacher = F.cross_entropy(t.logits[:, :-1].flatten(0, 1), b["ref_labels"][:, 1:].flatten(), ignore_index=-100)
        layers = []
        for ht, hs in zip(t.hidden_states, s.hidden_states):
            tl, sl = ht[rows, b["p_t"]], hs[rows, b["p_s"]]
            layers.append(F.smooth_l1_loss(sl, tl.detach()) / tl.std())
        distill = sum(layers) / len(layers)
    if grad:
        return {"student": student, "teacher": teacher, "distill": distill}
    return {"student": float(student), "teacher": float(teacher), "distill": float(distill),
            "student_tokens": int((b["labels"][:, 1:] != -100).sum()),
            "teacher_tokens": int((b["ref_labels"][:, 1:] != -100).sum())}
