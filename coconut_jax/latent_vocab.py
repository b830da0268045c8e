"""Coconut's latent vocabulary: the three tokens a latent method adds (`<|start-latent|>`,
`<|end-latent|>`, `<|latent|>`), their ids, and the rows the embedding and head get for them
(copied from `<<`, as the reference does)."""
from __future__ import annotations

import dataclasses

import numpy as np

from coconut_jax.models.common import EMBEDDING, HEAD, Params

START_LATENT, END_LATENT, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"
LATENT_INIT_TOKEN = "<<"


class LatentVocabError(ValueError):
    """A tokenizer that gives the latent tokens no row to start from."""


@dataclasses.dataclass(frozen=True)
class LatentTokens:
    start: int
    end: int
    latent: int
    eos: int
    pad: int


def latent_tokens(tok) -> LatentTokens:
    ids = tok.convert_tokens_to_ids([START_LATENT, END_LATENT, LATENT])
    return LatentTokens(*ids, eos=tok.eos_token_id, pad=tok.pad_token_id)


def latent_source_ids(tok) -> list[int]:
    """The token(s) whose rows the latent rows copy: `<<`, as the reference does. A tokenizer
    without a single `<<` token (the reference would copy its unknown token's row, or fail)
    gives the tokens `<<` encodes to; their mean row is used."""
    src = tok.convert_tokens_to_ids(LATENT_INIT_TOKEN)
    if src is not None and src != tok.unk_token_id and tok.convert_ids_to_tokens(src) == LATENT_INIT_TOKEN:
        return [src]
    ids = tok.encode(LATENT_INIT_TOKEN, add_special_tokens=False)
    if not ids:
        raise LatentVocabError(f"tokenizer encodes {LATENT_INIT_TOKEN!r} to nothing: no row to initialise the "
                              f"latent tokens from")
    return ids


def add_latent_rows(config, params: Params, tok):
    """Sizes the embedding (and an untied head) to the tokenizer and initialises the latent rows.

    As the reference does for Coconut (`resize_token_embeddings(len(tokenizer))`, then row
    copies): the tables get exactly `len(tok)` rows, grown with the mean row or cut (Qwen's
    embeddings carry unused rows beyond its tokenizer; the reference's resize cuts them too),
    and the rows of the three latent tokens become the row of `<<` (`latent_source_ids`) in
    each table. A checkpoint with `len(tok)` rows already holds its latent rows (a Coconut
    checkpoint) and is returned unchanged.
    """
    n = len(tok)
    if np.shape(params[EMBEDDING])[0] == n:
        return config, params
    sources, ids = latent_source_ids(tok), latent_tokens(tok)
    out = dict(params)
    for name in (EMBEDDING, HEAD):
        if name not in params:
            continue
        table = np.asarray(params[name], np.float32)
        sized = np.concatenate([table, np.repeat(table.mean(0, keepdims=True), max(n - len(table), 0), 0)])[:n]
        for i in (ids.start, ids.end, ids.latent):
            sized[i] = table[sources].mean(0)
        out[name] = sized
    return dataclasses.replace(config, vocab_size=n), out
