"""The run-directory rules: one run per directory, where a run's weights come from, the hand-off."""
import json
import os

import jax
import numpy as np
import pytest

from coconut_jax import checkpoint, config as config_lib, files, hf, latent_vocab, rundir, optimizer, sharding, steps, weights
from tests.conftest import config_and_params
from coconut_jax.models.gpt2 import GPT2Model


def _config(tmp_path, **kw):
    c = config_lib.base_config()
    c.name, c.save_path = "r", str(tmp_path)
    c.train_path, c.val_path = "data/t.json", "data/v.json"
    c.update(kw)
    return c


def test_claim_writes_the_run_record_and_accepts_the_same_run(tmp_path):
    run_dir = str(tmp_path / "r")
    rundir.claim(run_dir, _config(tmp_path), write=True)
    with open(os.path.join(run_dir, rundir.RUN_FILE)) as f:
        assert json.load(f)["method"] == "coconut"
    # What may change on a restart: lr, epochs, load_model_path, resume (its own checkpoints win).
    rundir.claim(run_dir, _config(tmp_path, lr=3e-4, num_epochs=7, load_model_path="x", resume=3), write=True)


@pytest.mark.parametrize("change,named", [
    (dict(method="no_cot"), "method: 'coconut' -> 'no_cot'"),
    (dict(c_thought=2), "c_thought: 1 -> 2"),
    (dict(train_path="data/other.json"), "train_path"),
    (dict(only_eval=True, load_model_path="x"), "only_eval: False -> True"),
])
def test_claim_refuses_another_run_naming_the_config_name(tmp_path, change, named):
    run_dir = str(tmp_path / "r")
    rundir.claim(run_dir, _config(tmp_path), write=True)
    with pytest.raises(rundir.RunDirError) as e:
        rundir.claim(run_dir, _config(tmp_path, **change), write=True)
    msg = str(e.value)
    assert named in msg and "--config.name (now 'r')" in msg and "\n" not in msg


def test_claim_refuses_outputs_without_a_run_record(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(rundir.RunDirError, match="without a run.json"):
        rundir.claim(str(run_dir), _config(tmp_path), write=True)


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "f.json")
    files.write_atomic(path, "one")
    files.write_atomic(path, "two")
    assert open(path).read() == "two" and os.listdir(tmp_path) == ["f.json"]


def test_async_save_names_the_best_step_only_once_it_is_written(tmp_path, tiny_dir):
    """best.json and the removal of superseded mid-epoch steps wait for the background write."""
    config, params = hf.load_pretrained(tiny_dir)
    state = steps.TrainState(GPT2Model(config), params, sharding.make_mesh(),
                             optimizer.make_optimizer(config_lib.base_config()))
    ck = checkpoint.Checkpoints(str(tmp_path / "checkpoints"))
    ck.save(3, state.checkpoint_tree(), {"step": 3}, end_of_epoch=False)
    ck.save(5, state.checkpoint_tree(), {"step": 5}, end_of_epoch=True, best_acc=0.5)
    ck.close()
    assert checkpoint.steps(ck.dir) == [5] and checkpoint.best_named(ck.dir) == 5
    assert checkpoint.read_meta(ck.dir, 5)["end_of_epoch"] is True


# -- weight sources -----------------------------------------------------------------------------

def _save(ckpt_dir, model, params, step, method, best=None):
    mesh = sharding.make_mesh()
    state = steps.TrainState(model, params, mesh, optimizer.make_optimizer(config_lib.base_config()))
    ck = checkpoint.Checkpoints(ckpt_dir)
    ck.save(step, state.checkpoint_tree(), {"step": step, "method": method, "end_of_epoch": True})
    if best is not None:
        ck.mark_best(best, 0.5)
    ck.close()


