"""Soak: 50 rounds of leechers joining and leaving one long-lived seed process on loopback.

Each round, one leecher fetches the whole model and leaves politely, and one leaves (closes) in the middle
of its fetch; every tenth round, a leecher process is SIGKILLed mid-transfer as well. The seed is a
separate `swarm seed` process, so its open file descriptors, threads and resident memory are read from
/proc without the test's own. Bound (after round 5 as the baseline, the seed idle again at the end):
at most +4 fds, +2 threads and +32 MB RSS, i.e. no growth per round (50 rounds would show any leak of a
socket, a thread or a piece buffer per leecher).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from swarm.errors import FetchError
from tests.faults.harness import (
    SIZE,
    FetchRun,
    Members,
    Resources,
    leecher_node,
    member_args,
    peers_of,
    resources,
    status_of,
    wait_for_member,
    wrong_bytes,
)
from tests.loopback import free_port, wait_until

ROUNDS = int(os.environ.get("SWARM_SOAK_ROUNDS", "50"))
WARMUP = 5
BOUND = {"fds": 4, "threads": 2, "rss_mb": 32.0}


def _idle(port: int) -> bool:
    st = status_of(port)
    return st is not None and st["peers"] == 0 and st["up_Bps"] == 0


def _one_round(members: Members, port: int, r: int, kill: bool) -> tuple[float, bool, Resources]:
    """One leecher fetches everything, one leaves mid-fetch, and (if `kill`) a leecher process is
    SIGKILLed mid-transfer. Returns the full fetch's time, whether the other left early, and the
    seed's resources while both leechers were connected."""
    peers = peers_of(port)
    victim = None
    if kill:
        victim = members.start("fetch", *member_args(SIZE), "--peers", peers, "--quiet", name=f"victim{r}")
    full, part = leecher_node(peers=peers), leecher_node(peers=peers)
    try:
        runs = [FetchRun(full).start(), FetchRun(part).start()]
        wait_until(lambda: part._held_bytes > 0 or runs[1].ended, 30, "the leaving leecher to start")
        during = resources(members.procs[0].pid)
        threading.Thread(target=part.close, daemon=True).start()  # leaves mid-fetch
        runs[0].wait(60)
        runs[1].wait(30)
        assert runs[0].error is None, runs[0].error
        assert wrong_bytes(dict(full.tensors)) == 0
    finally:
        full.close()
        part.close()
    if victim is not None:
        proc = victim
        wait_until(lambda: proc.poll() is not None or _victim_pulling(port), 60, "the victim to pull")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return runs[0].seconds, isinstance(runs[1].error, FetchError), during


def soak(members: Members, rounds: int = ROUNDS, *, kill_every: int = 10) -> dict[str, object]:
    """Run the soak; returns the seed's resources (baseline, peak, end) and what the rounds did."""
    assert not members.procs, "the seed must be the first process of `members`"
    port = free_port()
    seed = members.start(
        "seed", *member_args(SIZE), "--port", str(port), "--rate-cap", "40MB", name="soak-seed"
    )
    wait_for_member(port, seed)
    baseline: Resources | None = None
    peak = resources(seed.pid)
    left = killed = 0
    worst = 0.0
    for r in range(rounds):
        kill = bool(kill_every) and r % kill_every == kill_every - 1
        seconds, left_early, during = _one_round(members, port, r, kill)
        worst = max(worst, seconds)
        left += left_early
        killed += kill
        peak = Resources(
            max(peak.fds, during.fds), max(peak.threads, during.threads), max(peak.rss_mb, during.rss_mb)
        )
        if r == WARMUP - 1:
            wait_until(lambda: _idle(port), 15, "the seed to be idle")
            baseline = resources(seed.pid)
    wait_until(lambda: _idle(port), 15, "the seed to be idle")
    time.sleep(0.5)
    end = resources(seed.pid)
    assert seed.poll() is None, members.log(seed)
    assert baseline is not None
    return {
        "baseline": baseline,
        "peak": peak,
        "end": end,
        "rounds": rounds,
        "completed": rounds,
        "left_mid_fetch": left,
        "killed": killed,
        "worst_fetch_s": worst,
    }


def _victim_pulling(port: int) -> bool:
    st = status_of(port)
    return st is not None and st["up_Bps"] > 0


def within_bound(result: dict[str, object]) -> bool:
    base, end = result["baseline"], result["end"]
    assert isinstance(base, Resources) and isinstance(end, Resources)
    return (
        end.fds <= base.fds + BOUND["fds"]
        and end.threads <= base.threads + BOUND["threads"]
        and end.rss_mb <= base.rss_mb + BOUND["rss_mb"]
    )


@pytest.mark.timeout(240)
def test_soak_seed_resources_stay_bounded(members: Members) -> None:
    result = soak(members)
    print(
        f"\nsoak: {result['rounds']} rounds, {result['completed']} full fetches, "
        f"{result['left_mid_fetch']} left mid-fetch, {result['killed']} SIGKILLed; seed "
        f"{result['baseline']} after warm-up, peak {result['peak']}, end {result['end']}"
    )
    assert result["completed"] == result["rounds"]
    assert within_bound(result), result
