"""Questions per second: batched KV-cached generation versus one question at a time without cache.

    python benchmarks/generate.py [--shapes tiny|gpt2|both] [--questions 32] [--singles 2]

Every question is a ProsQA-length prompt ending in <start> + 6 latents + <end>; each
generates exactly `--new-tokens` tokens (EOS disabled, so all methods do the same work).
Measured in the same run, compilation excluded:

  batched         `coconut.generate` on all questions at once (prefill with the thought
                  passes, then a cached decoding loop)
  single_uncached one question at a time, every new token a full jitted latent forward over
                  the prompt and the tokens so far (no cache, no batching): the reference's
                  way of generating (SPEC §10: batch 1, the whole prefix re-run for every new
                  token), jitted here
  single_full_recompute one question at a time, every new token the n+1 full passes of the
                  SPEC §5 test form (slower than the reference, which keeps the thoughts)

Prints one JSON object with seconds per question and the throughput ratios.

    python benchmarks/generate.py --process [--questions 200]

The whole `only_eval` process instead (`configs/prosqa_eval.py` at stage 6, as a user runs it): 200 generated ProsQA questions, a random 2-layer
128-dim GPT-2 with a tokenizer trained on them; wall-clock seconds per question cold (empty
token and compilation caches) and warm, against the reference's way of generating
(one full pass over the prompt and the tokens so far per new token, one question at a time,
jitted) on the same model and questions in the same run, timed on `--singles` of them for as many tokens as the process
generated on average; and generation alone (`answers.generate_predictions`, in process,
after compilation) against the same reference.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax import answers, coconut, data, latent_vocab, methods, testing
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model

SHAPES = {
    "tiny": dict(config=GPT2Config(vocab_size=400, n_positions=1024, n_embd=96, n_layer=2, n_head=4), prompt=350),
    "gpt2": dict(config=GPT2Config(vocab_size=50260), prompt=350),
}
N_THOUGHTS = 6


def make_prompts(n, length, vocab):
    start, end, latent = vocab - 3, vocab - 2, vocab - 1
    rng = np.random.default_rng(0)
    q = length - N_THOUGHTS - 2
    return [rng.integers(1, vocab - 3, size=q).tolist() + [start] + [latent] * N_THOUGHTS + [end] for _ in range(n)]


def collate(prompts, latent, multiple):
    return data.collate([(p, None) for p in prompts], list(range(len(prompts))), latent_id=latent, pad_id=0,
                        batch_size=len(prompts), multiple=multiple)


def _last(batch):
    """Position of the row's last token (the collator left-pads to align the first latent)."""
    return int(np.nonzero(batch.attention_mask[0])[0][-1])


@functools.partial(jax.jit, static_argnames=("model", "prefix_len", "n_latent"))
def _last_token(model, params, arrays, last, *, prefix_len, n_latent):
    hidden = coconut.latent_forward(model, params, arrays, prefix_len, n_latent)
    return jnp.argmax(model.logits(params, hidden[0, last]))


