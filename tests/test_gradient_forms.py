"""The gradients the step forms by hand equal `jax.grad` of the plain forms, for every family,
with LoRA, remat and either layer loop: the thought passes' kernel gradients formed once after
the scan (models/weight_product.py) and the chunked loss's, formed in its forward pass
(coconut.chunked_token_nll)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coconut_jax import coconut, data, models, tiny, trainable
from coconut_jax.models import lora as lora_lib

V, N_LAYER, THOUGHTS = 64, 2, 4  # 3 thought passes: a scan of length 3, the layers' of 2
START, END, LATENT = V - 3, V - 2, V - 1


def _batch():
    rng = np.random.default_rng(0)
    seqs = []
    for q_len in (5, 7, 6):
        head = rng.integers(1, V - 3, q_len).tolist() + [START] + [LATENT] * THOUGHTS + [END]
        tail = rng.integers(1, V - 3, 6).tolist()
        seqs.append((head + tail, [data.IGNORE] * len(head) + tail))
    b = data.collate(seqs, [0, 1, 2], latent_id=LATENT, pad_id=0, batch_size=3, multiple=8)
    return b, {k: jnp.asarray(v) for k, v in b.arrays().items()}


def _model(family, lora: bool, tied: bool = True, **kw):
    cfg = tiny.model_config(family, V, n_layer=N_LAYER, n_embd=32, n_head=4, n_positions=64, dropout=0.1, tied=tied)
    if not lora:
        return models.build(cfg, **kw)
    fam = models.family(family)
    adapters = lora_lib.Lora(4, 8.0, 0.1, lora_lib.resolve_targets(fam, ()), token_ids=(START, END, LATENT))
    return models.build(cfg, lora=adapters, **kw)


def _gradients(model, deferred: bool, loss_chunk: int = 0):
    b, arrays = _batch()
    params = jax.tree.map(jnp.asarray, model.init(0))
    trains = lora_lib.trains(model.lora) if model.lora else None
    trained, frozen = trainable.split(params, trains)
    if model.lora:  # adapters start at zero B: move them so every adapter gradient is non-zero
        trained = jax.tree.map(lambda x: x + 0.05, trained)

    def loss(t):
        p = trainable.merge(t, frozen)
        h = coconut.latent_forward(model, p, arrays, b.prefix_len, b.n_latent, dropout_key=jax.random.key(5),
                                   deferred=deferred)
        s, n = coconut.hidden_nll(model, p, h, arrays["labels"], loss_chunk)
        return s / n
    return jax.jit(jax.value_and_grad(loss))(trained), loss, trained


def _assert_equal(family, lora, tied=True, **kw):
    model = _model(family, lora, tied, fused_attention=True, **kw)
    (v1, g1), _, _ = _gradients(model, True)
    (v0, g0), _, _ = _gradients(model, False)
    _assert_trees_equal(v1, g1, v0, g0)


def _assert_trees_equal(v1, g1, v0, g0):
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    for path, a in jax.tree_util.tree_leaves_with_path(g1):
        b = g0
        for k in path:
            b = b[k.key]
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0, f"{path}: no gradient reached it"
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale, path


def test_gpt2_scanned_layers_match_the_plain_scan():
    _assert_equal("gpt2", False, scan_layers=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("lora,scan_layers,remat", [(False, True, "none"), (True, False, "full"),
                                                    (True, True, "dots"), (False, False, "none")])
def test_every_family_matches_the_plain_scan(family, lora, scan_layers, remat):
    _assert_equal(family, lora, scan_layers=scan_layers, remat=remat)


def _scans(jaxpr):
    """Every scan equation in a jaxpr and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _scans(inner)


@pytest.mark.parametrize("deferred", [True, False])
def test_no_kernel_gradient_is_carried_through_the_thought_scan(deferred):
    """The point of the product: the thought scan's backward holds no kernel-sized value per pass
    (the plain scan's does: its weight-gradient accumulators), whatever the layers' scan does."""
    model = _model("gpt2", False, scan_layers=True, fused_attention=True)
    _, loss, trained = _gradients(model, deferred)
    kernels = {tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(model.stack_layers(trained))
               if path[-1].key == "kernel"}
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trained).jaxpr
    carried = [tuple(v.aval.shape) for eqn in _scans(jaxpr) if eqn.params["length"] == THOUGHTS - 1
               for v in eqn.outvars[:eqn.params["num_carry"]]]
    assert carried, "no thought scan found"
    held = kernels & set(carried)
    assert (not held) if deferred else held


def test_evaluation_runs_the_plain_scan():
    """Without a gradient the scan is the plain one (no taps, nothing recorded)."""
    model = _model("gpt2", False, scan_layers=True, fused_attention=True)
    b, arrays = _batch()
    params = jax.tree.map(jnp.asarray, model.init(0))
    one = coconut.latent_forward(model, params, arrays, b.prefix_len, b.n_latent, deferred=True)
    other = coconut.latent_forward(model, params, arrays, b.prefix_len, b.n_latent, deferred=False)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(other))
    text = str(jax.make_jaxpr(lambda p: coconut.latent_forward(model, p, arrays, b.prefix_len, b.n_latent))(params))
    assert "custom_vjp" in text  # the scan is the custom-VJP one, whose primal is the plain scan



@pytest.mark.parametrize("family,tied,lora", [("gpt2", True, False),
                                              *[pytest.param(*case, marks=pytest.mark.slow) for case in
                                                [("llama", False, False), ("qwen3", True, True), ("llama", False, True)]]])
def test_the_chunked_loss_equals_the_whole_logits_loss(family, tied, lora):
    """Tied and untied heads, LoRA's trained token rows in the head; chunks of 5, the last one
    partial; every gradient, the body's included (through the hidden states)."""
    width = _batch()[0].input_ids.shape[1]
    assert width - 1 > 5 and (width - 1) % 5
    model = _model(family, lora, tied, scan_layers=True, fused_attention=True)
    (v1, g1), _, _ = _gradients(model, True, loss_chunk=5)
    (v0, g0), _, _ = _gradients(model, True, loss_chunk=0)
    _assert_trees_equal(v1, g1, v0, g0)
