"""What README.md and docs/ print is what works: every printed command's module exists and its
arguments parse with its own parser (config files loaded, fields checked, values typed), and
every `--config.FIELD` they name is a field."""
import importlib.util
import json
import os
import subprocess
import sys

from coconut_jax import config as config_lib
from tests.conftest import ROOT, subprocess_env
from tests.doc_commands import config_fields, printed_commands

# Commands whose module is not ours to parse (the test runner itself).
NOT_PARSED = {"pytest"}


def test_the_pages_print_commands_and_the_finder_sees_them():
    found = printed_commands(ROOT)
    where = {c["where"].split(":")[0] for c in found}
    assert {"README.md", "docs/lora.md", "docs/launch.md", "docs/simcot.md"} <= where
    # Code blocks with continuations, inline spans and commands after `&&` are all found.
    words = [" ".join(c["words"] or []) for c in found]
    assert "python -m coconut_jax.train --config configs/demo.py" in words
    assert any(w.startswith("python -m coconut_jax.train --config configs/demo.py --config.name=demo-simcot")
               and w.endswith("--config.num_epochs=15") for w in words)
    assert "python -m coconut_jax.plot runs/NAME/metrics.jsonl" in words


def test_every_printed_command_exists_and_its_arguments_parse():
    found = printed_commands(ROOT)
    unparsable = [c["where"] for c in found if not c["words"]]
    assert not unparsable, f"not shell words: {unparsable}"
    missing, to_parse = [], []
    for c in found:
        words = c["words"]
        if words[1] == "-m":
            if importlib.util.find_spec(words[2]) is None:
                missing.append(f"{c['where']}: no module {words[2]}")
            elif words[2] not in NOT_PARSED and not c["needs"]:
                to_parse.append(c)
        elif not os.path.isfile(os.path.join(ROOT, words[1])):
            missing.append(f"{c['where']}: no file {words[1]}")
        elif not c["needs"]:
            to_parse.append(c)
    assert not missing, missing
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "doc_commands.py")], cwd=ROOT,
                       input=json.dumps([c["words"] for c in to_parse]), env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(to_parse), r.stdout[-2000:] + r.stderr[-2000:]
    failed = [f"{c['where']}: {' '.join(c['words'])}\n    {res['error']}"
              for c, res in zip(to_parse, results) if not res["ok"]]
    assert not failed, "\n".join(failed)


def test_every_config_field_the_pages_name_exists():
    fields = set(config_lib.flat_fields(config_lib.base_config()))
    unknown = [f"{where}: --config.{name}" for where, name in config_fields(ROOT)
               if name not in fields and not (name.startswith("no") and name[2:] in fields)]
    assert not unknown, unknown


def test_the_checker_fails_on_a_broken_command(tmp_path):
    """The parse step is not a formality: an unknown field, a flag a command lacks and a module
    that does not exist each fail."""
    bad = [["python", "-m", "coconut_jax.train", "--config", "configs/tiny.py", "--config.lrr=1"],
           ["python", "-m", "coconut_jax.export", "runs/x", "--out", "o", "--no-such-flag"],
           ["python", "-m", "coconut_jax.plan", "--config", "configs/tiny.py", "--length", "many"],
           ["python", "benchmarks/train_step.py", "--batch", "B"]]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "doc_commands.py")], cwd=ROOT,
                       input=json.dumps(bad), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [res["ok"] for res in results] == [False] * len(bad), results
    assert "did you mean" in results[0]["error"] and "--no-such-flag" in results[1]["error"]
