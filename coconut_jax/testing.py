"""Slow, obviously correct forms that the fast code is checked against (tests and benchmarks);
no training run imports this module."""
from __future__ import annotations

import numpy as np

from coconut_jax.models.common import FunctionalModel


def reference_hidden(model: FunctionalModel, params, arrays, feedback: bool = True):
    """The slow, obviously correct form (SPEC §5): for k = 1..n, run the whole sequence and
    put the hidden state before each row's k-th latent into that latent; then run once more.
    Finds latents per row from `latent_mask` alone (no alignment assumed)."""
    ids, mask, pos = arrays["input_ids"], arrays["attention_mask"], arrays["position_ids"]
    latent = np.asarray(arrays["latent_mask"])
    embeds = model.embed(params, ids)
    if feedback:
        where = [np.nonzero(row)[0] for row in latent]
        for k in range(max([len(w) for w in where] + [0])):
            hidden = model.body(params, embeds, pos, mask)[0]
            for r, w in enumerate(where):
                if k < len(w):
                    embeds = embeds.at[r, w[k]].set(hidden[r, w[k] - 1])
    return model.body(params, embeds, pos, mask)[0]
