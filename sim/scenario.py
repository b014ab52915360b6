"""Scenarios (who arrives when, with which links, who fails) and the lower bound of each.

A scenario is plain data: `NodeSpec` per node, the piece sizes, the one-way message latency. The
strategies (sim.engine for the swarm, sim.baselines for naive/binomial/chain) all run the same
`Scenario` object, so their times compare.

Scenarios (`SCENARIOS`), for N receivers:

- ``together``: one seed, N receivers arrive at t = 0, every link the same bandwidth B both ways.
- ``staggered``: as ``together``, but receiver i arrives at ``i * stagger * T / N`` (T = one model
  copy over one link, M / B; ``stagger`` defaults to 2: arrivals spread over two copy times).
- ``hetero``: as ``together``, but each receiver's link (up and down) is B with probability 1/2 and
  ``B * slow`` otherwise (``slow`` defaults to 1/5); the seed's link is B.
- ``seedfail``: two seeds; the first fails at 0.3 T (its links and pending messages vanish; its peers
  notice one latency later).
- ``multiseed``: four seeds, N receivers at t = 0.

Calibrations (`CALIBRATIONS`): ``h200`` is the 4 x H200 host of DESIGN.md (366 GB/s per link, 16 GB
model, 20 us control latency); ``cluster`` is a typical GPU cluster over RDMA (50 GB/s per GPU, 140 GB
model, 50 us). The piece size defaults to 1/1000 of the model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeSpec:
    up: float  # upload bandwidth, bytes/s
    down: float  # download bandwidth, bytes/s
    arrive: float = 0.0  # seconds
    seed: bool = False  # holds the whole model from the start
    fail_at: float | None = None  # the node dies at this time


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[NodeSpec, ...]
    piece_sizes: tuple[int, ...]
    latency: float  # one-way control/data latency, seconds
    bandwidth: float  # the reference link bandwidth B
    params: dict[str, float] = field(default_factory=dict)

    @property
    def model_bytes(self) -> int:
        return sum(self.piece_sizes)

    @property
    def receivers(self) -> int:
        return sum(1 for n in self.nodes if not n.seed)

    @property
    def seeds(self) -> int:
        return sum(1 for n in self.nodes if n.seed)


@dataclass(frozen=True)
class Calibration:
    bandwidth: float
    model_bytes: int
    latency: float


CALIBRATIONS: dict[str, Calibration] = {
    "h200": Calibration(bandwidth=366e9, model_bytes=16 * 10**9, latency=20e-6),
    "cluster": Calibration(bandwidth=50e9, model_bytes=140 * 10**9, latency=50e-6),
}

SCENARIOS = ("together", "staggered", "hetero", "seedfail", "multiseed")


def piece_sizes(model_bytes: int, pieces: int) -> tuple[int, ...]:
    """`pieces` pieces of ceil(model/pieces) bytes, the last one shorter (as a manifest cuts them)."""
    c = -(-model_bytes // pieces)
    sizes = [c] * (model_bytes // c)
    if model_bytes % c:
        sizes.append(model_bytes % c)
    return tuple(sizes)


def build(
    name: str,
    receivers: int,
    *,
    model_bytes: int,
    pieces: int,
    bandwidth: float,
    latency: float,
    seed: int = 0,
    stagger: float = 2.0,
    slow: float = 0.2,
) -> Scenario:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    rng = random.Random(seed)
    B = bandwidth
    T = model_bytes / B
    n_seeds = {"seedfail": 2, "multiseed": 4}.get(name, 1)
    nodes = []
    for s in range(n_seeds):
        fail = 0.3 * T if (name == "seedfail" and s == 0) else None
        nodes.append(NodeSpec(up=B, down=B, seed=True, fail_at=fail))
    for i in range(receivers):
        bw = B
        if name == "hetero" and rng.random() >= 0.5:
            bw = B * slow
        arrive = i * stagger * T / receivers if name == "staggered" else 0.0
        nodes.append(NodeSpec(up=bw, down=bw, arrive=arrive))
    params = {"stagger": stagger} if name == "staggered" else {"slow": slow} if name == "hetero" else {}
    return Scenario(name, tuple(nodes), piece_sizes(model_bytes, pieces), latency, B, params)


def binomial_pipeline_bound(n: int, k: int, c: float, b: float) -> float:
    """(k + ceil(log2(N+1)) - 1) * c / B: one seed, N receivers, k pieces of c bytes, links of B."""
    return (k + math.ceil(math.log2(n + 1)) - 1) * c / b


def lower_bound(sc: Scenario) -> float:
    """A lower bound on the time by which every receiver holds the model.

    For one seed, receivers all at t = 0 and homogeneous links (up = down = B, no failures) it is the
    binomial-pipeline bound of `binomial_pipeline_bound`, with c the mean piece size. Otherwise it is
    the largest of these necessary conditions (each valid, together not always tight):

    - every receiver i must download the model: ``arrive_i + M / down_i``;
    - every byte must leave some seed once: the first t with ``sum_s up_s * min(t, fail_s) >= M``;
    - with everyone present from t = 0, the N * M bytes received must have been uploaded:
      ``N * M / sum(up)``;
    - with homogeneous links and one seed (staggered), the binomial-pipeline bound still holds:
      later arrivals can only make things slower.
    """
    M = sc.model_bytes
    k = len(sc.piece_sizes)
    recv = [n for n in sc.nodes if not n.seed]
    seeds = [n for n in sc.nodes if n.seed]
    if not recv:
        return 0.0
    homogeneous = all(n.up == sc.bandwidth and n.down == sc.bandwidth for n in sc.nodes)
    no_fail = all(n.fail_at is None for n in sc.nodes)
    bounds = [max(n.arrive + M / n.down for n in recv)]
    if homogeneous and len(seeds) == 1 and no_fail:
        bounds.append(binomial_pipeline_bound(len(recv), k, M / k, sc.bandwidth))
    # seeds' egress, allowing for seeds that fail
    events = sorted(((n.fail_at if n.fail_at is not None else math.inf), n.up) for n in seeds)
    rate = sum(u for _, u in events)
    t, sent = 0.0, 0.0
    for f, u in events:
        if rate > 0 and sent + rate * (f - t) >= M:
            break
        sent += rate * (f - t)
        t = f
        rate -= u
    bounds.append(t + (M - sent) / rate if rate > 0 else math.inf)
    if all(n.arrive == 0 for n in recv) and no_fail:
        bounds.append(len(recv) * M / sum(n.up for n in sc.nodes))
    return max(bounds)
