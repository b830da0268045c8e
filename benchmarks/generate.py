"""Questions per second: batched KV-cached generation versus one question at a time without cache.

    python benchmarks/generate.py [--shapes tiny|gpt2|both] [--questions 32] [--singles 2]

Every question is a ProsQA-length prompt ending in <start> + 6 latents + <end>; each
generates exactly `--new-tokens` tokens (EOS disabled, so all methods do the same work).
Measured in the same run, compilation excluded:

  batched         `coconut.generate` on all questions at once (prefill with the thought
                  passes, then a cached decoding loop)
  single_uncached one question at a time, every new token a full jitted latent forward over
                  the prompt and the tokens so far (no cache, no batching)
  single_reference one question at a time as the reference does it: every new token re-runs
                  the n+1 full passes of its latent forward (jitted here)

Prints one JSON object with seconds per question and the throughput ratios.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from coconut_jax import coconut, data
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
    """The reference's forward for one layout of latents, jitted: n+1 full passes."""
    key = (model, latent_mask.shape, latent_mask.tobytes())
    if key not in _REFERENCE_FNS:
        def fn(params, arrays, last):
            hidden = coconut.reference_hidden(model, params, {**arrays, "latent_mask": latent_mask})
            return jnp.argmax(model.logits(params, hidden[0, last]))
        _REFERENCE_FNS[key] = jax.jit(fn)
    return _REFERENCE_FNS[key]


def single_reference(model, params, prompt, new_tokens, latent):
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
    single_uncached(model, params, prompts[0], new_tokens, latent)  # compile every length bucket
    out["single_uncached_s_per_q"], one = per_question(
        lambda: [single_uncached(model, params, p, new_tokens, latent) for p in prompts[:singles]], singles)
    single_reference(model, params, prompts[0], new_tokens, latent)  # compile
    out["single_reference_s_per_q"], ref = per_question(
        lambda: [single_reference(model, params, p, new_tokens, latent) for p in prompts[:singles]], singles)
    # Same tokens whichever way (a random model's argmax can flip on float noise: report, don't assert).
    out["same_tokens_as_batched"] = [one[i] == many[i] and ref[i] == many[i] for i in range(singles)]
    out["speedup_vs_single_uncached"] = out["single_uncached_s_per_q"] / out["batched_s_per_q"]
    out["speedup_vs_single_reference"] = out["single_reference_s_per_q"] / out["batched_s_per_q"]
    out.update(questions=questions, singles=singles, prompt_tokens=spec["prompt"], thoughts=N_THOUGHTS,
               new_tokens=new_tokens, n_layer=cfg.n_layer, n_embd=cfg.n_embd)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="tiny", choices=["tiny", "gpt2", "both"])
    p.add_argument("--questions", type=int, default=32, help="batch size of the batched run")
    p.add_argument("--singles", type=int, default=2, help="questions timed one at a time")
    p.add_argument("--new-tokens", type=int, default=12, help="~ a ProsQA answer: '### Rex is a derpus.'")
    a = p.parse_args()
    names = ["tiny", "gpt2"] if a.shapes == "both" else [a.shapes]
    result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    for name in names:
        result[name] = bench_shape(SHAPES[name], a.questions, a.singles, a.new_tokens)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
