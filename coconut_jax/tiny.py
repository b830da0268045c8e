"""Small checkpoints and byte-level BPE tokenizers of each supported family, built offline
from a dataset.

The result is an ordinary Hugging Face directory, so the same loading code serves it and
`openai-community/gpt2`, `meta-llama/Llama-3.2-1B` or `Qwen/Qwen2.5-0.5B`. The tokenizers
copy their family's pre-tokenization and special tokens (Llama 3: its split pattern and a
BOS token; Qwen2: its split pattern, NFC, no BOS). Command line:

    python -m coconut_jax.tiny --data train.json --out models/tiny --n_layer 2 --n_embd 128 [--family llama]
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Iterable

from coconut_jax import hf, latent_vocab, models
from coconut_jax.models.gpt2 import GPT2Config

FAMILIES = tuple(models.FAMILIES)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, family: str = "gpt2"):
    """A byte-level BPE tokenizer of `family`'s kind trained on `texts`, as the class the
    family's hub checkpoints load as.

    `<<` is always learnt as one token: Coconut initialises its latent tokens from it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models as bpe, normalizers, pre_tokenizers, processors, trainers
    import transformers

    kind = models.family(family).tokenizers[family]
    tok = Tokenizer(bpe.BPE())
    if kind.split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind.split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind.nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(kind.specials), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def corpus():
        yield from texts
        yield from [latent_vocab.LATENT_INIT_TOKEN] * 10_000  # frequent enough to be among the first merges

    tok.train_from_iterator(corpus(), trainer=trainer)
    if kind.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{kind.bos} $A", pair=f"{kind.bos} $A {kind.bos} $B",
            special_tokens=[(kind.bos, tok.token_to_id(kind.bos))])
    return getattr(transformers, kind.hf_class)(tokenizer_object=tok, **kind.hf_kwargs)


def model_config(family: str, vocab_size: int, *, n_layer: int, n_embd: int, n_head: int, n_positions: int,
                 dropout: float = 0.0, n_kv_head: int = 0, tied: bool = True):
    """A small config of `family` (its module's `tiny_config`); Llama/Qwen get n_kv_head key/value
    heads (0: half of n_head)."""
    return models.family(family).tiny_config(family, vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                             n_positions=n_positions, dropout=dropout, n_kv_head=n_kv_head, tied=tied)


def build(texts: Iterable[str], out_dir: str, *, vocab_size: int = 1024, n_layer: int = 2, n_embd: int = 128,
          n_head: int = 4, n_positions: int = 512, dropout: float = 0.0, seed: int = 0, wire=None,
          family: str = "gpt2", tied: bool = True, overwrite: bool = False) -> str:
    """Trains a tokenizer on `texts`, initialises a random model of `family` and saves both in
    HF format.

    `wire(config, params, seed) -> params` rewrites the fresh weights before they are saved
    (the demo's fact-lookup circuit: `coconut_jax.demo.induction.wire_induction_heads`);
    `tied=False` gives a Llama/Qwen model its own output head.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    tok = train_tokenizer(texts, vocab_size, family)
    config = model_config(family, len(tok), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                          dropout=dropout, tied=tied)
    params = models.build(config).init(seed)
    if wire is not None:
        params = wire(config, params, seed=seed)
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
    p.add_argument("--family", default="gpt2", choices=FAMILIES)
    p.add_argument("--vocab_size", type=int, default=1024)
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        p.add_argument(f"--{name}", type=int, default={"n_layer": 2, "n_embd": 128, "n_head": 4,
                                                       "n_positions": 512}.get(name, defaults[name]))
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--induction_heads", action="store_true", help="start with a fact-lookup circuit (coconut_jax.demo.induction)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    wire = None
    if a.induction_heads:
        from coconut_jax.demo.induction import wire_induction_heads as wire  # the command composes the demo's circuit
    out = build(record_texts(load_records(a.data)), a.out, vocab_size=a.vocab_size, n_layer=a.n_layer,
                n_embd=a.n_embd, n_head=a.n_head, n_positions=a.n_positions, dropout=a.dropout,
                seed=a.seed, wire=wire, family=a.family, overwrite=a.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
