"""A ProsQA-style dataset generator (the construction of the Coconut paper, appendix A).

    python -m data_prep.prosqa_generator --out data/synth --train 5000 --valid 300 --test 500 --seed 0

A random DAG grows from nodes {0, 1}; each new node draws a Poisson number of parents, with
probability 0.35 only among nodes not descending from node 1, with probability 0.35 only
among nodes not descending from node 0, else among all nodes, each parent weighted by
`1.5 * depth + 1` (favouring long chains). Nodes without parents are people, the others
made-up concepts. Node 0 is the person asked about; the answer is a leaf reachable from
node 0 only, at a distance drawn from the published step-count distribution, the distractor a leaf reachable from node 1 only. The steps are the facts on a
shortest path from the person to the answer. Records keep the graph fields of the
published files (`idx_to_symbol`, `edges`, `root`, `target`, `neg_target`).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import itertools
import os

import numpy as np

from data_prep.common import write_json

PEOPLE = ("Alex Bob Davis Fae Gary Jack Max Polly Rex Sally Sam Stella Tom Wren Zoe Ada Ben Cara Dan Eve Finn "
          "Gus Hana Ivan Jill Kai Lena Milo Nora Otto").split()
_ONSETS = "b br d f g gl j k l m n p r s sc scr sh sl st t tr v w y z".split()
_RIMES = "umpus impus orpus empus ompus erpus ampus"
CONCEPTS = tuple(o + r for r in _RIMES.split() for o in _ONSETS)


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    min_nodes: int = 14
    max_nodes: int = 28
    mean_parents: float = 1.8
    depth_weight: float = 1.5
    side_prob: float = 0.35
    # Number of reasoning steps (shortest person->answer path), drawn first and then met by
    # rejection: the published sets have 3: 41%, 4: 43%, 5: 14%, 6: 2%.
    steps_distribution: tuple[tuple[int, float], ...] = ((3, 0.41), (4, 0.43), (5, 0.14), (6, 0.02))
    n_concepts: int = 0  # draw concept names from the first n of CONCEPTS only (0: all of them)


def _weighted_sample(rng: np.random.Generator, weights: list[float], k: int) -> list[int]:
    """`rng.choice(len(weights), size=k, replace=False, p=weights / sum)`: the same draws from
    `rng` and the same indices, in the same order (numpy's algorithm: draw the missing ones
    against the cumulative weights of those not yet chosen, keep first occurrences, repeat), in
    plain Python, because for pools of a few dozen numpy's per-call overhead dominated the
    generator. Bit-equal whenever the weights' sum does not depend on the order of the additions,
    as for these weights (multiples of 1/2); tests/test_data_prep.py checks it against numpy."""
    total = sum(weights)
    p = [w / total for w in weights]
    found: list[int] = []
    while len(found) < k:
        x = rng.random(k - len(found)).tolist()
        for i in found:
            p[i] = 0.0
        cdf = list(itertools.accumulate(p))
        last = cdf[-1]
        cdf = [c / last for c in cdf]
        new: list[int] = []
        for xi in x:
            j = bisect.bisect_right(cdf, xi)
            if j not in new:
                new.append(j)
        found.extend(new)
    return found


def _grow(rng: np.random.Generator, n: int, g: GraphConfig):
    parents: list[list[int]] = [[], []]
    depth = [0, 0]
    from0, from1 = {0}, {1}  # nodes descending from (or equal to) node 0 / node 1
    for v in range(2, n):
        r = rng.random()
        if r < g.side_prob:
            pool = [u for u in range(v) if u not in from1]
        elif r < 2 * g.side_prob:
            pool = [u for u in range(v) if u not in from0]
        else:
            pool = list(range(v))
        k = min(int(rng.poisson(g.mean_parents)), len(pool))
        chosen: list[int] = []
        if k:
            w = [g.depth_weight * depth[u] + 1 for u in pool]
            chosen = sorted(pool[i] for i in _weighted_sample(rng, w, k))
        parents.append(chosen)
        depth.append(1 + max(depth[p] for p in chosen) if chosen else 0)
        if any(p in from0 for p in chosen):
            from0.add(v)
        if any(p in from1 for p in chosen):
            from1.add(v)
    return parents, from0, from1


def distances(children, src) -> dict[int, int]:
    """Breadth-first distance (in edges) from `src` of every node it reaches."""
    dist = {src: 0}
    queue = collections.deque([src])
    while queue:
        u = queue.popleft()
        for c in children[u]:
            if c not in dist:
                dist[c] = dist[u] + 1
                queue.append(c)
    return dist


def record_children(record: dict) -> list[list[int]]:
    """Children of each node of a record's graph (its `edges` over `idx_to_symbol`)."""
    children: list[list[int]] = [[] for _ in record["idx_to_symbol"]]
    for p, c in record["edges"]:
        children[p].append(c)
    return children