def _one_at_a_time(next_token, prompt, new_tokens, latent):
    """Greedy decoding of one prompt with no cache: `next_token(batch)` runs a full forward
    over the prompt and the tokens so far for every new token."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(next_token(collate([ids], latent, multiple=32))))
    return ids[len(prompt):]


def single_uncached(model, params, prompt, new_tokens, latent):
    return _one_at_a_time(lambda b: _last_token(model, params, b.arrays(), _last(b), prefix_len=b.prefix_len,
                                                n_latent=b.n_latent), prompt, new_tokens, latent)


_REFERENCE_FNS = {}


def _reference_fn(model, latent_mask):
    """The SPEC §5 test form for one layout of latents, jitted: n+1 full passes."""
    key = (model, latent_mask.shape, latent_mask.tobytes())
    if key not in _REFERENCE_FNS:
        def fn(params, arrays, last):
            hidden = testing.reference_hidden(model, params, {**arrays, "latent_mask": latent_mask})
            return jnp.argmax(model.logits(params, hidden[0, last]))
        _REFERENCE_FNS[key] = jax.jit(fn)
    return _REFERENCE_FNS[key]


def single_full_recompute(model, params, prompt, new_tokens, latent):
    return _one_at_a_time(lambda b: _reference_fn(model, b.latent_mask)(params, b.arrays(), _last(b)),
                          prompt, new_tokens, latent)


def batched(model, params, prompts, new_tokens, latent):
    b = collate(prompts, latent, multiple=32)
    toks, _ = coconut.generate(model, params, b.arrays(), -1, prefix_len=b.prefix_len, n_latent=b.n_latent,
                               max_new_tokens=new_tokens)
    return np.asarray(toks).tolist()


def per_question(fn, n):
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) / n, out


def bench_shape(spec, questions, singles, new_tokens):
    cfg = spec["config"]
    model = GPT2Model(cfg)
    params = model.init(0)
    latent = cfg.vocab_size - 1
    prompts = make_prompts(questions, spec["prompt"], cfg.vocab_size)
    batched(model, params, prompts, new_tokens, latent)  # compile
    out = {}
    out["batched_s_per_q"], many = per_question(lambda: batched(model, params, prompts, new_tokens, latent),
                                                 questions)
    for q in prompts[:singles]:  # compile every length bucket the timed questions pass through
        single_uncached(model, params, q, new_tokens, latent)
    out["single_uncached_s_per_q"], one = per_question(
        lambda: [single_uncached(model, params, p, new_tokens, latent) for p in prompts[:singles]], singles)
    for q in prompts[:singles]:
        single_full_recompute(model, params, q, new_tokens, latent)  # compile
    out["single_full_recompute_s_per_q"], ref = per_question(
        lambda: [single_full_recompute(model, params, p, new_tokens, latent) for p in prompts[:singles]], singles)
    # Same tokens whichever way (a random model's argmax can flip on float noise: report, don't assert).
    out["same_tokens_as_batched"] = [one[i] == many[i] and ref[i] == many[i] for i in range(singles)]
    out["speedup_vs_reference_way"] = out["single_uncached_s_per_q"] / out["batched_s_per_q"]
    out["speedup_vs_single_full_recompute"] = out["single_full_recompute_s_per_q"] / out["batched_s_per_q"]
    out.update(questions=questions, singles=singles, prompt_tokens=spec["prompt"], thoughts=N_THOUGHTS,
               new_tokens=new_tokens, n_layer=cfg.n_layer, n_embd=cfg.n_embd)
    return out


def bench_process(questions: int, singles: int) -> dict:
    import os
    import shutil
    import subprocess
    import sys
    from coconut_jax import config as config_lib, hf, tiny
    from data_prep import prosqa_generator
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = "/tmp/coconut_eval_bench"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    records = prosqa_generator.generate(questions, seed=0)
    val = os.path.join(work, "valid.json")
    with open(val, "w") as f:
        json.dump(records, f)
    model_dir = tiny.build(tiny.record_texts(records), os.path.join(work, "model"), vocab_size=512, n_layer=2,
                           n_embd=128, n_head=4, n_positions=1024)
    out = {"questions": questions}
    for run in ("cold", "warm"):
        cmd = [sys.executable, "-m", "coconut_jax.train", "--config", os.path.join(root, "configs", "prosqa_eval.py"),
               f"--config.val_path={val}", f"--config.load_model_path={model_dir}", f"--config.model_id={model_dir}",
               f"--config.save_path={work}/runs", f"--config.name=eval_{run}", f"--config.cache_dir={work}/cache",
               "--config.resume=30", "--config.print_examples=0"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
        out[f"process_{run}_s"] = time.perf_counter() - t0
        out[f"process_{run}_s_per_q"] = out[f"process_{run}_s"] / questions
    preds = [json.loads(line) for line in open(f"{work}/runs/eval_warm/predictions_epoch31.jsonl")]
    new_tokens = max(1, round(float(np.mean([p["new_tokens"] for p in preds]))))
    # The reference's way on the same model and prompts.
    config, params = hf.load_pretrained(model_dir)
    tok = hf.load_tokenizer(model_dir)
    toks = latent_vocab.latent_tokens(tok)
    config, params = latent_vocab.add_latent_rows(config, params, tok)
    model = GPT2Model(config)
    cur = methods.Curriculum("coconut", 1, 6, 5)
    recs, ts = data.load_dataset(val, tok)
    # Generation alone, in process, after compilation: what the CLI's evaluation runs.
    examples = [ts[i] for i in range(len(ts))]
    c = config_lib.load_config_file(os.path.join(root, "configs", "prosqa_eval.py"))
    gen = lambda: answers.generate_predictions(
        model, params, examples, recs, 6, cur, toks, tok, batch_size=config_lib.eval_rows(c.eval_batch_size, "cpu"),
        max_new_tokens=128, multiple=c.eval_pad_to_multiple, context=config.n_positions)
    gen()
    gen_s, _ = per_question(gen, questions)
    prompts = [data.eval_prompt(ts[i], 6, cur, toks) for i in range(singles)]
    for q in prompts:  # compile every length bucket the timed questions pass through
        single_uncached(model, params, q, new_tokens, toks.latent)
    ref_s, _ = per_question(lambda: [single_uncached(model, params, q, new_tokens, toks.latent) for q in prompts],
                            singles)
    out.update(new_tokens_mean=new_tokens, reference_s_per_q=ref_s, generation_s_per_q=gen_s,
               generation_speedup_vs_reference=ref_s / gen_s,
               cold_speedup_vs_reference=ref_s / out["process_cold_s_per_q"],
               warm_speedup_vs_reference=ref_s / out["process_warm_s_per_q"])
    return out


def bench_decode_step(rows: int = 64, prompt: int = 520, new_tokens: int = 64) -> dict:
    """One decoding step of `coconut.generate` (64 rows, a ~580-slot cache, 2 layers of 128
    dims) against the cost of its matmuls alone (the same products on contiguous arrays:
    q/k/v, projections, MLP, head, and scores/values over the cache, per layer)."""
    cfg = GPT2Config(vocab_size=300, n_positions=1024, n_embd=128, n_layer=2, n_head=4)
    model = GPT2Model(cfg, scan_layers=True)
    params = model.init(0)
    prompts = make_prompts(rows, prompt, cfg.vocab_size)
    b = collate(prompts, cfg.vocab_size - 1, multiple=32)

    def run(n):
        fn = lambda: coconut.generate(model, params, b.arrays(), -1, prefix_len=b.prefix_len, n_latent=b.n_latent,
                                      max_new_tokens=n)
        jax.block_until_ready(fn())
        return min(per_question(lambda: jax.block_until_ready(fn()), 1)[0] for _ in range(5))
    step = (run(new_tokens + 1) - run(1)) / new_tokens
    e, h, d, slots = cfg.n_embd, cfg.n_head, cfg.head_dim, b.input_ids.shape[1] + new_tokens
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, e)), jnp.float32)
    w = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in
         dict(qkv=(e, 3 * e), proj=(e, e), fc=(e, 4 * e), out=(4 * e, e), head=(e, cfg.vocab_size)).items()}
    # One array per layer: slicing a layer out of a stacked [L,...] cache would copy it.
    kc = [jnp.asarray(rng.standard_normal((rows, h, slots, d)), jnp.float32) for _ in range(cfg.n_layer)]

    @jax.jit
    def matmuls(x, w, kc):
        for layer in range(cfg.n_layer):
            q = (x @ w["qkv"])[:, :e].reshape(rows, h, d)
            p = jnp.einsum("bhd,bhsd->bhs", q, kc[layer])
            a = jnp.einsum("bhs,bhsd->bhd", p, kc[layer]).reshape(rows, e)
            x = a @ w["proj"] + ((x @ w["fc"]) @ w["out"])
        return x @ w["head"]
    jax.block_until_ready(matmuls(x, w, kc))
    mm = min(per_question(lambda: jax.block_until_ready(matmuls(x, w, kc)), 1)[0] for _ in range(20))
    # The step's arithmetic at this machine's dense matmul rate (a 1024^3 f32 product).
    big = jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32)
    gemm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(gemm(big))
    rate = 2 * 1024 ** 3 / min(per_question(lambda: jax.block_until_ready(gemm(big)), 1)[0] for _ in range(10))
    flops = rows * (cfg.n_layer * (2 * 12 * e * e + 4 * slots * e) + 2 * e * cfg.vocab_size)
    return {"rows": rows, "cache_slots": int(slots), "decode_step_ms": 1e3 * step, "matmuls_ms": 1e3 * mm,
            "step_over_matmuls": step / mm, "step_mflop": flops / 1e6, "gemm_gflops": rate / 1e9,
            "flops_at_gemm_rate_ms": 1e3 * flops / rate, "step_over_flops_at_gemm_rate": step * rate / flops}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--decode-step", action="store_true", help="one decoding step against its matmuls")
    p.add_argument("--process", action="store_true", help="the whole only_eval process, cold and warm")
    p.add_argument("--shapes", default="tiny", choices=["tiny", "gpt2", "both"])
    p.add_argument("--questions", type=int, default=32, help="batch size of the batched run")
    p.add_argument("--singles", type=int, default=2, help="questions timed one at a time")
    p.add_argument("--new-tokens", type=int, default=12, help="~ a ProsQA answer: '### Rex is a derpus.'")
    a = p.parse_args()
    result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    if a.decode_step:
        result["decode_step"] = bench_decode_step()
        print(json.dumps(result, indent=1))
        return
    if a.process:
        result["only_eval_process"] = bench_process(a.questions if a.questions != 32 else 200, a.singles)
        print(json.dumps(result, indent=1))
        return
    names = ["tiny", "gpt2"] if a.shapes == "both" else [a.shapes]
    for name in names:
        result[name] = bench_shape(SHAPES[name], a.questions, a.singles, a.new_tokens)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
