"""Small GPT-2 checkpoints and byte-level BPE tokenizers built offline from a dataset.

The result is an ordinary Hugging Face directory, so the same loading code serves it and
`openai-community/gpt2`. Command line:

    python -m coconut_jax.tiny --data train.json --out models/tiny --n_layer 2 --n_embd 128
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Iterable

from coconut_jax import hf, induction
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, as a `GPT2TokenizerFast`.

    `<<` is always learnt as one token: Coconut initialises its latent tokens from it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def corpus():
        yield from texts
        yield from [hf.LATENT_INIT_TOKEN] * 10_000  # frequent enough to be among the first merges

    tok.train_from_iterator(corpus(), trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def build(texts: Iterable[str], out_dir: str, *, vocab_size: int = 1024, n_layer: int = 2, n_embd: int = 128,
          n_head: int = 4, n_positions: int = 512, dropout: float = 0.0, seed: int = 0, induction_heads: bool = False,
          overwrite: bool = False) -> str:
    """Trains a tokenizer on `texts`, initialises a random GPT-2 and saves both in HF format.

    `induction_heads` starts the model with a fact-lookup circuit (`coconut_jax.induction`).
    """
    tok = train_tokenizer(texts, vocab_size)
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    params = GPT2Model(config).init(seed)
    if induction_heads:
        params = induction.wire_induction_heads(config, params, seed=seed)
    return hf.export_hf(config, params, out_dir, tokenizer=tok, overwrite=overwrite)


def record_texts(records) -> list[str]:
    """The text a Coconut model sees for each record (question, steps, answer)."""
    return [r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"] for r in records]


def main(argv=None):
    from coconut_jax.data import load_records
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset in the Coconut JSON format")
    p.add_argument("--out", required=True)
    defaults = {f.name: f.default for f in dataclasses.fields(GPT2Config)}
    p.add_argument("--vocab_size", type=int, default=1024)
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        p.add_argument(f"--{name}", type=int, default={"n_layer": 2, "n_embd": 128, "n_head": 4,
                                                       "n_positions": 512}.get(name, defaults[name]))
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--induction_heads", action="store_true", help="start with a fact-lookup circuit (coconut_jax.induction)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = build(record_texts(load_records(a.data)), a.out, vocab_size=a.vocab_size, n_layer=a.n_layer,
                n_embd=a.n_embd, n_head=a.n_head, n_positions=a.n_positions, dropout=a.dropout,
                seed=a.seed, induction_heads=a.induction_heads, overwrite=a.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