def _shortest_paths(children, src, dst):
    """(length, number of shortest paths, one shortest path) from src to dst."""
    dist, count, prev = {src: 0}, {src: 1}, {}
    queue = collections.deque([src])
    while queue:
        u = queue.popleft()
        for c in children[u]:
            if c not in dist:
                dist[c], count[c], prev[c] = dist[u] + 1, count[u], u
                queue.append(c)
            elif dist[c] == dist[u] + 1:
                count[c] += count[u]
    path = [dst]
    while path[-1] != src:
        path.append(prev[path[-1]])
    return dist[dst], count[dst], path[::-1]


def generate_one(rng: np.random.Generator, g: GraphConfig = GraphConfig()) -> dict:
    lengths, probs = zip(*g.steps_distribution)
    pool = CONCEPTS[:g.n_concepts] if g.n_concepts else CONCEPTS
    want = int(rng.choice(lengths, p=np.array(probs) / sum(probs)))
    while True:
        n = int(rng.integers(g.min_nodes, g.max_nodes + 1))
        parents, from0, from1 = _grow(rng, n, g)
        children = [[] for _ in range(n)]
        for v, ps in enumerate(parents):
            for p in ps:
                children[p].append(v)
        people = [v for v in range(n) if not parents[v]]
        concepts = [v for v in range(n) if parents[v]]
        leaves = [v for v in concepts if not children[v]]
        dist0 = distances(children, 0)
        targets = [v for v in leaves if v in from0 and v not in from1 and dist0[v] == want]
        negatives = [v for v in leaves if v in from1 and v not in from0]
        if targets and negatives and len(people) <= len(PEOPLE) and len(concepts) <= len(pool):
            break
    target, neg = int(rng.choice(targets)), int(rng.choice(negatives))
    names: dict[int, str] = {}
    for v, name in zip(people, rng.permutation(PEOPLE)[:len(people)]):
        names[v] = str(name)
    for v, name in zip(concepts, rng.permutation(pool)[:len(concepts)]):
        names[v] = str(name)

    def fact(p, c):
        return f"{names[p]} is a {names[c]}." if not parents[p] else f"Every {names[p]} is a {names[c]}."

    edges = [(p, c) for c in range(n) for p in parents[c]]
    facts = [fact(p, c) for p, c in (edges[i] for i in rng.permutation(len(edges)))]
    _, _, path = _shortest_paths(children, 0, target)
    options = [names[target], names[neg]]
    if rng.random() < 0.5:
        options.reverse()
    person = names[0]
    # Symbols are listed in a shuffled order, as in the published files.
    order = [int(i) for i in rng.permutation(n)]
    index = {v: i for i, v in enumerate(order)}
    return {
        "question": " ".join(facts) + f" Is {person} a {options[0]} or {options[1]}?",
        "steps": [fact(a, b) for a, b in zip(path, path[1:])],
        "answer": f"{person} is a {names[target]}.",
        "idx_to_symbol": [names[v] for v in order],
        "edges": [[index[p], index[c]] for p, c in edges],
        "root": index[0], "target": index[target], "neg_target": index[neg],
    }


def generate(n: int, seed: int, g: GraphConfig = GraphConfig()) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [generate_one(rng, g) for _ in range(n)]


def graph_statistics(records: list[dict]) -> dict[str, float]:
    """Mean nodes, edges, shortest-path length and number of shortest paths (root -> target)."""
    nodes, edges, lengths, counts = [], [], [], []
    for r in records:
        length, count, _ = _shortest_paths(record_children(r), r["root"], r["target"])
        nodes.append(len(r["idx_to_symbol"])), edges.append(len(r["edges"])), lengths.append(length), counts.append(count)
    return {"nodes": float(np.mean(nodes)), "edges": float(np.mean(edges)),
            "shortest_path": float(np.mean(lengths)), "shortest_paths": float(np.mean(counts))}


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate a ProsQA-style dataset")
    p.add_argument("--out", required=True, help="output folder (prosqa_{split}.json)")
    p.add_argument("--train", type=int, default=17886)
    p.add_argument("--valid", type=int, default=300)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for i, (split, n) in enumerate((("train", a.train), ("valid", a.valid), ("test", a.test))):
        records = generate(n, seed=a.seed * 1000 + i)
        write_json(records, os.path.join(a.out, f"prosqa_{split}.json"))
        print(f"  {split} statistics: {graph_statistics(records)}")


if __name__ == "__main__":
    main()
