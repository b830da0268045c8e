"""Llama 3.x / Qwen2 / Qwen3 against transformers' PyTorch models (the reference), and the
Coconut computations on them."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from coconut_jax import coconut, data, hf, latent_vocab, methods, models, testing, tiny, weights
from coconut_jax.models.common import EMBEDDING, HEAD, get_path
from coconut_jax.models.llama import LlamaConfig
from tests.model_checks import assert_incremental_equals_full, hidden, padded_batch

LLAMA3_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
               ("original_max_position_embeddings", 16))
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6)
# Several kv-head counts (GQA, MHA, MQA), tied and untied heads, llama3 RoPE scaling, Qwen2's
# q/k/v biases, Qwen3's q/k norms with a head width other than hidden/heads.
VARIANTS = {
    "llama_gqa_untied_llama3rope": LlamaConfig(**BASE, model_type="llama", num_key_value_heads=2, rope_theta=500000.0,
                                               rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False),
    "llama_mha_tied_bias": LlamaConfig(**BASE, model_type="llama", num_key_value_heads=4, rope_theta=10000.0,
                                       rope_scaling=(), tie_word_embeddings=True, attention_bias=True),
    "qwen2_mqa_tied": LlamaConfig(**BASE, model_type="qwen2", num_key_value_heads=1, rope_theta=1000000.0,
                                  rope_scaling=(), tie_word_embeddings=True),
    "qwen3_gqa_untied": LlamaConfig(**{**BASE, "head_dim": 24}, model_type="qwen3", num_key_value_heads=2,
                                    rope_theta=1000000.0, rope_scaling=(), tie_word_embeddings=False),
}


def _perturbed(ref, seed):
    """Non-trivial norm scales and biases, so that a swapped or transposed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return ref


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """A transformers model of the variant (its own random init), saved by transformers, and
    what our loader reads from that directory."""
    cfg = VARIANTS[request.param]
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    ref = _perturbed(transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager"), 1).eval()
    d = str(tmp_path_factory.mktemp("m") / request.param)
    ref.save_pretrained(d)
    config, params = hf.load_pretrained(d)
    assert config == cfg
    return models.build(config), params, ref, d


def _batch():
    return padded_batch(30)  # past llama3 scaling's original context of 16


_ours = hidden


def _theirs(ref, ids, mask, pos, **kw):
    return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos), **kw)


def test_logits_and_hidden_match_transformers(pair):
    model, params, ref, _ = pair
    ids, mask, pos = _batch()
    hidden = _ours(model, params, ids, mask, pos)
    with torch.no_grad():
        out = _theirs(ref, ids, mask, pos)
        last = ref.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(pos)).last_hidden_state
    real = mask.astype(bool)
    assert np.abs(np.asarray(model.logits(params, hidden))[real] - out.logits.numpy()[real]).max() <= 1e-5
    assert np.abs(np.asarray(hidden)[real] - last.numpy()[real]).max() <= 1e-5


def test_loss_gradients_match_transformers(pair):
    model, params, ref, _ = pair
    ids, mask, pos = _batch()
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = labels[1, 3] = -100  # never a label predicted from a fully masked row (see test_gpt2)

    def loss_fn(p):
        s, n = coconut.token_nll(model.logits(p, _ours(model, p, ids, mask, pos)), labels)
        return s / n

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    ref.zero_grad()
    out = _theirs(ref, ids, mask, pos, labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    theirs = {n: p.grad.numpy() for n, p in ref.named_parameters()}
    names = hf.naming(model.config)
    pairs = [(names.prefix + t.name, t.to_hf(get_path(grads, t.path))) for t in names.tensors]
    if "lm_head" in grads:
        pairs.append(("lm_head.weight", np.asarray(grads["lm_head"])))
    assert len(pairs) == len(theirs)
    for name, ours in pairs:
        rel = np.abs(ours - theirs[name]).max() / max(np.abs(theirs[name]).max(), 1e-12)
        assert rel <= 1e-4, (name, rel)


def test_incremental_passes_against_past_keys_equal_full(pair):
    model, params, _, _ = pair
    kv = assert_incremental_equals_full(model, params, *_batch())
    assert kv["k"].shape[2] == model.config.num_key_value_heads  # the cache holds kv heads only


@pytest.fixture(scope="module", params=["llama_gqa_untied_llama3rope", "qwen3_gqa_untied"])
def coconut_pair(request):
    """Two variants for the Coconut computations (the model-level checks above cover all four;
    these add only how the latent passes and decoding use the model)."""
    cfg = VARIANTS[request.param]
    model = models.build(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32),
                          jax.tree.map(np.asarray, model.init(2)))
    return model, params


