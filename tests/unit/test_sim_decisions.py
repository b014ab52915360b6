"""A fence around what the scheduler decides: seeded simulations must give the same decision streams.

Speed-ups of the scheduler or the simulator's engine (issue 11) must not change a single decision:
the simulator's figures in docs/simulation.md, and the node's behaviour, rest on these rules. Each case
runs a seeded simulation with every `Scheduler` wrapped so that it records, per node, every event fed in
(with its time and arguments) and every non-empty list of decisions that came out, in order; the test
compares a digest of that stream, and the simulation's result, with what the code produced when the
fence was set (commit 744aee6, before the speed-ups).

Queries (`wants_tick`, `next_timeout`, `has`, ...) and ticks that decide nothing are not recorded, so
the engine may call them more or less often. If a change of decisions is intended (a better rule), say
so in the commit and in docs/simulation.md, and update the digests here with the new figures.

The cases cover the scenarios of the simulator (a random peer graph needs N > 17 with degree 16), a
seed failure (peer_left, refusals, cancels), and short request timeouts (rule 7, exclusions), at sizes
that keep the file to a few seconds.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

import sim.engine
from sim.scenario import CALIBRATIONS, build
from swarm.scheduler import Scheduler, SchedulerConfig

H200 = CALIBRATIONS["h200"]

#: Event methods: what goes in. Their arguments and results are recorded.
EVENTS = (
    "peer_joined",
    "peer_left",
    "peer_bitfield_mask",
    "peer_have",
    "peer_have_mask",
    "peer_handed_out",
    "piece_received",
    "piece_failed",
    "tick",
    "upload_requested",
    "upload_finished",
    "upload_cancelled",
)


def _recording(log: list[Any]) -> type[Scheduler]:
    """A Scheduler that appends (node, method, args, decisions) for every event it is fed."""

    class Recording(Scheduler):
        pass

    def wrap(name: str) -> Any:
        method = getattr(Scheduler, name)

        def call(self: Scheduler, *args: Any) -> Any:
            out = method(self, *args)
            # a tick that decides nothing is no event: the engine may tick more or less often
            if name != "tick" or out:
                decisions = tuple(out) if isinstance(out, list) else None
                log.append((id(self), name, args, decisions))
            return out

        return call

    for name in EVENTS:
        setattr(Recording, name, wrap(name))
    return Recording


CASES: dict[str, dict[str, Any]] = {
    "together": dict(scenario="together", n=24, pieces=120),
    "staggered": dict(scenario="staggered", n=20, pieces=80),
    "hetero": dict(scenario="hetero", n=20, pieces=80),
    "seedfail": dict(scenario="seedfail", n=20, pieces=80),
    "multiseed": dict(scenario="multiseed", n=20, pieces=80),
    # request timeouts near a piece's time: rule 7 cancels (73 timeouts), peers excluded (12 times)
    "timeouts": dict(
        scenario="together",
        n=20,
        pieces=80,
        config=SchedulerConfig(request_timeout_s=8e-3, timeout_factor=0.5, max_failures_per_peer=2),
    ),
}


def _stream(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, tuple[Any, ...]]:
    log: list[Any] = []
    monkeypatch.setattr(sim.engine, "Scheduler", _recording(log))
    sc = build(
        case["scenario"],
        case["n"],
        model_bytes=H200.model_bytes,
        pieces=case["pieces"],
        bandwidth=H200.bandwidth,
        latency=H200.latency,
        seed=1,
    )
    s = sim.engine.SwarmSim(sc, seed=1, config=case.get("config"))
    res = s.run()
    index = {id(n.sched): n.idx for n in s.nodes}  # ids are not stable across runs; node indices are
    h = hashlib.sha256()
    for sched, name, args, decisions in log:
        h.update(repr((index[sched], name, args, decisions)).encode())
    # not res.events: the engine may skip or merge its own events without changing a decision
    summary = (res.time_s, res.unfinished, res.pieces_moved, res.duplicates, res.cancels, res.refusals)
    return h.hexdigest()[:16], len(log), summary


#: digest of the stream, its length, and (time_s, unfinished, moved, duplicates, cancels, refusals)
EXPECTED: dict[str, tuple[str, int, tuple[Any, ...]]] = {
    "hetero": ("365598ba3af641e9", 57129, (0.24166491164639894, 0, 1601, 1, 131, 7925)),
    "multiseed": ("4d1a189a1d1aacdf", 41530, (0.05389423960435326, 0, 1601, 1, 123, 2209)),
    "seedfail": ("2f1c1df68cd8e3d8", 43119, (0.05762542795916885, 0, 1602, 2, 130, 4063)),
    "staggered": ("7d79bc850874e7f7", 30172, (0.12696068023182178, 0, 1601, 1, 122, 52)),
    "timeouts": ("66453bfd1d6db3a9", 61390, (0.08150596120945956, 0, 1602, 1, 204, 10861)),
    "together": ("ddd002829780ccbd", 79752, (0.057915183380414945, 0, 2885, 5, 174, 7390)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_simulation_decides_as_before(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _stream(CASES[name], monkeypatch)
    assert got == EXPECTED[name]
