"""A method that exists only in the tests: Coconut plus a part of its own and a frozen parameter,
to exercise the seam's part and trainable machinery before a real method needs them.

`probe`: Coconut's loss ("lm", weight 1) plus "probe" (weight 0.5), the token loss of a second
copy of the pretrained model (the part, "probe", at its own vocabulary) reading the base's
embeddings of the same tokens (latent tokens, outside its vocabulary, read as id 0 and never
targets). The base's position embedding (`wpe`) does not train.
"""
import dataclasses

import jax.numpy as jnp

from coconut_jax import coconut, methods
from coconut_jax.labels import IGNORE
from coconut_jax.methods.base import Method, Part


def _targets(labels, vocab):
    """The probe's targets: the labels inside its vocabulary."""
    return jnp.where(labels < vocab, labels, IGNORE)


@dataclasses.dataclass(frozen=True)
class Probe(Method):
    def trains(self, path):
        return path[0] != "wpe"

    def term_counts(self, arrays, *, prefix_len, n_latent, parts=None):
        targets = _targets(arrays["labels"], parts["probe"].config.vocab_size)
        return {**super().term_counts(arrays, prefix_len=prefix_len, n_latent=n_latent),
                "probe": coconut.label_count(targets)}

    def loss_terms(self, model, params, arrays, *, prefix_len, n_latent, dropout_key=None, loss_chunk=0,
                   parts=None):
        terms = super().loss_terms(model, params, arrays, prefix_len=prefix_len, n_latent=n_latent,
                                   dropout_key=dropout_key, loss_chunk=loss_chunk, parts=parts)
        part, part_params = parts["probe"]
        vocab = part.config.vocab_size
        ids, labels = arrays["input_ids"], arrays["labels"]
        x = model.embed(params, jnp.where(ids < vocab, ids, 0))
        hidden, _ = part.body(part_params, x, arrays["position_ids"], arrays["attention_mask"])
        targets = _targets(labels, vocab)
        return {**terms, "probe": coconut.token_nll(part.logits(part_params, hidden), targets)}


PROBE = Probe(name="probe", summary="tests only: Coconut plus a probe part, wpe frozen",
              latent_tokens=True, feedback=True, needs_c_thought=True,
              loss=(("lm", 1.0), ("probe", 0.5)), parts=(Part("probe"),))


def register(monkeypatch=None) -> None:
    """Puts `probe` in the registry (for the test's duration, with `monkeypatch`)."""
    if monkeypatch is None:
        methods.REGISTRY["probe"] = PROBE
    else:
        monkeypatch.setitem(methods.REGISTRY, "probe", PROBE)
