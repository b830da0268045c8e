"""Run configuration: defaults, validation, and the reference's YAML files.

Field names follow the reference's YAML where one exists; `method` replaces its boolean
flags (`coconut`, `cot`, `no_thoughts`, `no_cot`, `special_token`).
"""
from __future__ import annotations

import os

import ml_collections

from coconut_jax.data import METHODS, OVERLONG_POLICIES

# The reference's YAML files say "need 4 gpus": its batch_size_training is per GPU.
REFERENCE_DEVICES = 4


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.project = "coconut"
    c.name = "run"
    c.save_path = "runs"
    c.method = "coconut"
    c.model_id = "openai-community/gpt2"
    c.load_model_path = "None"
    c.train_path = ""
    c.val_path = ""
    c.only_eval = False
    c.c_thought = 1
    c.epochs_per_stage = 5
    c.max_latent_stage = 6
    c.pad_latent_to_max = True
    c.uniform_prob = 0.0
    c.save_only_improve = False
    c.seed = 0
    c.resume = 0
    c.bf16 = False
    c.reset_optimizer = True
    c.global_batch_size = 128          # sequences per optimizer step (the paper: 4 GPUs x 32)
    c.gradient_accumulation_steps = 1  # micro-batch = global_batch_size / gradient_accumulation_steps
    c.num_epochs = 50
    c.lr = 1e-4
    c.weight_decay = 0.01
    c.debug = False
    # coconut_jax additions
    c.eval_batch_size = 64
    c.max_new_tokens = 0               # 0: 64 when "gsm" is in val_path, else 128 (as the reference)
    c.max_val_examples = 0             # 0: all
    c.pad_to_multiple = 32             # sequence-length buckets (few XLA programs)
    c.static_shapes = False            # pad every batch of an epoch to one shape (one program per stage)
    c.overlong = "error"               # sequences longer than the context: "error" or "skip"
    c.checkpoint_every_steps = 500     # mid-epoch checkpoints for preemption (0: only epoch ends)
    c.print_examples = 3
    c.wandb_mode = "disabled"          # "online", "offline" or "disabled"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.coordinator_address = ""
    c.num_processes = 0
    c.process_id = -1
    c.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "coconut_jax")
    # Offline dataset/model preparation (the demo): kind "" (none) or "synthetic_prosqa".
    c.prepare = ml_collections.ConfigDict({
        "kind": "", "train": 0, "valid": 0, "seed": 0, "vocab_size": 512,
        "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512,
        # Graph size, reasoning steps (equally likely; () = the published distribution) and
        # the number of distinct concept names (0 = all).
        "min_nodes": 14, "max_nodes": 28, "steps": (), "n_concepts": 0,
        # Start the model with a fact-lookup circuit instead of random weights (coconut_jax.induction).
        "induction_heads": False})
    return c


class ConfigError(ValueError):
    pass


def validate(c: ml_collections.ConfigDict) -> None:
    """Every impossible setting is one clear error, raised before anything is compiled."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(f"config: {msg}")
    need(c.method in METHODS, f"method={c.method!r} is not one of {', '.join(METHODS)}")
    need(c.overlong in OVERLONG_POLICIES, f"overlong={c.overlong!r} is not one of {OVERLONG_POLICIES}")
    need(c.wandb_mode in ("online", "offline", "disabled"), f"wandb_mode={c.wandb_mode!r} must be online, offline or disabled")
    need(c.c_thought >= 1 or c.method != "coconut", "c_thought must be >= 1 for method coconut")
    need(c.epochs_per_stage >= 1, "epochs_per_stage must be >= 1")
    need(c.max_latent_stage >= 0, "max_latent_stage must be >= 0")
    need(0.0 <= c.uniform_prob <= 1.0, "uniform_prob must be in [0, 1]")
    need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
    need(c.global_batch_size % c.gradient_accumulation_steps == 0,
         f"global_batch_size={c.global_batch_size} is not divisible by gradient_accumulation_steps={c.gradient_accumulation_steps}")
    need(0 <= c.resume <= c.num_epochs, f"resume={c.resume} must be between 0 and num_epochs={c.num_epochs}")
    need(c.lr > 0, "lr must be > 0")
    need(bool(c.val_path) or c.prepare.kind, "val_path is required")
    need(c.only_eval or bool(c.train_path) or c.prepare.kind, "train_path is required unless only_eval")
    need(not (c.only_eval and c.load_model_path in ("", "None")), "only_eval needs load_model_path")
    need(c.prepare.kind in ("", "synthetic_prosqa"), f"prepare.kind={c.prepare.kind!r} must be '' or 'synthetic_prosqa'")
    if not c.prepare.kind:
        for field in ("val_path",) + (() if c.only_eval else ("train_path",)):
            need(os.path.isfile(c[field]), f"{field}={c[field]!r}: file not found")
    if c.load_model_path not in ("", "None"):
        need(os.path.exists(c.load_model_path), f"load_model_path={c.load_model_path!r}: not found")


def from_reference_yaml(path: str) -> ml_collections.ConfigDict:
    """A reference YAML file (args/*.yaml) -> our config, unchanged in meaning."""
    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: YAML file not found")
    with open(path) as f:
        y = yaml.safe_load(f)
    if not isinstance(y, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    c = base_config()
    flags = [k for k in ("coconut", "cot", "no_thoughts", "no_cot") if y.get(k)]
    if y.get("special_token"):
        flags = ["pause_as_thought"]
    if len(flags) != 1:
        raise ConfigError(f"{path}: exactly one of coconut/cot/no_thoughts/no_cot must be true, found {flags or 'none'}")
    c.method = flags[0]
    ignored = {"coconut", "cot", "no_thoughts", "no_cot", "special_token", "local", "local_path",
               "batch_size_training"}
    for key, value in y.items():
        if key in ignored:
            continue
        if key not in c:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        c[key] = type(c[key])(value) if isinstance(c[key], (int, float)) and not isinstance(c[key], bool) else value
    c.global_batch_size = int(y["batch_size_training"]) * REFERENCE_DEVICES * int(y.get("gradient_accumulation_steps", 1))
    c.load_model_path = str(y.get("load_model_path", "None"))
    return c
