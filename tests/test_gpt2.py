"""Flax GPT-2 against transformers' PyTorch GPT2LMHeadModel (the reference)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from coconut_jax import hf, latent_vocab, weights
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model, get_path
from tests.model_checks import assert_incremental_equals_full, hidden, padded_batch

CFG = GPT2Config(vocab_size=97, n_positions=48, n_embd=64, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our params and the same weights in a transformers model (through a real export/load)."""
    model = GPT2Model(CFG)
    params = jax.tree.map(np.asarray, model.init(3))
    # Non-trivial layer-norm and bias values so that a transposed or swapped tensor shows.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
    d = hf.export_hf(CFG, params, str(tmp_path_factory.mktemp("m") / "gpt2"))
    ref = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval()
    return model, params, ref, d


def _batch():
    return padded_batch(3)


_ours = hidden


def test_logits_and_hidden_match_transformers(pair):
    model, params, ref, _ = pair
    ids, mask, pos = _batch()
    hidden = _ours(model, params, ids, mask, pos)
    logits = model.logits(params, hidden)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos), output_hidden_states=True)
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - out.logits.numpy()[real]).max() <= 1e-5
    assert np.abs(np.asarray(hidden)[real] - out.hidden_states[-1].numpy()[real]).max() <= 1e-5


def test_loss_gradients_match_transformers(pair):
    model, params, ref, _ = pair
    ids, mask, pos = _batch()
    labels = np.where(mask == 1, ids, -100)
    # A left pad predicting the first real token would make the loss depend on a fully
    # masked attention row, which implementations fill differently; Coconut never labels
    # it (questions are unlabelled), so neither does this test.
    labels[:, :2] = labels[1, 3] = -100

    def loss_fn(p):
        logits = model.logits(p, _ours(model, p, ids, mask, pos))[:, :-1]
        tgt = labels[:, 1:]
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, np.maximum(tgt, 0)[..., None], -1)[..., 0]
        return jnp.sum(nll * (tgt >= 0)) / jnp.sum(tgt >= 0)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    ref.zero_grad()
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
              labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    ref_grads = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    assert "lm_head.weight" not in ref_grads or ref.lm_head.weight is ref.transformer.wte.weight
    for t in hf.naming(CFG).tensors:
        ours = np.asarray(get_path(grads, t.path))
        theirs = ref_grads[f"transformer.{t.name}"]
        rel = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12)
        assert rel <= 1e-4, (t.name, rel)


def test_incremental_passes_against_past_keys_equal_full(pair):
    model, params, _, _ = pair
    assert_incremental_equals_full(model, params, *_batch())


def test_bf16_compute_is_close_and_keeps_f32_params(pair):
    model, params, _, _ = pair
    ids, mask, pos = _batch()
    f32 = np.asarray(model.logits(params, _ours(model, params, ids, mask, pos)))
    bf = model.with_dtype(jnp.bfloat16)
    hidden = _ours(bf, params, ids, mask, pos)
    assert hidden.dtype == jnp.bfloat16
    logits = np.asarray(bf.logits(params, hidden))
    real = mask.astype(bool)
    assert np.abs(logits[real] - f32[real]).max() < 0.1
    assert np.argmax(logits[real], -1).tolist() == np.argmax(f32[real], -1).tolist()


