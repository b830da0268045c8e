"""Run configuration: defaults, validation, and the reference's YAML files.

Field names follow the reference's YAML where one exists; `method` replaces its boolean
flags (`coconut`, `cot`, `no_thoughts`, `no_cot`, `special_token`).
"""
from __future__ import annotations

import os
import sys

import ml_collections
from ml_collections import config_dict

from coconut_jax import methods
from coconut_jax.data import OVERLONG_POLICIES, STEP_RULES

# The reference's YAML files say "need 4 gpus": its batch_size_training is per GPU.
REFERENCE_DEVICES = 4


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.project = "coconut"
    c.name = "run"
    c.save_path = "runs"
    c.method = "coconut"
    c.model_id = "openai-community/gpt2"
    c.load_model_path = config_dict.placeholder(str)  # None: the weights of model_id
    c.train_path = ""
    c.val_path = ""
    c.tfds_data_dir = ""               # where tfds:NAME/SPLIT paths are read from ("": TFDS's default)
    c.only_eval = False
    c.c_thought = 1
    c.epochs_per_stage = 5
    c.max_latent_stage = 6
    c.pad_latent_to_max = True
    c.uniform_prob = 0.0
    c.step_groups = "steps"            # SIM-CoT's step targets: "brackets" (the reference's <<...>> parse) or "steps"
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
    # The optimizer beyond the reference's constant-rate AdamW (coconut_jax/optimizer.py); these
    # defaults are the reference's. Recipes trained with Hugging Face's Trainer set cosine,
    # warm-up, clipping and no decay on biases and norms (the Trainer's split).
    c.lr_schedule = "constant"         # "constant" or "cosine" (to 0 at the run's last step)
    c.warmup_ratio = 0.0               # the first ceil(ratio x steps) steps rise linearly to lr
    c.max_grad_norm = 0.0              # global gradient-norm clipping (0: none)
    c.decay_norms_and_biases = True    # False: no weight decay on biases and normalisation scales
    c.debug = False
    # coconut_jax additions
    c.eval_batch_size = 0              # rows per generation batch; 0: 64 on GPUs/TPUs, 8 on CPU (eval_rows)
    c.only_eval_loss = False           # only_eval also reports the validation loss (the reference's does not)
    c.max_new_tokens = 0               # 0: 64 when "gsm" is in val_path, else 128 (as the reference)
    c.max_val_examples = 0             # 0: all
    c.pad_to_multiple = 32             # sequence-length buckets (few XLA programs)
    c.eval_pad_to_multiple = 128       # prompt-length buckets of generation: each compiles one program
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
    # Persistent XLA compilation cache: "" = $JAX_COMPILATION_CACHE_DIR if set, else
    # {cache_dir}/xla; "none" turns it off. A restart or a chained run then compiles nothing.
    c.compilation_cache_dir = ""
    c.log_every_steps = 10             # training losses read back from the device every N steps
    c.prefetch_batches = 2             # batches collated and on the devices ahead of the step
    c.async_checkpoints = True         # write checkpoints in the background (still atomic)
    # How the model runs (numerically the same computation; memory and compile time differ).
    c.scan_layers = True               # layers as one lax.scan: compile time independent of depth
    c.remat = "none"                   # per-layer rematerialisation: "none", "dots" or "full"
    c.fused_attention = True           # jax.nn.dot_product_attention where no attention dropout applies
    c.loss_chunk = 128                 # loss over this many positions at a time (0: all logits at once)
    c.param_dtype = "float32"          # "bfloat16": params, gradients and Adam moments in bf16
    # LoRA (docs/lora.md): rank 0 trains every weight. rank > 0 freezes the base (stored in
    # param_dtype, never in a checkpoint) and trains adapters of that rank on `targets` (Hugging
    # Face module names as PEFT takes them, e.g. ("q_proj", "v_proj"); () = every projection of
    # attention and MLP), scaled by alpha / rank, with dropout on their input while training,
    # plus what the method trains beside them (Coconut: its three tokens' embedding rows) or,
    # with train_embeddings, the whole embedding and head. Defaults: alpha 32, dropout 0.1.
    c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 32.0, "dropout": 0.1, "targets": (),
                                        "train_embeddings": False})
    # The methods' own settings, `--config.<block>.<key>` (the `settings` of their records in
    # coconut_jax/methods/; read only when a method that has them runs).
    for method in methods.REGISTRY.values():
        for key, value in method.settings:
            block, name = key.split(".", 1)
            if block not in c:
                c[block] = ml_collections.ConfigDict()
            if name not in c[block]:
                c[block][name] = value
    # Offline dataset/model preparation (the demo): kind "" (none) or "synthetic_prosqa". The data,
    # like the initial weights and the order, follow `seed`.
    c.prepare = ml_collections.ConfigDict({
        "kind": "", "train": 0, "valid": 0, "vocab_size": 512,
        # The model family built (coconut_jax.models.FAMILIES: gpt2, llama, qwen2, qwen3).
        "family": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512,
        # Graph size, reasoning steps (equally likely; () = the published distribution) and
        # the number of distinct concept names (0 = all).
        "min_nodes": 14, "max_nodes": 28, "steps": (), "n_concepts": 0,
        # Start the model with a fact-lookup circuit instead of random weights (coconut_jax.demo.induction).
        "induction_heads": False})
    return c


