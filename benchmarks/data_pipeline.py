"""The host data pipeline at the published GSM8K-Aug scale (385,620 records), offline.

    python benchmarks/data_pipeline.py [--records 385620] [--cli] [--work /tmp/coconut_data_bench]

Generates GSM8K-style records (question, 1-8 "<<a*b=c>>" steps, a number answer) and a
byte-level BPE tokenizer trained on a sample of them, then measures, each phase in a fresh
process so its memory is its own:
  tokenize   load + validate the JSON, first tokenization, writing the cache; peak RSS
  cached     loading the cache (no JSON parse), the tokenized set's resident bytes, an
             epoch plan at stage 1, collating batches of 128; peak RSS
  cli        (--cli) the training CLI (`configs/gsm_cot.py`, a 2-layer 128-dim GPT-2) until
             its first logged step, cold (empty caches) and warm; its peak RSS
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["John", "Mary", "Tom", "Ana", "Li", "Sam", "Ravi", "Olga", "Jamal", "Hannah"]
THINGS = ["apples", "books", "cups of flour", "dollars", "miles", "eggs", "tickets", "pencils", "boxes", "hours"]
VERBS = ["buys", "sells", "gives away", "finds", "bakes", "spends", "earns", "walks", "reads", "collects"]


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 9))
        nums = rng.integers(2, 100, size=k + 1)
        name, thing = NAMES[rng.integers(len(NAMES))], THINGS[rng.integers(len(THINGS))]
        sents = [f"{name} {VERBS[rng.integers(len(VERBS))]} {x} {thing} every week." for x in nums[:k]]
        question = " ".join(sents) + f" How many {thing} does {name} have after {nums[k]} weeks?"
        steps, acc = [], int(nums[0])
        for x in nums[1:k + 1]:
            new = acc * int(x) if rng.random() < 0.5 else acc + int(x)
            steps.append(f"<<{acc}{'*' if new == acc * int(x) else '+'}{int(x)}={new}>>")
            acc = new
        out.append({"question": question, "steps": steps, "answer": str(acc)})
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def prepare(work: str, n: int) -> dict:
    from coconut_jax import tiny
    data_path, model_dir = os.path.join(work, "train.json"), os.path.join(work, "model")
    if not os.path.isfile(data_path) or len(json.load(open(data_path))) != n:
        records = make_records(n)
        with open(data_path, "w") as f:
            json.dump(records, f)
        shutil.rmtree(model_dir, ignore_errors=True)
    if not os.path.isdir(model_dir):
        records = json.load(open(data_path))
        tiny.build(tiny.record_texts(records[:20000]), model_dir, vocab_size=2048, n_layer=2, n_embd=128,
                   n_head=4, n_positions=1024, overwrite=True)
    return {"data": data_path, "model": model_dir, "json_mb": os.path.getsize(data_path) / 2 ** 20}


def phase_tokenize(a) -> dict:
    from coconut_jax import data, hf
    tok = hf.load_tokenizer(a.model)
    t0, c0 = time.perf_counter(), time.process_time()
    records = data.load_records(a.data)
    t1 = time.perf_counter()
    ts = data.tokenize_records(records, tok, a.data)
    t2, c2 = time.perf_counter(), time.process_time()
    data.write_cache(os.path.join(a.cache, data.cache_key(data.file_digest(a.data), tok, None)), ts)
    t3 = time.perf_counter()
    return {"load_validate_s": t1 - t0, "tokenize_s": t2 - t1, "write_cache_s": t3 - t2,
            "cores_used": (c2 - c0) / (t2 - t0), "tokens": int(len(ts.tokens)), "peak_rss_gb": peak_rss_gb()}


def phase_cached(a) -> dict:
    from coconut_jax import data, hf, latent_vocab, methods
    tok = hf.load_tokenizer(a.model)
    tokens = latent_vocab.latent_tokens(tok)
    base = rss_gb()
    t0 = time.perf_counter()
    _, ts = data.load_dataset(a.data, tok, cache_dir=a.cache, with_records=False)
    t1 = time.perf_counter()
    resident = rss_gb() - base
    cur = methods.Curriculum("coconut", c_thought=2, max_latent_stage=3, epochs_per_stage=3)
    t2 = time.perf_counter()
    plan = data.EpochPlan(ts, cur, tokens, 1, epoch=3,
                          settings=data.PlanSettings(seed=0, batch_size=128, multiple=32, max_len=1024))
    t3 = time.perf_counter()
    times = []
    for k in range(40):
        t = time.perf_counter()
        plan.batch(k)
        times.append(time.perf_counter() - t)
    return {"cached_load_s": t1 - t0, "dataset_resident_gb": resident,
            "dataset_bytes_gb": sum(getattr(ts, n).nbytes for n in ("tokens", "pieces", "records")) / 2 ** 30,
            "epoch_plan_s": t3 - t2, "batches": len(plan), "collate_128_ms_median": 1e3 * float(np.median(times)),
            "collate_128_ms_spread": [1e3 * float(np.min(times)), 1e3 * float(np.max(times))],
            "peak_rss_gb": peak_rss_gb()}


def cli_first_step(a, run_dir: str, cache: str, xla_cache: str) -> dict:
    """Seconds from launch to the first logged step, and the process's peak RSS then."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "coconut_jax.train", "--config", os.path.join(ROOT, "configs", "gsm_cot.py"),
           f"--config.train_path={a.data}", f"--config.val_path={a.data}", f"--config.model_id={a.model}",
           f"--config.save_path={os.path.dirname(run_dir)}", f"--config.name={os.path.basename(run_dir)}",
           f"--config.cache_dir={cache}", f"--config.compilation_cache_dir={xla_cache}",
           "--config.max_val_examples=8", "--config.global_batch_size=128", "--config.gradient_accumulation_steps=4",
           "--config.log_every_steps=1"]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, peak = os.path.join(run_dir, "metrics.jsonl"), 0.0
    try:
        while proc.poll() is None:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([int(l.split()[1]) / 2 ** 20 for l in f if l.startswith("VmHWM")] + [peak])
            if os.path.isfile(metrics) and os.path.getsize(metrics):
                return {"first_step_s": time.perf_counter() - t0, "peak_rss_gb": peak}
            time.sleep(0.1)
        raise RuntimeError(f"the training CLI exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=385_620)
    p.add_argument("--work", default="/tmp/coconut_data_bench")
    p.add_argument("--cli", action="store_true", help="also time the training CLI to its first step")
    p.add_argument("--phase", choices=["tokenize", "cached"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        print(json.dumps(phase_tokenize(a) if a.phase == "tokenize" else phase_cached(a)))
        return
    os.makedirs(a.work, exist_ok=True)
    files = prepare(a.work, a.records)
    cache = os.path.join(a.work, "token_cache")
    shutil.rmtree(cache, ignore_errors=True)
    out = {"records": a.records, "json_mb": round(files["json_mb"], 1)}

    def phase(name):
        r = subprocess.run([sys.executable, __file__, "--phase", name, "--data", files["data"], "--model",
                            files["model"], "--cache", cache], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])
    out["tokenize"] = phase("tokenize")
    out["cached"] = phase("cached")
    if a.cli:
        a.data, a.model = files["data"], files["model"]
        cold_cache, xla = os.path.join(a.work, "cli_cache"), os.path.join(a.work, "xla_cache")
        shutil.rmtree(cold_cache, ignore_errors=True)
        shutil.rmtree(xla, ignore_errors=True)
        run_dir = os.path.join(a.work, "runs", "cli")
        out["cli_cold"] = cli_first_step(a, run_dir, cold_cache, xla)
        out["cli_warm"] = cli_first_step(a, run_dir, cold_cache, xla)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
