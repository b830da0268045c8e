"""The optimizer the recipes use (coconut_jax/optimizer.py): the reference's AdamW by default,
Hugging Face's warm-up, cosine schedule, clipping and decay split when asked, checked against
PyTorch's own; a reset keeps the schedule's position; a run killed mid-epoch resumes exactly."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coconut_jax import config as config_lib, optimizer, sharding, steps
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model
from tests.conftest import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RECIPE = dict(lr=3e-3, weight_decay=0.1, lr_schedule="cosine", warmup_ratio=0.03, max_grad_norm=2.0,
              decay_norms_and_biases=False)


def _config(**kw):
    c = config_lib.base_config()
    c.update(kw)
    return c


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {"h": {"0": {"c_fc": {"kernel": rng.normal(size=(6, 8)).astype(np.float32),
                                 "bias": rng.normal(size=(8,)).astype(np.float32)},
                        "ln_1": {"scale": rng.normal(size=(6,)).astype(np.float32)}}},
            "wte": rng.normal(size=(10, 6)).astype(np.float32)}


def test_the_defaults_are_exactly_the_reference_adamw():
    """Every earlier figure and checkpoint stays: with the defaults, the same state (structure and
    values: a checkpoint's layout) and bit-identical updates as optax.adamw(lr, weight_decay)."""
    c = _config()
    ours, ref = optimizer.make_optimizer(c, 100), optax.adamw(c.lr, weight_decay=c.weight_decay)
    params = jax.tree.map(jnp.asarray, _tree(0))
    s1, s2 = ours.init(params), ref.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for k in range(3):
        g = jax.tree.map(jnp.asarray, _tree(10 + k))
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_the_schedule_is_hugging_faces(kind):
    total, ratio = 50, 0.1
    c = _config(lr=3e-3, lr_schedule=kind, warmup_ratio=ratio)
    rate = optimizer.lr_schedule(c, total)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    make = (transformers.get_cosine_schedule_with_warmup if kind == "cosine"
            else transformers.get_constant_schedule_with_warmup)
    kw = {"num_training_steps": total} if kind == "cosine" else {}
    sched = make(opt, num_warmup_steps=math.ceil(total * ratio), **kw)
    for step in range(total):
        np.testing.assert_allclose(float(rate(step)), sched.get_last_lr()[0], rtol=1e-5, atol=1e-6 * c.lr)  # f32
        opt.step()
        sched.step()
    assert float(rate(0)) == 0.0 and float(rate(5)) == pytest.approx(3e-3)


def test_recipe_steps_equal_torch_adamw_with_clipping_schedule_and_decay_groups():
    """CODI's optimizer (cosine, warm-up, clipping at 2.0, no decay on biases and norm scales)
    against torch: AdamW with the Trainer's two parameter groups, clip_grad_norm_, the scheduler."""
    c, total = _config(**RECIPE), 40
    tx = optimizer.make_optimizer(c, total)
    params = jax.tree.map(jnp.asarray, _tree(0))
    state = tx.init(params)
    names = ["h/0/c_fc/kernel", "h/0/c_fc/bias", "h/0/ln_1/scale", "wte"]

    def get(tree, name):
        for k in name.split("/"):
            tree = tree[k]
        return tree
    tparams = {n: torch.nn.Parameter(torch.tensor(np.asarray(get(params, n)))) for n in names}
    decayed = [tparams[n] for n in names if n.split("/")[-1] not in ("bias", "scale")]
    plain = [tparams[n] for n in names if n.split("/")[-1] in ("bias", "scale")]
    topt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_cosine_schedule_with_warmup(topt, math.ceil(total * 0.03), total)
    clipped = 0
    for k in range(6):
        grads = jax.tree.map(lambda x: 3.0 * jnp.asarray(x), _tree(20 + k))  # norms above 2: clipping acts
        clipped += float(optax.tree.norm(grads)) > 2.0
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for n in names:
            tparams[n].grad = torch.tensor(np.asarray(get(grads, n)))
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 2.0)
        topt.step()
        sched.step()
        for n in names:
            np.testing.assert_allclose(np.asarray(get(params, n)), tparams[n].detach().numpy(), rtol=2e-5,
                                       atol=1e-6, err_msg=f"{n} after step {k + 1}")
    assert clipped == 6


def test_decay_mask_skips_biases_and_norm_scales_of_every_family():
    from coconut_jax import models, trainable
    from coconut_jax.models import llama
    for model in (GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)),
                  models.build(llama.tiny_config("qwen3", 64, n_layer=1, n_embd=32, n_head=2, n_positions=16))):
        mask = optimizer.decay_mask(model.param_shapes())
        flat = {"/".join(trainable.names(p)): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
        assert {k for k, m in flat.items() if not m} == {k for k in flat if k.endswith(("/bias", "/scale"))}
        assert flat["wte"] and any(m for k, m in flat.items() if k.endswith("kernel"))


def test_a_reset_renews_the_moments_but_keeps_the_schedule_position():
    c = _config(**RECIPE)
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    state = steps.TrainState(model, model.init(0), sharding.make_mesh(), optimizer.make_optimizer(c, 100))
    for _ in range(3):
        acc = state.take_accumulator()
        acc["grads"] = jax.tree.map(jnp.ones_like, acc["grads"])
        acc["counts"]["lm"] = jnp.float32(1.0)
        state.keep_accumulator(state.update(acc)[1])
    def of(kind, s):
        return [x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)]
    assert [int(s.count) for s in of(optax.ScaleByScheduleState, state.opt_state)] == [3]
    state.reset_optimizer()
    assert [int(s.count) for s in of(optax.ScaleByScheduleState, state.opt_state)] == [3]
    # Adam's own count (its bias correction) restarts with the moments, as the reference's reset.
    assert [int(s.count) for s in of(optax.ScaleByAdamState, state.opt_state)] == [0]
    mu = [x.mu for x in of(optax.ScaleByAdamState, state.opt_state)]
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(mu))


def test_the_settings_are_checked():
    for kw, words in [(dict(lr_schedule="linear"), "lr_schedule='linear' must be one of constant, cosine"),
                      (dict(warmup_ratio=1.5), "warmup_ratio=1.5 must be in [0, 1)"),
                      (dict(max_grad_norm=-1.0), "max_grad_norm=-1.0 must be >= 0")]:
        c = _config(train_path=__file__, val_path=__file__, **kw)
        with pytest.raises(config_lib.ConfigError, match=re.escape(words)):
            config_lib.validate(c)


@pytest.mark.slow
def test_a_recipe_run_killed_mid_epoch_resumes_exactly(tmp_path):
    """configs/tiny.py with the recipe's optimizer: SIGKILL after a mid-epoch checkpoint, the
    same command again: the metrics and final params of the uninterrupted run (the schedule's
    position restored with the optimizer state)."""
    from tests.test_journeys import assert_same_run, kill_at_checkpoint
    args = ("--config.lr_schedule=cosine", "--config.warmup_ratio=0.2", "--config.max_grad_norm=0.5",
            "--config.decay_norms_and_biases=False", "--config.reset_optimizer=False",
            "--config.checkpoint_every_steps=2")
    run_cli(tmp_path / "whole", *args)
    proc = run_cli(tmp_path / "killed", *args, popen=True)
    kill_at_checkpoint(proc, tmp_path / "killed" / "tiny", 6, "a mid-epoch checkpoint of the second epoch")
    r = run_cli(tmp_path / "killed", *args)
    assert "resumed from" in r.stdout
    assert_same_run(tmp_path / "whole" / "tiny", tmp_path / "killed" / "tiny")