def test_layer_forms_agree(coconut_pair):
    """Scanned, rematerialised and fused-attention (grouped heads) forms compute the same function."""
    model, params = coconut_pair
    ids, mask, pos = _batch()
    base = np.asarray(_ours(model.replace(fused_attention=False), params, ids, mask, pos))
    real = mask.astype(bool)
    for kw in (dict(scan_layers=True), dict(remat="full"), dict(fused_attention=True, scan_layers=True)):
        other = np.asarray(_ours(model.replace(**kw), params, ids, mask, pos))
        assert np.abs(other[real] - base[real]).max() <= 1e-5, kw


S, E, L, PAD = 90, 91, 92, 0


def _coconut_batch():
    def seq(q, n_lat, tail):
        ids = list(range(1, q + 1)) + [S] + [L] * n_lat + [E] + list(range(20, 20 + tail))
        return ids, [data.IGNORE] * (q + n_lat + 2) + ids[q + n_lat + 2:]
    seqs = [seq(5, 4, 6), seq(9, 2, 3), seq(3, 0, 8)]
    return data.collate(seqs, [0, 1, 2], latent_id=L, pad_id=PAD, batch_size=3, multiple=8)


def test_fast_latent_forward_equals_slow_reference(coconut_pair):
    model, params = coconut_pair
    b = _coconut_batch()
    arrays = b.arrays()
    fast = jax.jit(lambda p: coconut.latent_forward(model, p, arrays, b.prefix_len, b.n_latent))(params)
    slow = jax.jit(lambda p: testing.reference_hidden(model, p, arrays))(params)
    real = b.attention_mask.astype(bool)
    assert np.abs(np.asarray(fast)[real] - np.asarray(slow)[real]).max() <= 1e-5


def test_batched_generation_equals_one_at_a_time(coconut_pair):
    model, params = coconut_pair
    eos = 3
    prompts = [[1, 2, 4, S, L, L, E], [7, 8, 9, 10, 11, 12, S, L, L, E], [13, 14, S, L, L, E]]

    def run(rows):
        b = data.collate([(p, None) for p in rows], list(range(len(rows))), latent_id=L, pad_id=PAD,
                         batch_size=len(rows), multiple=4)
        tokens, kept = coconut.generate(model, params, b.arrays(), eos, prefix_len=b.prefix_len, n_latent=b.n_latent,
                                        max_new_tokens=6)
        return [list(np.asarray(tokens)[i, :int(kept[i])]) for i in range(len(rows))]
    assert run(prompts) == [run([p])[0] for p in prompts]


def test_export_round_trip(pair, tmp_path):
    model, params, ref, _ = pair
    d = hf.export_hf(model.config, params, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids, mask, pos = _batch()
    with torch.no_grad():
        a, b = _theirs(back, ids, mask, pos).logits.numpy(), _theirs(ref, ids, mask, pos).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() <= 1e-5
    config, again = hf.load_pretrained(d)
    assert config == model.config
    assert jax.tree.all(jax.tree.map(np.array_equal, again, jax.tree.map(np.asarray, params)))


@pytest.mark.parametrize("prefix", ["", "base_causallm."])
def test_reference_checkpoint_import(pair, tmp_path, prefix):
    model, params, ref, _ = pair
    path = tmp_path / "checkpoint_3"
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, path)
    got, _, method = weights.import_reference_state_dict(weights.read_state_dict(str(path)), model.config, str(path))
    assert method == ("coconut" if prefix else None)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, jax.tree.map(np.asarray, params)))


