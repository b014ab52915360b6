"""Run strategies on scenarios and shape the results as records (one per strategy and N)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from sim import baselines
from sim.engine import SwarmSim
from sim.scenario import Scenario, build, lower_bound
from swarm.scheduler import SchedulerConfig

STRATEGIES = ("naive", "binomial", "chain", "swarm")


@dataclass
class Record:
    strategy: str
    scenario: str
    nodes: int  # receivers
    seeds: int
    pieces: int
    model_bytes: int
    bandwidth: float
    time_s: float | None  # when the last receiver is done (None: not modelled; inf: never)
    lower_bound_s: float
    ratio: float | None  # time_s / lower_bound_s
    mean_load_s: float | None  # mean over receivers of (done - arrival)
    one_copy_s: float  # M / B: one model over one link
    copies: float | None  # time_s / one_copy_s
    unfinished: int
    stalled_pieces: list[int]
    sim_cpu_s: float  # CPU seconds the simulation took

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _summarise(
    strategy: str, sc: Scenario, done: list[float | None] | None, cpu: float, stalled: list[int] | None = None
) -> Record:
    lb = lower_bound(sc)
    one = sc.model_bytes / sc.bandwidth
    recv = [n for n in sc.nodes if not n.seed]
    if done is None:
        t = None
        mean = None
        unfinished = 0
    else:
        unfinished = sum(1 for d in done if d is None)
        t = math.inf if unfinished else max(done, default=0.0)  # type: ignore[type-var]
        loads = [d - r.arrive for d, r in zip(done, recv, strict=True) if d is not None]
        mean = sum(loads) / len(loads) if loads else None
    return Record(
        strategy=strategy,
        scenario=sc.name,
        nodes=len(recv),
        seeds=sc.seeds,
        pieces=len(sc.piece_sizes),
        model_bytes=sc.model_bytes,
        bandwidth=sc.bandwidth,
        time_s=t,
        lower_bound_s=lb,
        ratio=(t / lb if t is not None and lb > 0 else None),
        mean_load_s=mean,
        one_copy_s=one,
        copies=(t / one if t is not None else None),
        unfinished=unfinished,
        stalled_pieces=stalled or [],
        sim_cpu_s=cpu,
    )


def run_one(
    strategy: str,
    sc: Scenario,
    *,
    seed: int = 0,
    degree: int = 16,
    config: SchedulerConfig | None = None,
) -> Record:
    t0 = time.process_time()
    stalled: list[int] = []
    if strategy == "swarm":
        res = SwarmSim(sc, seed=seed, degree=degree, config=config).run()
        done: list[float | None] | None = res.done_at
        stalled = res.stalled_pieces
    elif strategy == "naive":
        done = baselines.naive(sc)
    elif strategy == "binomial":
        done = baselines.binomial(sc)
    elif strategy == "chain":
        done = baselines.chain(sc)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return _summarise(strategy, sc, done, time.process_time() - t0, stalled)


def run_grid(
    strategies: Sequence[str],
    scenario: str,
    nodes: Sequence[int],
    *,
    model_bytes: int,
    pieces: int,
    bandwidth: float,
    latency: float,
    seed: int = 0,
    degree: int = 16,
    config: SchedulerConfig | None = None,
    stagger: float = 2.0,
    slow: float = 0.2,
    jobs: int = 1,
) -> list[Record]:
    """Every strategy at every N, in that order. ``jobs > 1`` runs them in that many processes (each
    simulation is one sequential loop; a grid of them is what a multi-core machine can share out)."""
    tasks = []
    for n in nodes:
        sc = build(
            scenario,
            n,
            model_bytes=model_bytes,
            pieces=pieces,
            bandwidth=bandwidth,
            latency=latency,
            seed=seed,
            stagger=stagger,
            slow=slow,
        )
        tasks += [(s, sc) for s in strategies]
    if jobs <= 1 or len(tasks) <= 1:
        return [run_one(s, sc, seed=seed, degree=degree, config=config) for s, sc in tasks]
    # the longest runs first, so that they do not start last and hold up the grid
    order = sorted(range(len(tasks)), key=lambda i: -_cost(*tasks[i]))
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futures = {i: ex.submit(run_one, *tasks[i], seed=seed, degree=degree, config=config) for i in order}
        return [futures[i].result() for i in range(len(tasks))]


def _cost(strategy: str, sc: Scenario) -> float:
    """A rough relative cost: the swarm simulation is per node and piece, the baselines are cheap."""
    return len(sc.nodes) * len(sc.piece_sizes) * (1000 if strategy == "swarm" else 1)
