"""A memory plan before the first step: the run's training step at every stage it will reach,
and its evaluation programs, compiled from abstract shapes on the run's mesh.

    python -m coconut_jax.plan --config configs/gsm.py [--config.field=value ...] [--devices N]
                               [--device-memory 16GB] [--length T] [--json]

No weight is read and no data tokenized: the model's shapes come from `model_id`'s config.json
(or the demo's prepared model), the batch is the micro-batch (`global_batch_size /
gradient_accumulation_steps`) at `--length` tokens (default: the model's context, the longest
sequence a run accepts), with each stage's thoughts. `--devices N` plans for N devices: N
fake CPU devices (the XLA CPU compiler's figures, close to but not the accelerator's). Prints, per
stage and per device, params, optimizer state, gradient accumulator, batch, temporaries and the
total; the compile time; tokens per step; the peak stage. With `--device-memory`, whether the
run fits and, if not, which of the run's own settings bring the peak under (each compiled, not
guessed).
"""
from __future__ import annotations

import os
import re
import sys
import time

def _device_count(argv: list[str]) -> int | None:
    """`--devices N` read before JAX starts (it sets the number of fake CPU devices); absl
    parses it again with the other flags."""
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def parse_size(text: str) -> float:
    """"16GB", "16GiB", "80G", "16000MB" -> GiB (GB read as GiB, as device specs mean it)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise ValueError(f"--device-memory={text!r}: not a size like 16GB or 80GiB")
    scale = {"": 1 / 2 ** 30, "K": 1 / 2 ** 20, "M": 1 / 2 ** 10, "G": 1.0, "T": 2 ** 10}[m.group(2).upper()]
    return float(m.group(1)) * scale


def reached_stages(c, cur) -> list[int]:
    """The stages a run of `c` trains at (only_eval: the one it evaluates)."""
    if c.only_eval:
        return [cur.stage(c.resume)]
    return sorted({cur.stage(e) for e in range(c.resume, c.num_epochs)})


def _pretrained_config(c):
    from coconut_jax import hf
    return hf.load_config(hf.resolve_model_dir(c.model_id, weights=False))


def _model_config(c, tok_len):
    import dataclasses

    from coconut_jax import methods
    config = _pretrained_config(c)
    # As the method's add_rows sizes it (Coconut: the tokenizer with the latent tokens).
    return dataclasses.replace(config, vocab_size=methods.get(c.method).planned_vocab(config.vocab_size, tok_len))


def _lora_tokens(spec, config) -> tuple[int, ...]:
    """The rows LoRA trains beside the adapters: their number is what counts here (the latent
    tokens are the tokenizer's last three)."""
    from coconut_jax.latent_vocab import LatentTokens
    v = config.vocab_size
    return spec.lora_tokens(LatentTokens(start=v - 3, end=v - 2, latent=v - 1, eos=0, pad=0))


def stage_plan(c, mesh, cur, config, stage: int, length: int, step_length: int) -> dict:
    """Per-device memory and compile time of the training step at `stage`."""
    import jax.numpy as jnp

    from coconut_jax import costs, optimizer, steps
    from coconut_jax.run import build_model, trains
    spec = cur.spec
    model = build_model(c, config, _lora_tokens(spec, config))
    tx = optimizer.make_optimizer(c)
    layout = steps.Layout(model, mesh, tx, jnp.dtype(c.param_dtype), spec.loss, part_modules(c, spec, config),
                          trains(model, spec))
    rows = c.global_batch_size // c.gradient_accumulation_steps
    shapes, prefix, n_latent = spec.plan_batch(cur, stage, rows, length, step_length)
    t0 = time.perf_counter()
    mem = costs.step_memory(model, layout, steps.make_update(tx, spec.loss, layout), spec,
                            costs.batch_shapes(mesh, shapes), prefix_len=prefix, n_latent=n_latent,
                            loss_chunk=c.loss_chunk)
    return {"stage": stage, "thoughts": n_latent, **mem, "compile_s": round(time.perf_counter() - t0, 2),
            "tokens_per_step": c.global_batch_size * length}


def part_modules(c, spec, config) -> tuple:
    """((name, module), ...) of the method's parts: a "pretrained" part is model_id's model (its
    config, weights.part_weights), a "fresh" one the method's own module."""
    from coconut_jax.run import part_model
    return tuple((p.name, spec.part_module(p, config) if p.source == "fresh"
                  else part_model(c, spec, p, _pretrained_config(c))) for p in spec.parts)


def eval_plan(c, mesh, cur, config, stage: int, length: int) -> dict:
    """Per-device memory of batched generation at `stage` (prompts of length/2)."""
    from coconut_jax import costs, evaluate, steps
    from coconut_jax.run import build_model
    spec = cur.spec
    model = build_model(c, config, _lora_tokens(spec, config))  # generation runs it as it trains
    rows = evaluate.eval_rows_for(c)
    prompt = length // 2
    _, params = steps.placed_shapes(model, mesh, c.param_dtype)
    parts = {name: (m, steps.placed_shapes(m, mesh, c.param_dtype)[1]) for name, m in part_modules(c, spec, config)
             if any(p.inference and p.name == name for p in spec.parts)}
    t0 = time.perf_counter()
    mem = spec.plan_generation(model, params, parts, cur, stage, rows, prompt, evaluate.max_new_tokens_for(c),
                               lambda shapes: costs.batch_shapes(mesh, shapes)).memory_analysis()
    out = {"stage": stage, "rows": rows, "prompt": prompt, "compile_s": round(time.perf_counter() - t0, 2)}
    if mem is not None:
        out["total_gb"] = round((mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                                 - mem.alias_size_in_bytes) / costs.GB, 4)
    return out


# Settings of the run that lower a step's memory, each as overrides of the config.
def candidate_settings(c, devices: int) -> list[dict]:
    out = []
    for k in (2, 4, 8):
        accum = c.gradient_accumulation_steps * k
        micro = c.global_batch_size // accum if c.global_batch_size % accum == 0 else 0
        if micro and micro % max(devices // (c.mesh.tensor or 1), 1) == 0:
            out.append({"gradient_accumulation_steps": accum})
    for remat in ("dots", "full"):
        if c.remat != remat:
            out.append({"remat": remat})
    if devices > 1 and c.mesh.fsdp != devices:
        out.append({"mesh.data": 1, "mesh.fsdp": devices})
    if c.param_dtype != "bfloat16":
        out.append({"param_dtype": "bfloat16"})
    return out


def _with(c, overrides: dict):
    c = c.copy_and_resolve_references()
    for k, v in overrides.items():
        node, _, leaf = k.rpartition(".")
        (c[node] if node else c)[leaf] = v
    return c


def make_plan(c, *, length: int | None = None, device_memory: float | None = None, step_length: int = 64) -> dict:
    """The plan of config `c` on this process's devices (see the module docstring)."""
    import jax

    from coconut_jax import config as config_lib, hf, methods, sharding
    config_lib.validate(c, data_files=False)
    if c.prepare.kind:
        from coconut_jax.demo import prepare
        c = c.copy_and_resolve_references()
        prepare.prepare_synthetic(c)  # the demo's model is built locally (or reused): its config.json is the shapes
    cur = methods.Curriculum.from_config(c)
    config = _model_config(c, len(hf.load_tokenizer(c.model_id)))  # the tokenizer with the latent tokens
    length = length or config.n_positions

    def plan_stages(cc):
        mesh = config_lib.checked(sharding.make_mesh, cc.mesh.data, cc.mesh.fsdp, cc.mesh.tensor)
        return mesh, [stage_plan(cc, mesh, cur, config, s, length, step_length) for s in reached_stages(cc, cur)]
    mesh, stages = plan_stages(c)
    peak = max(stages, key=lambda s: s.get("total_gb", 0.0))
    out = {"devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
           "mesh": {k: int(v) for k, v in mesh.shape.items()}, "length": length,
           "micro_batch": c.global_batch_size // c.gradient_accumulation_steps, "stages": stages,
           "peak_stage": peak["stage"],
           "evaluation": eval_plan(c, mesh, cur, config, peak["stage"], length)}
    if device_memory is not None:
        out["device_memory_gb"] = device_memory
        out["fits"] = peak.get("total_gb", 0.0) <= device_memory
        out["suggestions"] = []
        if not out["fits"]:
            for overrides in candidate_settings(c, jax.device_count()):
                cc = _with(c, overrides)
                m = config_lib.checked(sharding.make_mesh, cc.mesh.data, cc.mesh.fsdp, cc.mesh.tensor)
                got = stage_plan(cc, m, cur, config, peak["stage"], length, step_length)
                out["suggestions"].append({"set": overrides, "total_gb": got.get("total_gb"),
                                           "fits": got.get("total_gb", 0.0) <= device_memory})
            out["suggestions"].sort(key=lambda s: s["total_gb"] or 0.0)
    return out


def format_plan(p: dict) -> str:
    cols = ("params_gb", "optimizer_gb", "accumulator_gb", "batch_gb", "temporaries_gb", "total_gb")
    lines = [f"{p['devices']} x {p['device_kind']}, mesh {p['mesh']}, micro-batch {p['micro_batch']} x "
             f"{p['length']} tokens; per device, GiB:",
             "stage thoughts " + " ".join(f"{c[:-3]:>12}" for c in cols) + "  compile_s  tokens/step"]
    for s in p["stages"]:
        lines.append(f"{s['stage']:>5} {s['thoughts']:>8} " + " ".join(f"{s.get(c, float('nan')):>12.3f}" for c in cols)
                     + f"  {s['compile_s']:>9.1f}  {s['tokens_per_step']:>11}")
    lines.append(f"peak: stage {p['peak_stage']}; evaluation (generation, {p['evaluation']['rows']} rows): "
                 f"{p['evaluation'].get('total_gb', float('nan')):.3f} GiB")
    if "fits" in p:
        lines.append(f"device memory {p['device_memory_gb']:.3g} GiB: " + ("fits" if p["fits"] else "does not fit"))
        for s in p["suggestions"]:
            setting = " ".join(f"--config.{k}={v}" for k, v in s["set"].items())
            lines.append(f"  {setting}: {s['total_gb']:.3f} GiB" + (" (fits)" if s["fits"] else ""))
    return "\n".join(lines)


def cli(argv=None):
    argv = list(sys.argv if argv is None else argv)
    n = _device_count(argv)
    if n:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    from absl import app, flags
    from ml_collections import config_flags

    from coconut_jax import config as config_lib, hf
    config_flags.DEFINE_config_file("config", None, "the run's configuration file", lock_config=True)
    flags.DEFINE_integer("devices", None, "plan for N devices: N fake CPU devices (default: the devices present)")
    flags.DEFINE_string("device_memory", None, "memory per device (e.g. 16GB, 80GiB): does the run fit, and "
                        "which of its settings bring it under")
    flags.DEFINE_alias("device-memory", "device_memory")
    flags.DEFINE_integer("length", None, "tokens per sequence (default: the model's context)")
    flags.DEFINE_boolean("json", False, "print the plan as JSON")
    flags.mark_flags_as_required(["config"])

    def main(_):
        import json
        from coconut_jax.train import quiet_libraries
        quiet_libraries()
        f = flags.FLAGS
        try:
            memory = parse_size(f.device_memory) if f.device_memory else None
            p = make_plan(f.config, length=f.length, device_memory=memory)
        except (ValueError, config_lib.ConfigError, hf.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(p, indent=1) if f.json else format_plan(p))
    app.run(main, argv=argv, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    cli()