def test_bf16_safetensors_load(pair, tmp_path):
    """Hub Llama/Qwen weights are bf16 (which the safetensors NumPy reader refuses)."""
    model, params, ref, _ = pair
    d = str(tmp_path / "bf16")
    ref.to(torch.bfloat16).save_pretrained(d)
    ref.to(torch.float32)
    _, got = hf.load_pretrained(d)
    expected = jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)), params)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, expected))


# -- configs ------------------------------------------------------------------------------------

def _hub_like(**changes):
    d = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
         "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
         "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "hidden_act": "silu"}
    d.update(changes)
    return d


def test_hub_llama_32_config_is_the_default_shape():
    assert models.config_from_hf(_hub_like()) == LlamaConfig()


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(model_type="qwen2", use_sliding_window=True), "sliding-window"),
    (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(num_key_value_heads=5), "not a multiple of num_key_value_heads=5"),
])
def test_unsupported_settings_are_one_line_errors(tmp_path, changes, message):
    (tmp_path / "config.json").write_text(json.dumps(_hub_like(**changes)))
    with pytest.raises(hf.CheckpointError, match=message) as e:
        hf.load_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_inverse_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from coconut_jax.models.llama import inverse_frequencies
    cfg = LlamaConfig()
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    theirs, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    assert scaling == 1.0
    np.testing.assert_allclose(inverse_frequencies(cfg), theirs.numpy(), rtol=1e-6)


# -- tokenizers and latent rows -------------------------------------------------------------------

RECORDS = [{"question": "Tom has 3 apples and buys 12 more. How many?", "steps": ["<<3+12=15>>", "He has 15."],
            "answer": "15"},
           {"question": "Every wumpus is a yumpus. Is Alex a yumpus?", "steps": ["Alex is a wumpus."],
            "answer": "Alex is a yumpus."},
           {"question": "Count them", "steps": ["", "Done"], "answer": "0"}]  # "\n\n": a merge across the split


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_dir(request, tmp_path_factory):
    texts = tiny.record_texts(RECORDS) * 30
    return request.param, tiny.build(texts, str(tmp_path_factory.mktemp("tok") / request.param), vocab_size=400,
                                     n_layer=1, n_embd=32, n_head=4, n_positions=64, family=request.param)


def test_family_tokenizer_is_autotokenizers_choice(family_dir):
    family, d = family_dir
    tok = hf.load_tokenizer(d)
    auto = transformers.AutoTokenizer.from_pretrained(d)
    assert type(tok) is type(auto)
    text = RECORDS[0]["question"] + "\n"
    assert tok(text)["input_ids"] == auto(text)["input_ids"]
    assert tok.pad_token == tok.eos_token == auto.eos_token
    ids = tok(text)["input_ids"]
    if family == "llama":
        assert ids[0] == tok.bos_token_id  # the question starts with BOS, as the reference tokenizes it
    else:
        assert tok.bos_token_id not in ids


def test_family_tokenization_keeps_the_spec_invariant(family_dir):
    family, d = family_dir
    tok = hf.load_tokenizer(d)
    ts = data.tokenize_records(RECORDS, tok, "records.json")
    ex = ts[0]
    whole = tok(RECORDS[0]["question"] + "\n" + "\n".join(RECORDS[0]["steps"]) + "\n### " + RECORDS[0]["answer"])
    assert list(ex.question) + [t for s in ex.steps for t in s] + list(ex.answer) == whole["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("record,splits", [({"question": "Go", "steps": ["", "ok"], "answer": "done"}, False),
                                           ({"question": "How many?", "steps": ["!!12"], "answer": "12"}, True)])