def test_dropout_only_with_a_key():
    """Evaluation (no key) is the no-dropout form: it equals the same weights in a model whose
    dropout rates are 0, run with a key; a training forward (a key) differs from both."""
    import dataclasses
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = GPT2Model(cfg)
    no_dropout = GPT2Model(dataclasses.replace(cfg, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
    params = model.init(0)
    ids, mask, pos = np.arange(8)[None], np.ones((1, 8)), np.arange(8)[None]
    emb = model.embed(params, ids)
    evaluation = np.asarray(model.body(params, emb, pos, mask)[0])
    plain = np.asarray(no_dropout.body(params, emb, pos, mask, dropout_key=jax.random.key(0))[0])
    training = np.asarray(model.body(params, emb, pos, mask, dropout_key=jax.random.key(0))[0])
    np.testing.assert_allclose(evaluation, plain, atol=1e-6, rtol=0)
    assert np.abs(training - evaluation).max() > 1e-2


def test_export_round_trip(pair, tmp_path):
    model, params, ref, d = pair
    config, loaded = hf.load_pretrained(d)
    assert config == CFG
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    d2 = hf.export_hf(config, loaded, str(tmp_path / "again"))
    ref2 = transformers.GPT2LMHeadModel.from_pretrained(d2).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        np.testing.assert_allclose(ref2(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-6)
    ours = model.logits(loaded, _ours(model, loaded, ids.numpy(), np.ones((1, 4)), np.arange(4)[None]))
    assert np.abs(np.asarray(ours) - ref2(ids).logits.detach().numpy()).max() <= 1e-5


def test_export_refuses_to_overwrite(pair):
    _, params, _, d = pair
    with pytest.raises(FileExistsError, match="already exists"):
        hf.export_hf(CFG, params, d)


@pytest.mark.parametrize("prefix", ["", "base_causallm."])
def test_reference_checkpoint_import(pair, tmp_path, prefix):
    model, _, ref, _ = pair
    path = str(tmp_path / "checkpoint_3")
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, path)
    params, _, method = weights.import_reference_state_dict(weights.read_state_dict(path), CFG, path)
    assert method == ("coconut" if prefix else None)
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ours = model.logits(params, _ours(model, params, ids, np.ones((1, 8)), np.arange(8)[None]))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-5


def test_pytorch_bin_directory_is_read_through_torch(pair, tmp_path):
    _, params, ref, d = pair
    import shutil
    shutil.copy(f"{d}/config.json", tmp_path / "config.json")
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    _, loaded = hf.load_pretrained(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0), loaded, params)


def test_latent_tokens_ids_and_rows(tiny_dir):
    tok = hf.load_tokenizer(tiny_dir)
    config, params = hf.load_pretrained(tiny_dir)
    ids = latent_vocab.latent_tokens(tok)
    base = config.vocab_size
    assert (ids.start, ids.end, ids.latent) == (base, base + 1, base + 2)
    assert tok.pad_token_id == tok.eos_token_id == ids.pad
    config2, params2 = latent_vocab.add_latent_rows(config, params, tok)
    assert config2.vocab_size == len(tok) == base + 3
    src = tok.convert_tokens_to_ids("<<")
    for i in (ids.start, ids.end, ids.latent):
        np.testing.assert_array_equal(params2["wte"][i], params["wte"][src])
    np.testing.assert_array_equal(params2["wte"][:base], params["wte"])
    # A model that already has the latent tokens (an exported Coconut model) is used as it is.
    assert latent_vocab.add_latent_rows(config2, params2, tok)[1] is params2


def _without_tokenizer_class(src, dst):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    cfg = json.load(open(path))
    del cfg["tokenizer_class"]  # as the hub's GPT-2: the class comes from config.json's model_type
    json.dump(cfg, open(path, "w"))
    return str(dst)


def test_tokenizer_is_autotokenizers_choice_without_importing_torch(tiny_dir, tmp_path):
    from transformers import AutoTokenizer
    text = "Every wumpus is a yumpus.\nTom is a wumpus. ### Tom is a yumpus."
    for d in (tiny_dir, _without_tokenizer_class(tiny_dir, tmp_path / "no_class")):
        ours, auto = hf.load_tokenizer(d), AutoTokenizer.from_pretrained(d)
        assert type(ours) is type(auto)
        assert ours(text)["input_ids"] == auto(text)["input_ids"] and ours.eos_token_id == auto.eos_token_id
    # AutoTokenizer's module imports torch (a second of every start); loading ours does not.
    code = f"import sys; from coconut_jax import hf; hf.load_tokenizer({str(tiny_dir)!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


def test_exported_coconut_model_keeps_its_latent_tokens(tiny_dir, tmp_path):
    tok = hf.load_tokenizer(tiny_dir)
    config, params = latent_vocab.add_latent_rows(*hf.load_pretrained(tiny_dir), tok)
    params["wte"][latent_vocab.latent_tokens(tok).latent] += 1.0
    d = hf.export_hf(config, params, str(tmp_path / "coconut"), tokenizer=tok)
    tok2 = hf.load_tokenizer(d)
    assert len(tok2) == len(tok) and latent_vocab.latent_tokens(tok2) == latent_vocab.latent_tokens(tok)
    config2, params2 = latent_vocab.add_latent_rows(*hf.load_pretrained(d), tok2)
    np.testing.assert_array_equal(params2["wte"], params["wte"])


# -- bad input -----------------------------------------------------------------------------

def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(hf.CheckpointError, match="model directory not found"):
        hf.load_pretrained(str(tmp_path / "nope"))


def test_directory_without_weights(tmp_path, pair):
    import shutil
    shutil.copy(f"{pair[3]}/config.json", tmp_path / "config.json")
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        hf.load_pretrained(str(tmp_path))


def _state_dict(pair):
    return {k: v.numpy().copy() for k, v in pair[2].state_dict().items()}


def test_missing_tensor(pair):
    sd = _state_dict(pair)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(hf.CheckpointError, match=r"src: missing tensor\(s\): h.1.mlp.c_fc.bias"):
        hf.state_dict_to_params(sd, CFG, "src")


def test_unexpected_tensor(pair):
    sd = _state_dict(pair)
    sd["transformer.h.0.adapter.weight"] = np.zeros(3, np.float32)
    with pytest.raises(hf.CheckpointError, match=r"unexpected tensor\(s\).*h.0.adapter.weight"):
        hf.state_dict_to_params(sd, CFG, "src")


def test_shape_mismatch(pair):
    sd = _state_dict(pair)
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:10]
    with pytest.raises(hf.CheckpointError, match=r"tensor wpe.weight has shape \(10, 64\), expected \(48, 64\)"):
        hf.state_dict_to_params(sd, CFG, "src")