def method_of(c) -> methods.Method:
    """The run's method record, configured with its own settings block (`Method.configure`)."""
    method = methods.get(c.method)
    return method.configure(method.values_from(c))


def small_model_on_cpu(c) -> None:
    """Settings for a model of a few layers trained on CPU (the demo, the tests): the
    memory/compile-time forms (scanned layers, XLA's fused attention, the chunked loss) cost
    15-35% per step there and save nothing that matters (docs/configuration.md, "Speed and memory settings");
    the published configs keep them."""
    c.scan_layers, c.fused_attention, c.loss_chunk = False, False, 0


def eval_rows(eval_batch_size: int, backend: str) -> int:
    """Rows per generation batch. On CPU a small batch decodes fastest: its keys/values stay
    in the processor's caches (200 ProsQA questions: 3-4 s in batches of 8, 6 s of 64);
    accelerators want wide batches."""
    return eval_batch_size or (8 if backend == "cpu" else 64)


class ConfigError(ValueError):
    pass


def normalize(c: ml_collections.ConfigDict) -> None:
    """The reference's spelling of "no checkpoint" (`load_model_path: None`, or an empty value)
    becomes None, so nothing past config loading tests for the string."""
    if c.load_model_path in ("", "None"):
        c.load_model_path = None


def validate(c: ml_collections.ConfigDict, data_files: bool = True) -> None:
    """Every impossible setting is one clear error, raised before anything is compiled
    (`normalize` first). `data_files=False` leaves the paths the run reads (data,
    `load_model_path`) unchecked: a memory plan reads neither."""
    normalize(c)
    def need(ok, msg):
        if not ok:
            raise ConfigError(f"config: {msg}")
    try:
        method = methods.get(c.method)
    except ValueError as e:
        raise ConfigError(f"config: {str(e).replace('method ', 'method=', 1)}") from None
    need(c.overlong in OVERLONG_POLICIES, f"overlong={c.overlong!r} is not one of {OVERLONG_POLICIES}")
    need(c.step_groups in STEP_RULES, f"step_groups={c.step_groups!r} is not one of {', '.join(STEP_RULES)}")
    need(c.wandb_mode in ("online", "offline", "disabled"), f"wandb_mode={c.wandb_mode!r} must be online, offline or disabled")
    if method.settings:
        try:
            method = method.configure(method.values_from(c))
        except ValueError as e:
            raise ConfigError(f"config: {e}") from None
    from coconut_jax import optimizer
    for problem in method.config_errors(c) + optimizer.config_errors(c):
        need(False, problem)
    need(c.epochs_per_stage >= 1, "epochs_per_stage must be >= 1")
    need(c.max_latent_stage >= 0, "max_latent_stage must be >= 0")
    need(0.0 <= c.uniform_prob <= 1.0, "uniform_prob must be in [0, 1]")
    need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
    need(c.global_batch_size % c.gradient_accumulation_steps == 0,
         f"global_batch_size={c.global_batch_size} is not divisible by gradient_accumulation_steps={c.gradient_accumulation_steps}")
    need(0 <= c.resume <= c.num_epochs, f"resume={c.resume} must be between 0 and num_epochs={c.num_epochs}")
    need(c.lr > 0, "lr must be > 0")
    need(c.num_epochs >= 1, f"num_epochs={c.num_epochs} must be >= 1")
    need(c.global_batch_size >= 1, f"global_batch_size={c.global_batch_size} must be >= 1")
    need(c.eval_batch_size >= 0, f"eval_batch_size={c.eval_batch_size} must be >= 0 (0: chosen by device)")
    need(c.max_new_tokens >= 0, f"max_new_tokens={c.max_new_tokens} must be >= 0 (0: the reference's default)")
    need(c.max_val_examples >= 0, f"max_val_examples={c.max_val_examples} must be >= 0 (0: all)")
    need(c.pad_to_multiple >= 1, f"pad_to_multiple={c.pad_to_multiple} must be >= 1")
    need(c.eval_pad_to_multiple >= 1, f"eval_pad_to_multiple={c.eval_pad_to_multiple} must be >= 1")
    need(c.checkpoint_every_steps >= 0, f"checkpoint_every_steps={c.checkpoint_every_steps} must be >= 0")
    need(c.log_every_steps >= 1, f"log_every_steps={c.log_every_steps} must be >= 1")
    need(c.prefetch_batches >= 1, f"prefetch_batches={c.prefetch_batches} must be >= 1")
    need(c.remat in ("none", "dots", "full"), f"remat={c.remat!r} must be none, dots or full")
    need(c.loss_chunk >= 0, f"loss_chunk={c.loss_chunk} must be >= 0 (0: unchunked)")
    need(c.param_dtype in ("float32", "bfloat16"), f"param_dtype={c.param_dtype!r} must be float32 or bfloat16")
    need(c.lora.rank >= 0, f"lora.rank={c.lora.rank} must be >= 0 (0: no LoRA)")
    need(c.lora.alpha > 0, f"lora.alpha={c.lora.alpha} must be > 0")
    need(0.0 <= c.lora.dropout < 1.0, f"lora.dropout={c.lora.dropout} must be in [0, 1)")
    from coconut_jax import files
    need(bool(c.val_path) or c.prepare.kind, "val_path is required")
    need(c.only_eval or bool(c.train_path) or c.prepare.kind, "train_path is required unless only_eval")
    need(not (c.only_eval and c.load_model_path is None), "only_eval needs load_model_path")
    need(c.prepare.kind in ("", "synthetic_prosqa"), f"prepare.kind={c.prepare.kind!r} must be '' or 'synthetic_prosqa'")
    need(not (c.prepare.kind and files.is_remote(c.save_path)),
         f"save_path={c.save_path!r}: prepare.kind={c.prepare.kind!r} builds its data and model on a local disk; "
         f"give a local save_path")
    if c.prepare.kind:
        # The prepared data and model take these fields' places: a value the user set would be
        # silently ignored (a value prepare itself wrote, when a config is used again, is not).
        from coconut_jax.demo import prepare
        made = dict(zip(("train_path", "val_path", "model_id"), prepare.prepared_paths(prepare.prepared_root(c))))
        for field, path in made.items():
            need(c[field] in ("", path), f"{field}={c[field]!r} is set, but prepare.kind={c.prepare.kind!r} "
                                         f"generates the data and model; add --config.prepare.kind= to use yours")
    from coconut_jax.models import FAMILIES
    need(c.prepare.family in FAMILIES, f"prepare.family={c.prepare.family!r} must be one of {', '.join(FAMILIES)}")
    for field in PATH_FIELDS:
        need(not files.is_remote(c[field] or "") or files.bucket_support(), f"{field}={c[field]!r}: {files.NEEDS_GCS}")
    if not c.prepare.kind and data_files:
        from coconut_jax import tfds_source
        for field in ("val_path",) + (() if c.only_eval else ("train_path",)):
            if tfds_source.is_tfds(c[field]):
                need(tfds_source.valid_path(c[field]), f"{field}={c[field]!r}: a TFDS source is written tfds:NAME/SPLIT")
            else:
                need(files.isfile(c[field]), f"{field}={c[field]!r}: file not found")
    if c.load_model_path is not None and data_files:
        need(files.exists(c.load_model_path), f"load_model_path={c.load_model_path!r}: not found")


