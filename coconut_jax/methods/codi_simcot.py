"""SIM-CoT's step decoder on CODI (SIM-CoT's repository, its `CODI/` folder; docs/simcot.md):
CODI with the step decoder attached. Each `<<...>>` step of the teacher's chain (the last step
already dropped, as CODI drops it) is written out by the decoder from one projected thought:
step t from z_{t+1}, for t = 0..num_latent (z_{K+1}, projected from the last thought pass, is
supervised though the student never reads it; steps beyond num_latent are joined into the last
group). The decoder's positions start at 0, its dropout is on in training, and the term is the
mean over the batch's non-empty groups of each group's token-mean loss (the reference's
choices, SPEC of the variant §1.3-1.4), added with weight 1:

    loss = CODI's three terms + steps

`--config.step_decoder.reference_lengths=True` reproduces the reference's batching quirk (the
batch's first row sets every group's length) for parity. `--config.step_decoder.lora_rank=R`
(ours; 0, the reference's full fine-tuning, by default) trains LoRA adapters of rank R on the
decoder instead of the whole of it (the run's `lora` alpha, dropout and targets). Generation is
CODI's; the decoder never leaves as the model.
"""
from __future__ import annotations

import dataclasses

from coconut_jax.methods.base import Part
from coconut_jax.methods.codi import METHOD as CODI
from coconut_jax.methods.step_decoder import StepDecoding

METHOD = dataclasses.replace(
    CODI, name="codi_simcot",
    summary="CODI + a training-only decoder that writes out each step of the teacher's chain from one thought",
    loss=CODI.loss + (("steps", 1.0),), parts=CODI.parts + (Part("decoder", lora_rank="step_decoder.lora_rank"),),
    settings=CODI.settings + (("step_decoder.reference_lengths", False), ("step_decoder.lora_rank", 0)),
    step_decoding=StepDecoding(first_position=0, reduce="groups", dropout=True))