def test_spec_check_fails_exactly_when_the_pieces_differ_from_the_whole(family_dir, record, splits):
    """Where the tokenizer merges across Coconut's split points (here the learnt "\n\n" of
    an empty step), loading says so in one line (SPEC §1 check) instead of training on
    other ids; elsewhere it loads."""
    _, d = family_dir
    tok = hf.load_tokenizer(d)
    pieces = (tok(record["question"] + "\n")["input_ids"]
              + [t for s in record["steps"] for t in tok(s + "\n", add_special_tokens=False)["input_ids"]]
              + tok("### " + record["answer"], add_special_tokens=False)["input_ids"])
    whole = tok(record["question"] + "\n" + "\n".join(record["steps"]) + "\n### " + record["answer"])["input_ids"]
    assert (pieces == whole) == splits
    if splits:
        assert data.tokenize_records([record], tok, "odd.json")[0].answer[-1] == tok.eos_token_id
    else:
        with pytest.raises(data.DataError, match=r"odd.json: record 0") as e:
            data.tokenize_records([record], tok, "odd.json")
        assert "\n" not in str(e.value)


def test_latent_rows_copy_the_row_of_double_angle_in_embedding_and_head(family_dir):
    family, d = family_dir
    tok = hf.load_tokenizer(d)
    config, params = hf.load_pretrained(d)
    untied = dataclasses.replace(config, tie_word_embeddings=False)
    params = {**params, "lm_head": np.asarray(params["wte"]) * -1.0}
    grown_config, grown = latent_vocab.add_latent_rows(untied, params, tok)
    ids = latent_vocab.latent_tokens(tok)
    src = tok.convert_tokens_to_ids("<<")
    assert grown_config.vocab_size == len(tok) == grown["wte"].shape[0] == grown["lm_head"].shape[0]
    for name in ("wte", "lm_head"):
        for i in (ids.start, ids.end, ids.latent):
            np.testing.assert_array_equal(grown[name][i], np.asarray(params[name])[src])
    again_config, again = latent_vocab.add_latent_rows(grown_config, grown, tok)
    assert again is grown  # a checkpoint with its latent rows is left alone


def test_spare_embedding_rows_are_cut_to_the_tokenizer_as_the_reference_resizes(family_dir):
    """Qwen checkpoints carry more embedding rows than tokens; the reference's
    resize_token_embeddings(len(tokenizer)) cuts them, and the latent rows come from `<<`."""
    _, d = family_dir
    tok = hf.load_tokenizer(d)
    config, params = hf.load_pretrained(d)
    spare = np.concatenate([np.asarray(params["wte"]), np.ones((40, config.hidden_size), np.float32)])
    config = dataclasses.replace(config, vocab_size=len(spare))
    got_config, got = latent_vocab.add_latent_rows(config, {**params, "wte": spare}, tok)
    assert got["wte"].shape[0] == len(tok) == got_config.vocab_size
    np.testing.assert_array_equal(got["wte"][latent_vocab.latent_tokens(tok).latent], spare[tok.convert_tokens_to_ids("<<")])


def test_without_a_single_double_angle_token_the_latent_rows_are_the_mean_of_its_pieces():
    """A tokenizer that splits `<<` into two tokens (2 and 5): the three latent rows of the
    embedding and of an untied head are the mean of rows 2 and 5, the other new rows the mean row."""
    specials = {"<|start-latent|>": 8, "<|end-latent|>": 9, "<|latent|>": 10}

    class Tok:
        unk_token_id, eos_token_id, pad_token_id = None, 1, 1

        def __len__(self):
            return 11

        def convert_tokens_to_ids(self, t):
            return [specials[x] for x in t] if isinstance(t, list) else specials.get(t)

        def encode(self, text, add_special_tokens=False):
            assert text == "<<"
            return [2, 5]
    rng = np.random.default_rng(0)
    wte, head = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32)
    config = LlamaConfig(model_type="llama", vocab_size=8, hidden_size=4, tie_word_embeddings=False)
    got_config, got = latent_vocab.add_latent_rows(config, {EMBEDDING: wte, HEAD: head}, Tok())
    assert got_config.vocab_size == 11
    for name, table in ((EMBEDDING, wte), (HEAD, head)):
        assert got[name].shape == (11, 4)
        np.testing.assert_array_equal(got[name][:8], table)
        for i in (8, 9, 10):
            np.testing.assert_allclose(got[name][i], (table[2] + table[5]) / 2, rtol=1e-6)
            assert not np.allclose(got[name][i], table[2])


