"""The demo's offline data and model: a generated ProsQA-style set and a small GPT-2.

Built under `{run_dir}/prepared/` by process 0, and rebuilt whenever the settings that made
it (`prepare.*`, `seed`) change; `settings.json`, written last, says what the files were made
from, so an interrupted build is redone too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax

from coconut_jax import hosts, tiny
from coconut_jax.demo import induction
from coconut_jax.files import write_atomic

SETTINGS = "settings.json"


def prepared_root(c) -> str:
    """Where a run's prepared data and model live."""
    return os.path.abspath(os.path.join(c.save_path, c.name, "prepared"))


def prepared_paths(root: str) -> tuple[str, str, str]:
    return os.path.join(root, "prosqa_train.json"), os.path.join(root, "prosqa_valid.json"), os.path.join(root, "model")


def _settings(c) -> dict:
    return {"prepare": json.loads(json.dumps(c.prepare.to_dict())), "seed": c.seed}


def _is_current(root: str, settings: dict) -> bool:
    path = os.path.join(root, SETTINGS)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f) == settings


def build(c, root: str) -> None:
    from data_prep import prosqa_generator
    from data_prep.common import write_json
    p = c.prepare
    train, valid, model_dir = prepared_paths(root)
    if os.path.isdir(root):
        shutil.rmtree(root)
    graph = prosqa_generator.GraphConfig(min_nodes=p.min_nodes, max_nodes=p.max_nodes, n_concepts=p.n_concepts)
    if p.steps:
        graph = dataclasses.replace(graph, steps_distribution=tuple((int(s), 1.0) for s in p.steps))
    records = prosqa_generator.generate(p.train, seed=c.seed * 1000, g=graph)
    write_json(records, train)
    write_json(prosqa_generator.generate(p.valid, seed=c.seed * 1000 + 1, g=graph), valid)
    tiny.build(tiny.record_texts(records), model_dir, vocab_size=p.vocab_size, n_layer=p.n_layer,
               n_embd=p.n_embd, n_head=p.n_head, n_positions=p.n_positions, seed=c.seed,
               wire=induction.wire_induction_heads if p.induction_heads else None, family=p.family)
    write_atomic(os.path.join(root, SETTINGS), json.dumps(_settings(c), indent=1) + "\n")
    print(f"built {model_dir}")


def prepare_synthetic(c) -> None:
    """Makes (or reuses) the prepared data and model, and points `c` at them."""
    root = prepared_root(c)
    if jax.process_index() == 0 and not _is_current(root, _settings(c)):
        build(c, root)
    hosts.barrier("demo_prepared")  # the other hosts read what host 0 wrote
    c.train_path, c.val_path, c.model_id = prepared_paths(root)
