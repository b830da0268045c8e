"""The method seam: methods are records in a registry, and nothing outside methods/ asks a
method's name what it does."""
import os
import re

import pytest

from coconut_jax import config as config_lib, methods
from coconut_jax.methods.base import Method
from tests.conftest import ROOT


REFERENCE = ("coconut", "cot", "no_thoughts", "no_cot", "pause_as_thought")


def test_registry_holds_the_reference_methods_in_order_then_the_others():
    assert methods.NAMES == REFERENCE + ("codi", "codi_simcot", "simcot")
    assert all(methods.get(n).name == n for n in methods.NAMES)
    with pytest.raises(ValueError, match="method 'latent' is not one of coconut, cot, no_thoughts, no_cot, "
                                         "pause_as_thought, codi, codi_simcot, simcot"):
        methods.get("latent")


def test_what_each_reference_method_declares():
    """SPEC §3's flags, as the records say them."""
    latent = {n for n in REFERENCE if methods.get(n).latent_tokens}
    assert latent == {"coconut", "pause_as_thought"}
    assert [n for n in REFERENCE if methods.get(n).feedback] == ["coconut"]
    assert {n for n in REFERENCE if not methods.get(n).staged} == {"cot", "no_cot"}
    assert not any(methods.get(n).parts or methods.get(n).step_targets for n in REFERENCE)
    assert methods.get("no_thoughts").thoughts_per_step(3) == 0 and methods.get("coconut").thoughts_per_step(3) == 3
    assert methods.carries_latent_tokens("coconut") and not methods.carries_latent_tokens("cot")
    assert not methods.carries_latent_tokens(None) and not methods.carries_latent_tokens("from_a_newer_version")


def test_no_module_outside_methods_compares_method_names():
    """Every decision a method makes is read from its record (the seam a new method plugs into)."""
    # Caught on the code before the seam: `c.method == "coconut"`, `method in LATENT_METHODS`,
    # `self.method in ("cot", "no_cot")`, `source_method in ...`.
    pattern = re.compile(r"\w*method\w*\s*(==|!=|\bnot in\b|\bin\b)\s*[\"'(\[A-Z]")
    found = []
    for folder in ("coconut_jax", "benchmarks"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            if os.path.join("coconut_jax", "methods") in dirpath:
                continue
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    for i, line in enumerate(open(path, encoding="utf-8"), 1):
                        if pattern.search(line):
                            found.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not found, found


def test_a_new_method_is_one_record(monkeypatch, tmp_path):
    """A method registered beside the others is validated, scheduled and turned into sequences
    by the same code, with no other module touched."""
    mine = Method(name="every_other_epoch", summary="test", latent_tokens=True, feedback=True, needs_c_thought=True)
    monkeypatch.setitem(methods.REGISTRY, mine.name, mine)
    c = config_lib.base_config()
    data_file = tmp_path / "d.json"
    data_file.write_text("[]")
    c.train_path = c.val_path = str(data_file)
    c.method = mine.name
    config_lib.validate(c)
    c.c_thought = 0
    with pytest.raises(config_lib.ConfigError, match="c_thought must be >= 1 for method every_other_epoch"):
        config_lib.validate(c)
    cur = methods.Curriculum(mine.name, c_thought=2, max_latent_stage=2, epochs_per_stage=1)
    assert (cur.markers, cur.feedback, cur.thoughts_per_step, cur.stage(1)) == (True, True, 2, 1)
