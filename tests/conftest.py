import os
import shutil
import subprocess
import sys
import time

# The suite's programs run a few steps each: XLA's backend optimisation and its fusion emitters
# cost more compile time than they save there (a tiny CLI run, cold: 47 s by default, 33 s at
# optimisation level 0, 23 s without the emitters too). In-process programs and every
# subprocess compile that way; only a test that trains for minutes asks for XLA's defaults
# (run_cli(..., optimize=True): the short demo trains at 2.6 steps/s at level 0, 5 by default).
# The user's flags and the probe's answer are kept in the environment: the workers of a parallel
# run inherit the XLA_FLAGS this module sets, not the user's.
os.environ.setdefault("COCONUT_TESTS_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
_USER_XLA_FLAGS = os.environ["COCONUT_TESTS_USER_XLA_FLAGS"]


def _fast_compile_flags():
    """The compile-time flags this XLA accepts (it aborts on a flag it does not know, and a
    newer release may drop one)."""
    flags = "--xla_backend_optimization_level=0"
    emitters = "--xla_cpu_use_fusion_emitters=false"
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": emitters})
    return f"{flags} {emitters}" if probe.returncode == 0 else flags


if "COCONUT_TESTS_FAST_COMPILE" not in os.environ:
    os.environ["COCONUT_TESTS_FAST_COMPILE"] = _fast_compile_flags()
_FAST_COMPILE = os.environ["COCONUT_TESTS_FAST_COMPILE"].split()


def xla_flags(devices=None, optimize=False):
    """XLA_FLAGS for a subprocess: the user's, `devices` host devices, fast compilation or not."""
    flags = [_USER_XLA_FLAGS]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if not optimize:
        flags += _FAST_COMPILE
    return " ".join(f for f in flags if f)


def subprocess_env(devices=None, optimize=False):
    """The environment of a test's subprocess: this one's, on the CPU, with xla_flags()."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices, optimize)}


os.environ["XLA_FLAGS"] = xla_flags()

import jax  # noqa: E402
import pytest

from coconut_jax.metrics import read_metrics

jax.config.update("jax_enable_x64", False)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

SAMPLE_RECORDS = [
    {"question": "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or zumpus?",
     "steps": ["Alex is a wumpus.", "Every wumpus is a yumpus."], "answer": "Alex is a yumpus."},
    {"question": "Tom has 3 apples and buys 2 more. How many?", "steps": ["<<3+2=5>>"], "answer": "5"},
    {"question": "Sara had 1,200 coins and spent 200. How many are left?",
     "steps": ["<<1200-200=1000>>", "<<1000*1=1000>>", "<<1000+0=1000>>"], "answer": "1,000"},
    {"question": "What is 7 times 6?", "steps": [], "answer": "42"},
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny GPT-2 + byte-level BPE tokenizer in HF format, built offline."""
    from coconut_jax import tiny
    texts = tiny.record_texts(SAMPLE_RECORDS) * 20
    return tiny.build(texts, str(tmp_path_factory.mktemp("models") / "tiny"), vocab_size=400,
                      n_layer=2, n_embd=64, n_head=4, n_positions=128, seed=1)


def shared_file(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} not present (reference data is not part of the repository)")
    return path


# The CLI runs of the suite share one persistent XLA compilation cache: restarts, chained runs and
# the same tiny shapes in several tests compile once. A cached program is the program, so every
# comparison (resume == uninterrupted, 8 devices == 1) is unchanged.
XLA_CACHE = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def session_dir(tmp_path_factory):
    """The test session's own temporary directory: in a parallel run (pytest-xdist), the one
    its workers share (each worker's base directory is inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name, build):
    """`tmp/name`, filled by `build(path)` once per test session: in a parallel run the first
    worker to ask builds it while the other waits, then both use it. Only for what tests read
    and never change."""
    from filelock import FileLock
    path = session_dir(tmp_path_factory) / name
    with FileLock(f"{path}.lock"):
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed build left
            path.mkdir()
            build(path)
            (path / ".built").touch()
    return path


@pytest.fixture(scope="session", autouse=True)
def _xla_cache(tmp_path_factory):
    # One cache for both workers of a parallel run: a program one worker compiled (the tiny
    # config's, in many tests) the other loads. JAX does not lock the directory (eviction is
    # off), but an entry read while it is being written fails to decompress, and JAX then warns
    # and compiles: a race costs a compilation, never a wrong program.
    path = session_dir(tmp_path_factory) / "xla_cache"
    path.mkdir(exist_ok=True)
    XLA_CACHE["JAX_COMPILATION_CACHE_DIR"] = str(path)


# The slowest test first: in a parallel run (`-n 2`) the other worker takes the rest meanwhile.
FIRST = ("tests/test_demo.py::test_demo_runs_end_to_end_and_learns",)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of training, several processes or many CLI runs; "
                                       "the quick loop is `python -m pytest -q -m \"not slow\"`")
    config.addinivalue_line("markers", "gcs: runs against a local Cloud Storage emulator (the gcs_bucket fixture)")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid not in FIRST)


# Runs the rest of its command line pinned to one of the cores it may use: XLA's CPU thread pool
# then has one thread on any machine, so the run computes the same floats whatever the core
# count, and it shares the cores with a parallel suite without oversubscribing them. (Pinning in
# the child itself, before exec: a preexec_fn would run Python between fork and exec of a
# multithreaded process.)
ONE_CORE = ("import os, sys; os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1]); "
            "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


def cli_command(save_path, *overrides, env=None, config="configs/tiny.py", devices=None, optimize=False, pin=False):
    """(command, environment) of `python -m coconut_jax.train` on a config of the repository (on
    `devices` host devices; with XLA's default optimisations when `optimize`; on one core when `pin`)."""
    cmd = [sys.executable, *(("-c", ONE_CORE) if pin else ()), "-m", "coconut_jax.train", "--config",
           os.path.join(ROOT, config), f"--config.save_path={save_path}", f"--config.cache_dir={save_path}/cache",
           *overrides]
    return cmd, {**subprocess_env(devices, optimize), **XLA_CACHE, **(env or {})}


def run_cli(save_path, *overrides, env=None, check=True, popen=False, capture=False, config="configs/tiny.py",
            devices=None, optimize=False, pin=False):
    """`cli_command` run in a subprocess (waited for, unless `popen`)."""
    cmd, full_env = cli_command(save_path, *overrides, env=env, config=config, devices=devices, optimize=optimize,
                                pin=pin)
    if popen:
        out = subprocess.PIPE if capture else subprocess.DEVNULL
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=out, text=capture)
    r = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr[-3000:])
    return r


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """configs/tiny.py trained once (3 epochs: CoT, then 1 and 2 thoughts); its run directory."""
    return os.path.join(built_once(tmp_path_factory, "tiny_run", run_cli), "tiny")