# What may be a bucket path (`gs://`); tfds_data_dir goes through TFDS's own file access.
PATH_FIELDS = ("save_path", "train_path", "val_path", "load_model_path", "model_id", "cache_dir",
               "compilation_cache_dir")


def compilation_cache_dir(c) -> str | None:
    """Where compiled programs persist between processes (None: nowhere); see the config field."""
    if c.compilation_cache_dir == "none":
        return None
    return c.compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(c.cache_dir, "xla")


def checked(fn, *args):
    """`fn(*args)` with a ValueError (a mesh that does not fit the devices, ...) as a ConfigError."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from e


def check_batch_arithmetic(micro: int, data_devices: int, processes: int) -> None:
    """The micro-batch must split evenly over the data-parallel devices and the hosts."""
    per = f"global_batch_size / gradient_accumulation_steps = {micro}"
    if micro % data_devices:
        raise ConfigError(f"config: micro-batch ({per}) is not divisible by the {data_devices} data-parallel devices "
                          f"(mesh.data x mesh.fsdp)")
    if micro % processes:
        raise ConfigError(f"config: micro-batch ({per}) is not divisible by the {processes} processes")


def flat_fields(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field's dotted name (`lr`, `mesh.data`, `prepare.n_embd`, ...)."""
    out = []
    for k, v in c.items():
        out += flat_fields(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [prefix + k]
    return out


def unknown_field_message(name: str, c: ml_collections.ConfigDict) -> str:
    """One line for a `--config.NAME` that is not a field, with the nearest valid names."""
    import difflib
    near = difflib.get_close_matches(name, flat_fields(c), n=1, cutoff=0.5)
    hint = f"; did you mean --config.{near[0]}?" if near else "; see configs/ or coconut_jax/config.py for the fields"
    return f"config: unknown field --config.{name}{hint}"


# SIM-CoT's YAML (its repository's Coconut/args/gsm_simcot*.yaml): the keys it adds, and the
# 8 GPUs its published run used (batch_size_training 8 -> 64, SPEC-SIMCOT §5).
SIMCOT_YAML_KEYS = {"coconutgpt", "mode", "explain_mode", "w_prompt", "training_method", "train_or_eval",
                    "packing", "loss_level", "use_prj", "format_pseudo_thought", "visualize_jsonl", "wandb"}
SIMCOT_REFERENCE_DEVICES = 8


def _simcot_yaml(path: str, y: dict) -> tuple[str, str, int]:
    """(method, step_groups, devices) of a SIM-CoT YAML; what we do not implement is refused."""
    unsupported = [(k, y[k]) for k, ok in (("explain_mode", "v1_aug"), ("mode", "coconutgpt_same_word_embedding"),
                                          ("training_method", "full")) if k in y and y[k] != ok]
    unsupported += [(k, y[k]) for k in ("packing", "use_prj", "format_pseudo_thought", "w_prompt") if y.get(k)]
    unsupported += [("loss_level", y["loss_level"])] if y.get("loss_level") not in (None, "sequence_level") else []
    if unsupported or not y.get("coconut") or any(y.get(k) for k in ("cot", "no_thoughts", "no_cot")):
        what = ", ".join(f"{k}={v!r}" for k, v in unsupported) or "on a file without coconut: True"
        raise ConfigError(f"{path}: SIM-CoT setting(s) {what} not supported (method=simcot implements explain_mode "
                          f"v1_aug, mode coconutgpt_same_word_embedding, training_method full on Coconut)")
    return "simcot", "brackets", SIMCOT_REFERENCE_DEVICES


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
    # All four false: the reference trains a plain LM on the Coconut sequences (markers and
    # latent tokens, rows from `<<`, no feedback), which is pause as thought.
    if y.get("special_token") or not flags:
        flags = ["pause_as_thought"]
    if len(flags) != 1:
        raise ConfigError(f"{path}: at most one of coconut/cot/no_thoughts/no_cot may be true, found {', '.join(flags)}")
    c.method = flags[0]
    devices = REFERENCE_DEVICES
    ignored = {"coconut", "cot", "no_thoughts", "no_cot", "special_token", "local", "local_path",
               "batch_size_training"}
    if y.get("explain_mode"):
        c.method, c.step_groups, devices = _simcot_yaml(path, y)
        ignored |= SIMCOT_YAML_KEYS
    for key, value in y.items():
        if key in ignored:
            continue
        if key not in c:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        c[key] = type(c[key])(value) if isinstance(c[key], (int, float)) and not isinstance(c[key], bool) else value
    c.global_batch_size = int(y["batch_size_training"]) * devices * int(y.get("gradient_accumulation_steps", 1))
    c.load_model_path = str(y.get("load_model_path", "None"))
    normalize(c)
    return c


def _config_file_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path.py` or `path.py:argument` -> the file's get_config() (as `--config` reads it)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    # The evaluation configs build on their training configs (`from configs import gsm`):
    # the folder holding `configs/` must be importable from any working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.append(root)
    module_spec = importlib.util.spec_from_file_location("coconut_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def check_overrides(argv: list[str]) -> None:
    """Before absl parses the flags: the config file exists and every `--config.NAME` is a field."""
    spec = _config_file_arg(argv)
    if spec is None:
        return
    c = load_config_file(spec)
    fields = set(flat_fields(c))
    for a in argv:
        if a.startswith("--config.") and a != "--config.":
            name = a[len("--config."):].split("=", 1)[0]
            if name not in fields and not (name.startswith("no") and name[2:] in fields):  # --config.noflag
                raise ConfigError(unknown_field_message(name, c))


def parse_argv(argv: list[str], flag_values=None) -> list[str]:
    """Parses the command line into `flag_values` (absl's global FLAGS by default), every
    mistake a ConfigError: a missing config file, an unknown field, a value of the wrong type."""
    from absl import flags
    flag_values = flags.FLAGS if flag_values is None else flag_values
    check_overrides(argv)
    try:
        return flag_values(argv)
    except flags.Error as e:
        raise ConfigError(f"config: {e}") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every mistake as one line on stderr and exit code 2."""
    try:
        return parse_argv(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
