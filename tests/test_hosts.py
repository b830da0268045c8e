"""hosts.barrier lets a host arrive late to a collective: gloo alone gives up after 30 s."""
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, free_port, subprocess_env

LATE_S = 40

SCRIPT = textwrap.dedent("""
    import sys, time
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from coconut_jax import hosts, sharding
    port, pid, use_barrier = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    jax.devices()  # the backend's start is itself a wait for every host
    if pid == 1:
        time.sleep(%d)  # host 1 is slow to load its weights
    if use_barrier:
        hosts.barrier("test")
    print(multihost_utils.process_allgather(np.int32(pid)).tolist())
""" % LATE_S)


@pytest.mark.slow
def test_a_host_late_by_more_than_gloos_deadline_passes_the_barrier():
    env = subprocess_env()
    runs = {}
    for use_barrier in ("1", "0"):  # both pairs at once: one wait
        port = str(free_port())
        runs[use_barrier] = [subprocess.Popen([sys.executable, "-c", SCRIPT, port, str(pid), use_barrier], cwd=ROOT,
                                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                             for pid in range(2)]
    with_barrier, without = runs["1"], runs["0"]
    out = [p.communicate(timeout=300) for p in with_barrier]
    assert [p.returncode for p in with_barrier] == [0, 0], [err[-2000:] for _, err in out]
    assert [o.splitlines()[-1] for o, _ in out] == ["[0, 1]"] * 2
    # The control: the same lag without the barrier fails, so the check above can fail. Its
    # hosts are stopped once host 0 reports it (each would wait minutes for the other to leave).
    said = ""
    for line in without[0].stderr:  # ends when host 0 exits, whatever happened
        said += line
        if "DEADLINE_EXCEEDED" in line:
            break
    for p in without:
        p.kill()
        p.communicate()
    assert "DEADLINE_EXCEEDED" in said, said[-2000:]
