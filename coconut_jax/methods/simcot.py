"""SIM-CoT (Wei et al., ICLR 2026): Coconut plus step-level supervision of the thoughts
(SPEC-SIMCOT.md).

Coconut with the step decoder attached (`step_decoder.py`, shared with `codi_simcot`): a
training-only decoder, a second copy of `model_id`'s *pretrained* model at its own vocabulary
(the part "decoder"), must write out from each group of `c_thought` continuous thoughts the step
those thoughts replaced (`data.step_targets`). Its inputs are the group's thoughts (not
detached) then the step's tokens embedded with the *base's* word embedding; position ids start
at 1; it has no dropout. Its own tied head predicts the step and its eos.

    loss = lm (Coconut's, token-weighted) + steps (summed step NLL / (rows x groups))

Generation is Coconut's with the base alone; the decoder never leaves as the model.
"""
from __future__ import annotations

import dataclasses

from coconut_jax.methods import step_decoder
from coconut_jax.methods.base import Method, Part
from coconut_jax.methods.step_decoder import StepDecoding

DECODING = StepDecoding(first_position=1, reduce="pairs", dropout=False)  # the SIM-CoT reference's Coconut


def step_nll(model, params, decoder, decoder_params, hidden, arrays, prefix_len: int, n_latent: int,
             loss_chunk: int = 0):
    """(summed NLL of every group's step target, number of (row, group) pairs with a target).

    `hidden`: the base's final hidden states of the batch [B,T,E] (`coconut.latent_forward`);
    the thought fed at latent position i is the hidden state at i-1, so group t's thoughts are
    positions prefix_len-1+c*t .. prefix_len-2+c*(t+1). The decoder's part is the shared
    `step_decoder.decoder_loss` (Coconut's choices: positions from 1, no dropout, "pairs")."""
    import jax.numpy as jnp
    ids, mask = arrays["step_ids"], arrays["step_mask"]
    b, n_groups, _ = ids.shape
    if n_groups == 0 or n_latent == 0:
        return jnp.float32(0), jnp.float32(0)
    c = n_latent // n_groups
    thoughts = hidden[:, prefix_len - 1:prefix_len - 1 + n_groups * c]
    thoughts = thoughts.reshape(b, n_groups, c, thoughts.shape[-1])
    return step_decoder.decoder_loss(model, params, decoder, decoder_params, thoughts, ids, mask, DECODING,
                                     loss_chunk=loss_chunk)


def step_count(arrays, n_latent: int):
    """The (row, group) pairs with a step target: the count the step term divides by."""
    import jax.numpy as jnp
    if arrays["step_mask"].shape[1] == 0 or n_latent == 0:
        return jnp.float32(0)
    return step_decoder.pair_count(arrays["step_mask"])


@dataclasses.dataclass(frozen=True)
class SimCoT(Method):
    def term_counts(self, arrays, *, prefix_len: int, n_latent: int, parts=None) -> dict:
        return {**super().term_counts(arrays, prefix_len=prefix_len, n_latent=n_latent),
                "steps": step_count(arrays, n_latent)}

    def loss_terms(self, model, params, arrays, *, prefix_len: int, n_latent: int, dropout_key=None,
                   loss_chunk: int = 0, parts=None) -> dict:
        from coconut_jax import coconut
        hidden = coconut.latent_forward(model, params, arrays, prefix_len, n_latent, feedback=True,
                                        dropout_key=dropout_key)
        decoder, decoder_params = parts["decoder"]
        return {"lm": coconut.hidden_nll(model, params, hidden, arrays["labels"], loss_chunk),
                "steps": step_nll(model, params, decoder, decoder_params, hidden, arrays, prefix_len, n_latent,
                                  loss_chunk)}


METHOD = SimCoT(
    name="simcot",
    summary="Coconut + an auxiliary decoder that writes out each group of thoughts' replaced step (training only)",
    latent_tokens=True, feedback=True, needs_c_thought=True, loss=(("lm", 1.0), ("steps", 1.0)),
    parts=(Part("decoder"),), step_targets=True, step_decoding=DECODING)
