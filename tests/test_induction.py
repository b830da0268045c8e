"""The fact-lookup initialisation: it must already look facts up before any training."""
import numpy as np
import pytest

from coconut_jax import hf, tiny
from coconut_jax.demo import induction
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model


def _model(n_embd=64):
    cfg = GPT2Config(vocab_size=induction.LOOKUP_VOCAB, n_positions=128, n_embd=n_embd, n_layer=2, n_head=4)
    return cfg, GPT2Model(cfg)


def test_initial_model_already_looks_facts_up():
    cfg, model = _model()
    plain = model.init(0)
    wired = induction.wire_induction_heads(cfg, plain, seed=0)
    test = induction.fact_lookup_batch(np.random.default_rng(0), 200)
    # Chance is 1/12; measured at init: about 0.6 wired, 0.1 plain.
    assert induction.lookup_accuracy(model, wired, *test) > 0.4
    assert induction.lookup_accuracy(model, plain, *test) < 0.25


@pytest.mark.slow
def test_wired_model_learns_the_lookup_in_a_few_hundred_steps():
    """Training finishes the job (the initial keys cannot yet tell an object slot from others)."""
    cfg, model = _model()
    test = induction.fact_lookup_batch(np.random.default_rng(2), 200)
    scores = {}
    for name, params in (("wired", induction.wire_induction_heads(cfg, model.init(0), seed=0)), ("plain", model.init(0))):
        params, _ = induction.train_on_lookup(model, params, 200, np.random.default_rng(1))
        scores[name] = induction.lookup_accuracy(model, params, *test)
    assert scores["wired"] > 0.9, scores
    assert scores["plain"] < 0.5, scores


def test_wired_model_round_trips_through_hf(tmp_path):
    texts = ["Alex is a wumpus. Every wumpus is a yumpus. Is Alex a yumpus or zumpus?\n### Alex is a yumpus."] * 50
    out = tiny.build(texts, str(tmp_path / "m"), vocab_size=300, n_layer=2, n_embd=64, n_head=4,
                     n_positions=64, seed=3, wire=induction.wire_induction_heads)
    config, params = hf.load_pretrained(out)
    expect = induction.wire_induction_heads(config, GPT2Model(config).init(3), seed=3)
    np.testing.assert_allclose(np.asarray(params["h"]["1"]["c_attn"]["kernel"]),
                               expect["h"]["1"]["c_attn"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["wpe"]), expect["wpe"], atol=1e-6)


def test_rejects_a_shape_it_cannot_wire():
    cfg = GPT2Config(vocab_size=50, n_positions=64, n_embd=96, n_layer=2, n_head=8)
    with pytest.raises(ValueError, match="n_head=4"):
        induction.wire_induction_heads(cfg, GPT2Model(cfg).init(0))
