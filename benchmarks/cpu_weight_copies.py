"""How much of XLA:CPU's memory figure for a bf16 step is f32 copies of bf16 weights.

    python benchmarks/cpu_weight_copies.py --shapes llama1b [--lora 128] [--thoughts 6]

XLA's CPU backend runs bf16 matmuls on f32 operands: it converts the weights, and converts the
stacked layer weights of the scanned layers once, before the layer loop (all layers at once).
An accelerator multiplies bf16 natively and makes no such copies. This compiles the LoRA
Coconut step of `train_step.py` at `--thoughts` (batch 8 x 512, bf16, remat full) with XLA's
buffer assignment dumped, and sums the distinct f32 `convert` buffers shaped like a stack of
layer weights (the exact shape of one projection's kernels over all layers) or the
vocabulary table. Prints JSON: the step's total, that sum, and the
difference (an estimate of the step's memory without the CPU's copies).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama1b")
    p.add_argument("--lora", type=int, default=128)
    p.add_argument("--thoughts", type=int, default=0)
    a = p.parse_args()
    sys.path.insert(0, HERE)
    from train_step import SHAPES
    from coconut_jax import models
    cfg = SHAPES[a.shapes]["config"]
    # The shapes a weight copy has: a stack of one projection's kernels over the layers (in any
    # order of its axes), or the vocabulary table.
    kernels = {shape for name, (shape, _) in models.build(cfg).kernel_shapes().items() if name != "wte"}
    weights = {tuple(sorted((cfg.n_layer,) + k)) for k in kernels} | {tuple(sorted((cfg.vocab_size, cfg.n_embd)))}
    with tempfile.TemporaryDirectory() as dump:
        env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=NONE"}
        out = subprocess.run([sys.executable, os.path.join(HERE, "train_step.py"), "--shapes", a.shapes, "--lora",
                              str(a.lora), "--param-dtype", "bfloat16", "--bf16", "--modes", "after_remat",
                              "--thoughts", str(a.thoughts), "--no-full"], env=env, capture_output=True, text=True, check=True)
        step = json.loads(out.stdout[out.stdout.index("{\n"):])[f"after_remat@{a.thoughts}+lora"]
        assignment = max(glob.glob(f"{dump}/*jit_step*buffer-assignment.txt"), key=os.path.getsize)
        text = open(assignment).read()
    seen = {}
    for m in re.finditer(r"value: <\d+ ([^ ]+) @0> \(size=(\d+),offset=\d+\): f32\[([0-9,]+)\]", text):
        name, size, dims = m.group(1), int(m.group(2)), [int(x) for x in m.group(3).split(",")]
        if "convert" in name and tuple(sorted(dims)) in weights:
            seen[name] = size
    copies = round(sum(seen.values()) / 2 ** 30, 3)
    print(json.dumps({"shape": a.shapes, "lora_rank": a.lora, "thoughts": a.thoughts, "step_total_gb": step["total_gb"],
                      "cpu_f32_weight_copies_gb": copies, "buffers": len(seen),
                      "total_without_copies_gb": round(step["total_gb"] - copies, 3)}, indent=1))


if __name__ == "__main__":
    main()
