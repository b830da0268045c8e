"""The accelerator figures docs/performance.md waits for, in one command of under 8 minutes on
one GPU (nothing downloaded: random weights at the published shapes, generated data).

    python benchmarks/gpu.py            # on the GPU machine
    python benchmarks/gpu.py --smoke    # the same parts at tiny shapes: a CPU check that it runs

Each part runs in a process of its own with a time budget (a part that runs out is reported as
such, the others still run) and the whole prints one JSON object:

  gpt2_bf16     train_step.py: GPT-2 small, 32 x 512, bf16: the plain step and the 6-thought
                step (step time, tokens/s, MFU) and the SIM-CoT step at 6 thoughts beside its
                terms summed into one loss
  llama1b_lora  train_step.py: the Llama-3.2-1B shape, 8 x 512, 6 thoughts, LoRA rank 128 on a
                bf16 base, remat full: step time and XLA's memory
  generation    generate.py: GPT-2 small, 64 questions batched, 12 new tokens: seconds per
                question and new tokens per second
  plan_vs_peak  configs/tiny.py with a GPT-2-small body: `coconut_jax.plan`'s per-device total
                for the first batch beside the device's measured peak after two training steps
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PARTS = {
    "gpt2_bf16": (["train_step.py", "--shapes", "gpt2", "--bf16", "--modes", "after", "--thoughts", "0,6", "--simcot",
                   "--time", "--repeats", "5"],
                  ["train_step.py", "--shapes", "tiny", "--modes", "after", "--thoughts", "0,6", "--simcot", "--time",
                   "--repeats", "1"]),
    "llama1b_lora": (["train_step.py", "--shapes", "llama1b", "--bf16", "--param-dtype", "bfloat16", "--modes",
                      "after_remat", "--thoughts", "6", "--lora", "128", "--no-full", "--time", "--repeats", "3"],
                     ["train_step.py", "--shapes", "llama_tiny", "--modes", "after_remat", "--thoughts", "6",
                      "--lora", "8", "--no-full", "--time", "--repeats", "1"]),
    "generation": (["generate.py", "--shapes", "gpt2", "--questions", "64", "--singles", "1"],
                   ["generate.py", "--shapes", "tiny", "--questions", "8", "--singles", "1"]),
}
BUDGET_S = {"gpt2_bf16": 180, "llama1b_lora": 150, "generation": 60, "plan_vs_peak": 90}  # 480 s in all


def run_part(argv: list[str], budget: float) -> dict:
    """The JSON a benchmark script prints (its last `{...}` block), or what went wrong."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], cwd=ROOT, capture_output=True,
                           text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"error": f"over its budget of {budget:.0f} s"}
    wall = round(time.perf_counter() - t0, 1)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                "wall_s": wall}
    return {**json.loads(r.stdout[r.stdout.rindex("\n{") + 1 if "\n{" in r.stdout else r.stdout.index("{"):]),
            "wall_s": wall}


def plan_vs_peak(smoke: bool) -> dict:
    """In this process: a tiny-config run with a GPT-2-small body (smoke: the tiny body), the
    plan of its first batch's shape, two training steps, and the device's peak memory."""
    import jax

    from coconut_jax import config as config_lib, plan, steps
    from coconut_jax.train import set_up
    with tempfile.TemporaryDirectory() as tmp:
        def config():
            c = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
            c.update(dict(save_path=tmp, cache_dir=os.path.join(tmp, "cache"), global_batch_size=8 if smoke else 32))
            if not smoke:
                c.prepare.update(dict(n_layer=12, n_embd=768, n_head=12, train=64))
                c.update(dict(scan_layers=True, fused_attention=True, loss_chunk=128))
            return c
        run = set_up(config())
        batch = run.plan(run.train_examples, 0, 0).batch(0)
        planned = plan.make_plan(config(), length=batch.input_ids.shape[1])["stages"][0]
        for k in range(2):
            losses = steps.train_step(run.state, [(batch, run.put(batch))], method=run.cur.spec,
                                      base_key=jax.random.key(0), step=k, loss_chunk=run.c.loss_chunk)
            jax.block_until_ready(losses)
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        out = {"rows": int(batch.input_ids.shape[0]), "length": int(batch.input_ids.shape[1]),
               "planned_total_gb": planned.get("total_gb"),
               "measured_peak_gb": None if peak is None else round(peak / 2 ** 30, 4)}
        if peak is None:
            out["note"] = f"{jax.default_backend()} reports no device memory statistics"
        elif planned.get("total_gb"):
            out["measured_over_planned"] = round(out["measured_peak_gb"] / planned["total_gb"], 3)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on a CPU")
    p.add_argument("--part", choices=[*PARTS, "plan_vs_peak"], help=argparse.SUPPRESS)  # one part, in its process
    a = p.parse_args()
    if a.part == "plan_vs_peak":
        print(json.dumps(plan_vs_peak(a.smoke)))
        return
    import jax
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "smoke": a.smoke}
    t0 = time.perf_counter()
    for name, (full, smoke) in PARTS.items():
        out[name] = run_part(smoke if a.smoke else full, BUDGET_S[name])
        for shape in ("tiny", "gpt2"):  # generation: new tokens per second of the batched run
            g = out[name].get(shape) if name == "generation" else None
            if g:
                g["batched_new_tokens_per_s"] = round(g["new_tokens"] / g["batched_s_per_q"], 1)
        print(f"{name}: {round(time.perf_counter() - t0)} s", file=sys.stderr, flush=True)
    out["plan_vs_peak"] = run_part(["gpu.py", "--part", "plan_vs_peak", *(["--smoke"] if a.smoke else [])],
                                   BUDGET_S["plan_vs_peak"])
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
