"""How fast a small GPT-2 learns to look a fact up in context, from random or wired weights.

    python benchmarks/lookup.py [--steps 2000] [--facts 12] [--n_embd 128] [--every 200]

The task (`coconut_jax.demo.induction.fact_lookup_batch`): `--facts` facts "Every X is a Y ." then
"Every X is a" for one of them; the answer is that fact's Y. Both models are the same 2-layer,
4-head GPT-2 trained by Adam (lr 1e-3, batch 16) on the same batches; one starts from GPT-2's
random initialisation, the other from `wire_induction_heads`. Prints one JSON object: test
accuracy (200 held-out rows; chance is 1/facts) at step 0 and every `--every` steps, and seconds.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from coconut_jax.demo import induction
from coconut_jax.models.gpt2 import GPT2Config, GPT2Model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--facts", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--every", type=int, default=200)
    a = p.parse_args(argv)
    cfg = GPT2Config(vocab_size=induction.LOOKUP_VOCAB, n_positions=8 * a.facts + 8, n_embd=a.n_embd, n_layer=2, n_head=4)
    model = GPT2Model(cfg)
    test = induction.fact_lookup_batch(np.random.default_rng(1), 200, a.facts)
    out = {"facts": a.facts, "n_embd": a.n_embd, "steps": a.steps, "chance": round(1 / a.facts, 3)}
    for name in ("random", "wired"):
        params = model.init(0)
        if name == "wired":
            params = induction.wire_induction_heads(cfg, params, seed=0)
        t0 = time.perf_counter()
        start = induction.lookup_accuracy(model, params, *test)
        _, curve = induction.train_on_lookup(model, params, a.steps, np.random.default_rng(0), n_facts=a.facts,
                                             every=a.every, test=test)
        out[name] = {"accuracy": {0: round(start, 3), **{s: round(acc, 3) for s, acc in curve}},
                     "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
