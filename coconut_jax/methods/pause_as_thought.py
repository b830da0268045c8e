"""Pause as thought: Coconut's sequences with the latent tokens as ordinary (pause) tokens, no
hidden state fed back (the reference's run with every method flag false)."""
from coconut_jax.methods.base import Method

METHOD = Method(name="pause_as_thought", summary="Coconut's sequences, latent tokens as plain pause tokens",
                latent_tokens=True)