@pytest.fixture(scope="module")
def cot_checkpoints(tiny_dir, tmp_path_factory):
    """Two steps of a `cot` run of the tiny model (vocabulary without latent rows), step 2 the best."""
    config, params = hf.load_pretrained(tiny_dir)
    model = GPT2Model(config)
    d = str(tmp_path_factory.mktemp("cot") / "checkpoints")
    bumped = jax.tree.map(lambda x: x + 1.0, params)
    _save(d, model, params, 2, "cot")
    _save(d, model, bumped, 5, "cot", best=2)
    return d, params, bumped


def test_weight_source_kinds(tiny_dir, cot_checkpoints, tmp_path):
    d, _, _ = cot_checkpoints
    assert weights.source_of(None).kind == "model"
    assert weights.source_of(tiny_dir).kind == "hf"
    best = weights.source_of(d)
    assert (best.kind, best.step) == ("ours", 2) and "best.json" in best.describe()
    named = weights.source_of(os.path.join(d, "5"))
    assert (named.kind, named.step, named.path) == ("ours", 5, d)
    f = tmp_path / "checkpoint_3"
    f.write_bytes(b"x")
    assert weights.source_of(str(f)).kind == "reference"
    with pytest.raises(rundir.RunDirError, match="not a checkpoint of ours"):
        weights.source_of(str(tmp_path))


def test_latest_step_without_best_json(tiny_dir, tmp_path):
    config, params = hf.load_pretrained(tiny_dir)
    d = str(tmp_path / "checkpoints")
    _save(d, GPT2Model(config), params, 3, "cot")
    _save(d, GPT2Model(config), params, 7, "cot")
    src = weights.source_of(d)
    assert src.step == 7 and "latest" in src.describe()


def test_hand_off_loads_first_then_grows_the_vocabulary(tiny_dir, cot_checkpoints):
    """A CoT checkpoint into Coconut: its own weights, then three new rows copied from `<<`."""
    d, params, _ = cot_checkpoints
    tok = hf.load_tokenizer(tiny_dir)
    config, got = config_and_params(weights.load(weights.source_of(d), tiny_dir, "coconut", tok))
    n_old = params["wte"].shape[0]
    assert config.vocab_size == len(tok) == n_old + 3
    np.testing.assert_array_equal(got["wte"][:n_old], params["wte"])
    src = tok.convert_tokens_to_ids(latent_vocab.LATENT_INIT_TOKEN)
    for t in (latent_vocab.START_LATENT, latent_vocab.END_LATENT, latent_vocab.LATENT):
        np.testing.assert_array_equal(got["wte"][tok.convert_tokens_to_ids(t)], params["wte"][src])
    np.testing.assert_array_equal(got["h"]["0"]["c_fc"]["kernel"], params["h"]["0"]["c_fc"]["kernel"])
    # A method without latent tokens keeps the vocabulary as it was.
    config, got = config_and_params(weights.load(weights.source_of(d), tiny_dir, "no_cot", tok))
    assert config.vocab_size == n_old and got["wte"].shape[0] == n_old


def test_coconut_checkpoint_cannot_start_a_method_without_latent_tokens(tiny_dir, cot_checkpoints, tmp_path):
    d, _, _ = cot_checkpoints
    tok = hf.load_tokenizer(tiny_dir)
    config, params = config_and_params(weights.load(weights.source_of(d), tiny_dir, "coconut", tok))
    coconut_dir = str(tmp_path / "checkpoints")
    _save(coconut_dir, GPT2Model(config), params, 4, "coconut")
    with pytest.raises(rundir.RunDirError, match="a coconut checkpoint .* cannot be loaded into method 'cot'"):
        weights.load(weights.source_of(coconut_dir), tiny_dir, "cot", tok)
    # Between latent methods it is allowed, at the shapes stored.
    config, got = config_and_params(weights.load(weights.source_of(coconut_dir), tiny_dir, "pause_as_thought", tok))
    np.testing.assert_array_equal(got["wte"], params["wte"])


