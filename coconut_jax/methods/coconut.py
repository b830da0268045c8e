"""Coconut (Hao et al. 2024): each replaced step becomes `c_thought` continuous thoughts."""
from coconut_jax.methods.base import Method

METHOD = Method(
    name="coconut",
    summary="continuous thoughts: a latent position's input is the last hidden state before it",
    latent_tokens=True, feedback=True, needs_c_thought=True)