# -- sharding ----------------------------------------------------------------------------------------

SHARDED_STEP = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from coconut_jax import config as config_lib, data, methods, models, optimizer, sharding, steps
from coconut_jax.models.llama import LlamaConfig
cfg = LlamaConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  rope_scaling=(), tie_word_embeddings=False)
model = models.build(cfg, scan_layers=True)
params = jax.tree.map(np.asarray, model.init(0))
rng = np.random.default_rng(0)
seqs = []
for i in range(8):
    q, n, t = 3 + i % 4, 2 * (i % 2), 4 + i % 3
    ids = list(rng.integers(4, 80, q)) + [90] + [92] * n + [91] + list(rng.integers(4, 80, t))
    seqs.append((ids, [-100] * (q + n + 2) + ids[q + n + 2:]))
b = data.collate(seqs, list(range(8)), latent_id=92, pad_id=0, batch_size=8, multiple=8)
opt = optimizer.make_optimizer(config_lib.base_config())

def step(mesh):
    state = steps.TrainState(model, params, mesh, opt)
    loss = steps.train_step(state, [(b, sharding.put_batch(mesh, b.arrays()))], method=methods.get("coconut"),
                            base_key=jax.random.key(0), step=0)
    return state, float(loss["loss"]), jax.tree.map(np.asarray, state.params)

one = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
_, loss1, params1 = step(one)
for shape in ((2, 2, 2), (1, 2, 4)):
    state, loss, got = step(sharding.make_mesh(*shape))
    assert abs(loss - loss1) <= 1e-5, (shape, loss, loss1)
    err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got, params1)))
    assert err <= 1e-5, (shape, err)
    k = state.params["h"]["0"]["k"]["kernel"].sharding.spec
    q = state.params["h"]["0"]["q"]["kernel"].sharding.spec
    # 4 query heads split over any tensor axis that divides them; 2 kv heads only over 2.
    assert (q[1] == "tensor") == (4 % shape[2] == 0), (shape, q)
    assert (k[1] == "tensor") == (2 % shape[2] == 0), (shape, k)
    print(shape, "loss", loss, "max param difference", err)
print("ok")
"""


@pytest.mark.slow
def test_sharded_training_step_on_8_devices_equals_one_device():
    """data x fsdp x tensor meshes (tensor 2 and 4: the 2 kv heads split only over 2)."""
    import subprocess
    import sys
    from tests.conftest import ROOT, subprocess_env
    r = subprocess.run([sys.executable, "-c", SHARDED_STEP], env=subprocess_env(devices=8), capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_bf16_params_train_and_keep_their_dtype():
    from jax.sharding import Mesh
    from coconut_jax import config as config_lib, optimizer, sharding, steps
    cfg = VARIANTS["qwen3_gqa_untied"]
    model = models.build(cfg)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    state = steps.TrainState(model, model.init(0), mesh, optimizer.make_optimizer(config_lib.base_config()), jnp.bfloat16)
    b = _coconut_batch()
    before = np.asarray(state.params["wte"], np.float32)
    loss = steps.train_step(state, [(b, sharding.put_batch(mesh, b.arrays()))], method=methods.get("coconut"),
                            base_key=jax.random.key(0), step=0)
    assert np.isfinite(float(loss["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state[0].mu)} == {jnp.dtype(jnp.bfloat16)}
    assert np.abs(np.asarray(state.params["wte"], np.float32) - before).max() > 0
