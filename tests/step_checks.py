"""A several-term step's gradient as the step computed it before one backward pass served all
terms: a backward pass per term, a gradient tree per term, each divided by its own count over
the step, weighted and added. Tests hold the one-backward step (`steps.train_step`'s
`term_scales` + `accumulate` + `mean_gradient`) against it."""
import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax import steps, trainable


def per_term_gradient(method, model, trained, micro_batches, *, frozen=None, part_models=()):
    """(gradient, {term: sum / count}) of `micro_batches` [(arrays, prefix_len, n_latent)]."""
    grads, sums, counts = {}, {}, {}
    for arrays, prefix_len, n_latent in micro_batches:
        def f(t):
            params, parts = trainable.unpack(t, frozen, bool(part_models))
            terms = method.loss_terms(model, params, arrays, prefix_len=prefix_len, n_latent=n_latent,
                                      parts={name: (m, parts[name]) for name, m in part_models})
            return {k: s for k, (s, _) in terms.items()}, {k: n for k, (_, n) in terms.items()}
        s, pull, n = jax.vjp(f, trained, has_aux=True)
        for term in s:
            one = {u: (jnp.ones_like if u == term else jnp.zeros_like)(v) for u, v in s.items()}
            g = pull(one)[0]
            grads[term] = g if term not in grads else jax.tree.map(jnp.add, grads[term], g)
            sums[term] = sums.get(term, 0.0) + s[term]
            counts[term] = counts.get(term, 0.0) + n[term]
    total = None
    for term, w in method.loss:
        count = jnp.maximum(counts[term], 1.0)
        g = jax.tree.map(lambda x: w * x / count, grads[term])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total, {t: sums[t] / jnp.maximum(counts[t], 1.0) for t in sums}


def one_backward_gradient(method, model, trained, micro_batches, *, frozen=None, part_models=()):
    """(gradient, losses) as `steps.train_step` computes them, before the optimizer."""
    scales = steps.term_scales(method, micro_batches, part_models)
    acc = steps.zero_accumulator(trained, [t for t, _ in method.loss])
    for arrays, prefix_len, n_latent in micro_batches:
        acc = steps.accumulate(model, trained, acc, arrays, None, scales, method=method, prefix_len=prefix_len,
                               n_latent=n_latent, frozen=frozen, part_models=part_models)
    return steps.mean_gradient(acc, method.loss)


def assert_same_gradient(method, model, trained, micro_batches, rtol=1e-6, **kw):
    """The one-backward step equals the per-term form: every gradient leaf within `rtol` of the
    largest entry of its tree, and each term's mean and the objective within `rtol`."""
    want, want_terms = per_term_gradient(method, model, trained, micro_batches, **kw)
    got, losses = one_backward_gradient(method, model, trained, micro_batches, **kw)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(want))
    assert scale > 0
    for path, a in jax.tree_util.tree_flatten_with_path(got)[0]:
        b = np.asarray(_at(want, path))
        assert np.abs(np.asarray(a) - b).max() <= rtol * scale, jax.tree_util.keystr(path)
    objective = sum(w * float(want_terms[t]) for t, w in method.loss)
    assert abs(float(losses["loss"]) - objective) <= rtol * abs(objective)
    for t, _ in method.loss:
        assert abs(float(losses[t]) - float(want_terms[t])) <= rtol * abs(float(want_terms[t])), t
    return want_terms


def _at(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", getattr(k, "idx", None))]
    return tree
