"""No chain of thought: question -> answer, every step left out."""
from coconut_jax.methods.base import Method

METHOD = Method(name="no_cot", summary="question to answer, no steps", staged=False, drops_every_step=True)
