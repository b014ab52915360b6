"""The strategies the swarm is compared with, modelled directly (they need no scheduler).

- ``naive``: every receiver pulls the whole model from the first seed, as SGLang's and the proposed
  vLLM remote-instance loaders do. The seed's uplink is shared max-min fair among the receivers
  pulling at the moment (each also capped by its own downlink). If that seed fails, the receivers
  still pulling start over from the next live seed.
- ``binomial``: a doubling tree: every node that holds the model (the seeds, then each receiver once
  it is done) serves one waiting receiver at a time, whole model per hop, at ``min(up, down)``;
  receivers are served in order of arrival. A transfer whose sender fails starts over.
- ``chain``: a pipelined chain broadcast: seed -> r1 -> r2 -> ... in order of arrival, piece by
  piece; a node forwards piece j once it holds it and has finished forwarding piece j - 1 (one
  latency per hop). Failures are not modelled (None is reported: a chain breaks).

Each returns the per-receiver completion times (None: never), in the order of the scenario's
receivers.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from sim.scenario import NodeSpec, Scenario


def _receivers(sc: Scenario) -> list[NodeSpec]:
    return [n for n in sc.nodes if not n.seed]


def _water_fill(capacity: float, caps: np.ndarray) -> np.ndarray:
    """Max-min fair shares of `capacity` among flows each capped by `caps`."""
    c = np.sort(caps)
    k = len(c)
    before = np.concatenate(([0.0], np.cumsum(c)[:-1]))
    share = (capacity - before) / (k - np.arange(k))
    over = np.flatnonzero(c > share)
    level = share[over[0]] if over.size else math.inf
    return np.minimum(caps, level)


def naive(sc: Scenario) -> list[float | None]:
    recv = _receivers(sc)
    seeds = [n for n in sc.nodes if n.seed]
    M = float(sc.model_bytes)
    n = len(recv)
    arrive = np.array([r.arrive for r in recv])
    down = np.array([r.down for r in recv])
    remaining = np.full(n, M)
    done: list[float | None] = [None] * n
    seed_i = 0
    t = 0.0
    started = np.zeros(n, dtype=bool)
    finished = np.zeros(n, dtype=bool)
    while seed_i < len(seeds):
        seed = seeds[seed_i]
        fail = seed.fail_at if seed.fail_at is not None else math.inf
        while True:
            active = np.flatnonzero(started & ~finished)
            pending = arrive[~started]
            next_arrival = pending.min() if pending.size else math.inf
            if not active.size:
                if next_arrival == math.inf:
                    return done
                t = max(t, next_arrival)
                started |= arrive <= t
                continue
            # max-min share of the seed's uplink among the active receivers, each capped by its downlink
            rates = _water_fill(seed.up, down[active])
            ttc = remaining[active] / rates
            dt = min(ttc.min(), next_arrival - t, fail - t)
            remaining[active] -= rates * dt
            t += dt
            if t >= fail:
                break
            for j in active[remaining[active] <= M * 1e-12]:
                finished[j] = True
                done[j] = t + sc.latency
            started |= arrive <= t
            if finished.all():
                return done
        # the seed failed: the unfinished start over from the next seed
        remaining[~finished] = M
        seed_i += 1
    return done


def binomial(sc: Scenario) -> list[float | None]:
    recv = _receivers(sc)
    M = float(sc.model_bytes)
    lat = sc.latency
    done: list[float | None] = [None] * len(recv)
    # receivers waiting for a server: (not before, arrival order, index)
    waiting = [(r.arrive, i, i) for i, r in enumerate(recv)]
    heapq.heapify(waiting)
    # servers: (time free, key, up bandwidth, fail time)
    free: list[tuple[float, int, float, float]] = []
    for s, n in enumerate(sc.nodes):
        if n.seed:
            heapq.heappush(free, (0.0, -1 - s, n.up, n.fail_at if n.fail_at is not None else math.inf))
    while free and waiting:
        t_free, key, up, fail = heapq.heappop(free)
        if t_free >= fail:
            continue  # that server is dead
        not_before, order, i = heapq.heappop(waiting)
        start = max(t_free, not_before)
        if start >= fail:
            heapq.heappush(waiting, (not_before, order, i))
            continue
        end = start + lat + M / min(up, recv[i].down)
        if end > fail:  # the sender dies mid-copy: the receiver starts over when it notices
            heapq.heappush(waiting, (fail + lat, order, i))
            continue
        done[i] = end
        heapq.heappush(free, (end, key, up, fail))
        heapq.heappush(free, (end, i, recv[i].up, math.inf))
    return done


def chain(sc: Scenario) -> list[float | None] | None:
    if any(n.fail_at is not None for n in sc.nodes):
        return None
    recv = _receivers(sc)
    seed = next(n for n in sc.nodes if n.seed)
    sizes = np.array(sc.piece_sizes, dtype=float)
    order = sorted(range(len(recv)), key=lambda i: (recv[i].arrive, i))
    done: list[float | None] = [None] * len(recv)
    prev = np.zeros(len(sizes))  # when the previous node holds each piece (the seed: at 0)
    prev_up = seed.up
    for i in order:
        r = recv[i]
        rate = min(prev_up, r.down)
        s = sizes / rate
        # t_j = s_j + max(a_j, t_{j-1}) with a_j = max(prev_j + latency, arrive): a max-plus scan
        a = np.maximum(prev + sc.latency, r.arrive)
        cs = np.cumsum(s)
        u = np.maximum.accumulate(a - (cs - s))
        t = u + cs
        done[i] = float(t[-1])
        prev, prev_up = t, r.up
    return done
