"""Chain-of-thought training: every step written, at stage 0 throughout."""
from coconut_jax.methods.base import Method

METHOD = Method(name="cot", summary="written chain of thought (stage 0 throughout)", staged=False)
