"""The curriculum without thoughts: replaced steps are dropped, nothing stands in for them (the
reference's `no_thoughts`, c_thought forced to 0)."""
from coconut_jax.methods.base import Method

METHOD = Method(name="no_thoughts", summary="the curriculum drops steps; no thoughts replace them", thoughts=False)