def run_notebook(name: str, monkeypatch, **env) -> list:
    """Executes notebooks/`name` top to bottom on CPU with `env` set; its code cells' outputs
    (none of them an error)."""
    import nbclient
    import nbformat
    for k, v in {**env, "JAX_PLATFORMS": "cpu"}.items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


LORA = ("--config.lora.rank=4", "--config.lr=1e-2")


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """configs/tiny.py with LoRA rank 4 (dropout 0.1), 3 epochs, a checkpoint every 2 steps; its
    run directory."""
    path = built_once(tmp_path_factory, "lora_run", lambda p: run_cli(p, *LORA, "--config.checkpoint_every_steps=2"))
    return path / "tiny"


# Logged figures that measure the machine, not the run: they differ between any two runs.
TIMING_KEYS = ("train/tokens_per_s", "train/mfu")


def assert_first_epochs_match(ref_dir, got_dir, epochs=2, tol=1e-5):
    """The run in `got_dir` logged what the reference run logged in its first `epochs`: the same
    events with the same fields (a field one of them lacks fails), and every figure within
    `tol` (all but TIMING_KEYS)."""
    ref = [e for e in read_metrics(os.path.join(ref_dir, "metrics.jsonl")) if e["epoch"] <= epochs]
    got = read_metrics(os.path.join(got_dir, "metrics.jsonl"))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        keys = set(a) - set(TIMING_KEYS)
        assert keys == set(b) - set(TIMING_KEYS), (sorted(keys ^ (set(b) - set(TIMING_KEYS))), a, b)
        for k in keys:
            assert abs(a[k] - b[k]) <= tol, (k, a, b)


def stored_params(run_dir):
    """The params of a run's latest checkpoint, as NumPy."""
    import numpy as np
    from coconut_jax import checkpoint
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return jax.tree.map(np.asarray, checkpoint.load_params(ckpt_dir, checkpoint.steps(ckpt_dir)[-1]))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(save_path, *overrides, config, n=2):
    """The command in `n` local processes of one distributed run (one device each)."""
    port = free_port()
    return [run_cli(save_path, *overrides, f"--config.coordinator_address=127.0.0.1:{port}",
                    f"--config.num_processes={n}", f"--config.process_id={i}", config=config, popen=True, capture=True)
            for i in range(n)]


def finish_processes(procs) -> list[str]:
    """Each process's stdout, once all have exited 0; else every failing one's stderr (the first
    to fail is often not the one that reports it: its peers time out waiting for it)."""
    outs = [p.communicate(timeout=600) for p in procs]
    failed = [f"process {i} exited {p.returncode}:\n{err[-3000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return [out for out, _ in outs]


GCS_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """"gs://coconut-test": a bucket on a local Cloud Storage emulator (tests/gcs_emulator.py) that
    lives as long as this test process, with the two variables a user sets for an emulator
    (GCS_VARIABLES) set here and so in every subprocess. Each test takes its own prefix."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"  # a file: a full pipe would stop the emulator
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), "coconut-test"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    import socket
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, f"the emulator did not start: {log_path.read_text()[-2000:]}"
            assert time.time() < deadline, "the emulator did not answer within 30 s"
            time.sleep(0.1)
    old = {k: os.environ.get(k) for k in GCS_VARIABLES}
    os.environ.update({k: f"http://127.0.0.1:{port}" for k in GCS_VARIABLES})
    yield "gs://coconut-test"
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def config_and_params(w):
    """(config, params) of a `weights.load` result."""
    return w.config, w.params