def test_checkpoint_of_another_model_is_one_line(tmp_path, cot_checkpoints):
    from coconut_jax import tiny
    from tests.conftest import SAMPLE_RECORDS
    other = tiny.build(tiny.record_texts(SAMPLE_RECORDS) * 20, str(tmp_path / "other"), vocab_size=400,
                       n_layer=1, n_embd=32, n_head=2, n_positions=128)
    d, _, _ = cot_checkpoints
    with pytest.raises(rundir.RunDirError) as e:
        weights.load(weights.source_of(d), other, "coconut", hf.load_tokenizer(other))
    assert "do not fit model_id" in str(e.value) and "\n" not in str(e.value)


def test_prepared_demo_data_is_rebuilt_when_its_settings_change(tmp_path):
    from coconut_jax.demo import prepare
    c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    c.save_path = str(tmp_path)
    c.prepare.train, c.prepare.valid = 8, 3
    prepare.prepare_synthetic(c)
    first = os.path.getmtime(c.model_id)
    assert c.model_id == str(tmp_path / "tiny" / "prepared" / "model")
    config_lib.validate(c)  # the paths prepare wrote are its own: a config used again still validates
    prepare.prepare_synthetic(c)  # same settings: reused
    assert os.path.getmtime(c.model_id) == first
    c.prepare.valid = 5
    prepare.prepare_synthetic(c)
    assert len(json.load(open(c.val_path))) == 5


@pytest.mark.parametrize("field", ["train_path", "val_path", "model_id"])
def test_a_config_that_prepares_its_data_refuses_a_users_data_or_model(tmp_path, field):
    """configs/tiny.py and configs/demo.py generate their data and model: a path the user sets
    would be ignored, so it is an error naming the field and the way out."""
    c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    mine = tmp_path / "my.json"
    mine.write_text("[]")
    c[field] = str(mine)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    assert str(e.value) == (f"config: {field}={str(mine)!r} is set, but prepare.kind='synthetic_prosqa' generates "
                            f"the data and model; add --config.prepare.kind= to use yours")


# -- the model of a run (export, generate, analysis) --------------------------------------------

def test_the_model_of_a_run_is_the_best_of_its_last_stage_not_of_every_stage(tmp_path):
    """A run whose CoT stage scored best: export/generate/analysis take the best step of the last
    stage reached (the earliest of equals); `best_any_stage` and a hand-off take best.json's."""
    from coconut_jax import trained
    c = _config(tmp_path, epochs_per_stage=2, max_latent_stage=3)
    ck = checkpoint.Checkpoints(str(tmp_path / "checkpoints"))
    tree = {"params": {"w": np.zeros(2, np.float32)}}
    # (step, epoch after it, batch in epoch, accuracy): epochs 1-2 are stage 0, 3-4 stage 1.
    for step, epoch, batch, acc in [(2, 1, 0, 0.9), (4, 2, 0, 0.8), (6, 3, 0, 0.6), (8, 4, 0, 0.6), (9, 4, 1, None)]:
        ck.save(step, tree, {"step": step, "epoch": epoch, "batch_in_epoch": batch, "eval_acc": acc},
                end_of_epoch=batch == 0, best_acc=0.9 if step == 2 else None)
        ck.wait()
        if step == 8:
            picked = trained.model_step(ck.dir, c)
            assert (picked.step, picked.why) == (6, "best by accuracy (0.6000) in the last stage reached")
            assert trained.describe_stage(dict(c, stage=1)) == "stage 1 (1 thought)"
    ck.close()
    # Step 9 is mid-epoch 5 (stage 2), which has no accuracy yet: the latest step.
    assert trained.model_step(ck.dir, c).step == 9
    assert trained.model_step(ck.dir, c, best_any_stage=True).step == 2
    assert weights.source_of(ck.dir).step == 2
    assert trained.pick_step(ck.dir, c, 4).step == 4
    with pytest.raises(trained.TrainedError, match="no step 5"):
        trained.pick_step(ck.dir, c, 5)
    with pytest.raises(trained.TrainedError, match="--step and --best-any-stage both choose the step"):
        trained.pick_step(ck.dir, c, 4, best_any_stage=True)
