"""Training and evaluation entry point.

    python -m coconut_jax.train --config configs/prosqa.py [--config.field=value ...]
    python -m coconut_jax.train --config configs/yaml.py:path/to/reference_args.yaml

The command composes the run's parts: the runtime (hosts, compilation cache), the run
directory (`run.open_run`), the demo's prepared data when the config asks for it, the weights,
state and data (`run.build_run`), then the epochs (`loop.fit`) or one evaluation
(`evaluate.Evaluator`).
"""
from __future__ import annotations

import os
import sys

import jax

from coconut_jax import (checkpoint, config as config_lib, data, evaluate, files, hf, latent_vocab, loop, rundir,
                         sharding)
from coconut_jax.demo import prepare
from coconut_jax.run import Run, build_run, open_run


def set_up(c, writes: bool = True) -> Run:
    """A run of config `c`, built and at its start (resumed from its own checkpoint if it has
    one). `writes=False` loads it for inspection: nothing claimed, logged or saved."""
    config_lib.validate(c)
    start_distributed(c)
    use_compilation_cache(c)
    ctx = open_run(c, writes=writes)
    if c.prepare.kind:
        prepare.prepare_synthetic(c)  # after the claim: it writes into the run's directory
    return build_run(ctx)


def run_config(c) -> tuple[Run, dict]:
    """What the command does with a config: the run trained to `num_epochs` (or evaluated once
    with `only_eval`). Returns the run and its last evaluation."""
    run = set_up(c)
    evaluator = evaluate.Evaluator(run, loop.progress_bar(run.ctx.main))
    if c.only_eval:
        return run, evaluator(run.cur.stage(c.resume), eval_loss=c.only_eval_loss)
    return run, loop.fit(run, evaluator)


def start_distributed(c) -> None:
    """The multi-host runtime, with a wrong `JAX_*` variable or setting as one line."""
    try:
        sharding.maybe_initialize_distributed(c.coordinator_address, c.num_processes, c.process_id)
    except KeyError as e:
        raise config_lib.ConfigError(f"distributed start-up: environment variable {e.args[0]} is not set") from e
    except ValueError as e:
        raise config_lib.ConfigError(f"distributed start-up: {e}") from e


def use_compilation_cache(c) -> None:
    """Turns on the persistent XLA cache (`compilation_cache_dir`); called before anything compiles."""
    cache = config_lib.compilation_cache_dir(c)
    if not cache:
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # Every program, not only those over JAX's default 1 s: a restart compiles nothing.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def quiet_libraries():
    """Orbax logs every checkpoint step at INFO through absl; keep the console to our own
    progress unless the user asked for more with --verbosity."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv):
    from absl import flags
    run_config(flags.FLAGS.config)


def cli():
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configuration file (configs/*.py)", lock_config=True)
    flags.mark_flags_as_required(["config"])

    def run(argv):
        quiet_libraries()
        try:
            main(argv)
        except (config_lib.ConfigError, data.DataError, hf.CheckpointError, latent_vocab.LatentVocabError,
                rundir.RunDirError, checkpoint.CheckpointFault) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except files.WriteError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Without waiting for background writers (a checkpoint write that failed leaves
            # Orbax threads that wait minutes on one another): what is on disk is already whole.
            os._exit(2)
    app.run(run, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    cli()
