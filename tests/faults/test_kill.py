"""Members that die or freeze mid-transfer: SIGKILL, SIGSTOP, and a data plane that stops mid-piece.

- a seed SIGKILLed while leechers pull from it: they finish from the remaining peers, byte-identical,
  no byte counted twice; with no holder left, fetch raises StallError within its deadline;
- a peer frozen (SIGSTOP) mid-piece costs at most `peer_timeout_s`; a peer whose data stops mid-piece
  while its control plane still answers costs at most `io_timeout_s`;
- leechers SIGKILLed mid-transfer, repeatedly: the seed frees every channel, thread and socket tied to
  them within `peer_timeout_s` and keeps serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from swarm.errors import StallError
from swarm.node import Node
from tests.faults.harness import (
    SIZE,
    FetchRun,
    Members,
    PacedTcp,
    WatchedTcp,
    closing,
    leecher_node,
    member_args,
    peers_of,
    progress,
    resources,
    seed_node,
    status_of,
    swarm_threads,
    tcp_of,
    wait_for_member,
    wrong_bytes,
)
from tests.loopback import free_port, wait_until

RATE = 3e6  # bytes/s per seed process: a fetch of SIZE takes a few seconds, so faults land mid-transfer


def _dropped_at(node: Node, peer_id: str, timeout: float) -> float:
    return wait_until(lambda: peer_id not in node._peers, timeout, f"{node.id} to drop {peer_id}", step=0.01)


def _instance(port: int) -> str:
    st = status_of(port)
    assert st is not None
    return str(st["instance"])


def _two_paced_seeds(members: Members) -> tuple[list[int], list[subprocess.Popen[bytes]], str]:
    """Two paced seed processes, both answering; the instance id of the first (the one to fault)."""
    ports = [free_port(), free_port()]
    seeds = [members.paced_seed(p, RATE, name=f"seed{i}") for i, p in enumerate(ports)]
    for p, proc in zip(ports, seeds, strict=True):
        wait_for_member(p, proc)
    return ports, seeds, _instance(ports[0])


@pytest.mark.timeout(120)
def test_seed_sigkill_leechers_finish_from_the_other_seed(members: Members) -> None:
    ports, seeds, victim = _two_paced_seeds(members)
    with closing() as nodes:
        watches = [WatchedTcp() for _ in range(2)]
        leechers = [leecher_node(transport=w, peers=peers_of(*ports)) for w in watches]
        nodes.extend(leechers)
        runs = [FetchRun(n).start() for n in leechers]
        wait_until(
            lambda: all(n.status()["from"].get(victim, 0) > 0 for n in leechers), 30, "pieces from the victim"
        )
        os.kill(seeds[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        recovery = max(_dropped_at(n, victim, 10) for n in leechers) - killed
        for run in runs:
            run.wait(60)
            assert run.error is None, run.error
            # every byte counted once: the report includes the dead seed's share, duplicates are not counted
            assert run.report is not None and run.report.total_bytes == run.node.manifest.total_bytes
            assert run.report.bytes_by_peer.get(victim, 0) > 0
            assert run.node.bytes_in == run.node.manifest.total_bytes
        for n, w in zip(leechers, watches, strict=True):
            assert w.wrong_loaded == 0 and wrong_bytes(dict(n.tensors)) == 0
    # A dead process's sockets are closed by its kernel: the loss shows as a broken data channel at once.
    assert recovery < 2.0, recovery


@pytest.mark.timeout(60)
def test_last_holder_sigkilled_fetch_raises_stall_within_deadline(members: Members) -> None:
    port = free_port()
    proc = members.paced_seed(port, RATE)
    wait_for_member(port, proc)
    with closing(leecher_node(transport=WatchedTcp(), peers=peers_of(port), discovery_timeout_s=2.0)) as (n,):
        run = FetchRun(n).start()
        wait_until(lambda: progress(n) > 0.1, 30, "some progress")
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        run.wait(30)
        assert isinstance(run.error, StallError), run.error
        assert run.error.missing and "missing" in str(run.error)
        assert run.ended is not None and run.ended - killed < n.config.discovery_timeout_s + 2.0
        assert isinstance(n.transport, WatchedTcp) and n.transport.wrong_loaded == 0


@pytest.mark.timeout(120)
def test_sigstopped_seed_costs_at_most_peer_timeout(members: Members) -> None:
    ports, seeds, victim = _two_paced_seeds(members)
    with closing(leecher_node(transport=WatchedTcp(), peers=peers_of(*ports), peer_timeout_s=2.0)) as (n,):
        run = FetchRun(n).start()
        wait_until(lambda: n.status()["from"].get(victim, 0) > 0, 30, "pieces from the victim")
        wait_until(lambda: n.scheduler.in_flight().get(victim), 10, "a request in flight to the victim")
        os.kill(seeds[0].pid, signal.SIGSTOP)  # pieces trickle in 16 KiB chunks: this lands mid-piece
        stopped = time.monotonic()
        cost = _dropped_at(n, victim, 20) - stopped
        run.wait(60)
        assert run.error is None, run.error
        assert wrong_bytes(dict(n.tensors)) == 0
    os.kill(seeds[0].pid, signal.SIGCONT)
    # Silence is noticed by the next housekeeping round (every 0.25 s) after peer_timeout_s.
    assert cost <= n.config.peer_timeout_s + 0.5, cost


@pytest.mark.timeout(60)
def test_sigstopped_last_holder_fails_within_deadline(members: Members) -> None:
    port = free_port()
    proc = members.paced_seed(port, RATE)
    wait_for_member(port, proc)
    cfg = {"peer_timeout_s": 2.0, "discovery_timeout_s": 2.0}
    with closing(leecher_node(transport=WatchedTcp(), peers=peers_of(port), **cfg)) as (n,):
        run = FetchRun(n).start()
        wait_until(lambda: progress(n) > 0.1, 30, "some progress")
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        run.wait(30)
        assert isinstance(run.error, StallError), run.error
        assert run.ended is not None
        # dropped after peer_timeout_s, then its pieces are held by no live peer for discovery_timeout_s
        assert run.ended - stopped < cfg["peer_timeout_s"] + cfg["discovery_timeout_s"] + 1.5
    os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_data_plane_frozen_mid_piece_costs_at_most_io_timeout() -> None:
    """The seed's control plane keeps answering (pings, haves) but its bytes stop half-way through a
    piece: only the data channel's own timeout can see it."""
    frozen = PacedTcp(RATE)
    with closing() as nodes:
        a = seed_node(transport=frozen)
        b = seed_node(transport=PacedTcp(RATE))
        nodes += [a, b]
        n = leecher_node(peers=peers_of(a, b), io_timeout_s=2.0)
        nodes.append(n)
        try:
            run = FetchRun(n).start()
            wait_until(lambda: n.status()["from"].get(a.id, 0) > 0, 30, "pieces from a")
            frozen.frozen.set()
            t0 = time.monotonic()
            # The piece being sent when the freeze began still completes; the next one stops half-way.
            wait_until(lambda: a.id not in n._peers, 20, "the leecher to give up on a")
            cost = time.monotonic() - t0
            run.wait(60)
        finally:
            frozen.released.set()
        assert run.error is None, run.error
        assert wrong_bytes(dict(n.tensors)) == 0
    # io_timeout_s after the last byte, plus at most one piece still sent in full (256 KiB at RATE).
    assert cost <= 2.0 + (256 << 10) / RATE + 1.0, cost


def _seed_resources_settled(seed: Node) -> bool:
    t = tcp_of(seed)
    return not seed._peers and not t._senders and not t._receivers  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_leechers_sigkilled_repeatedly_seed_frees_everything(members: Members) -> None:
    # Slow enough (2 MB/s shared) that neither leecher can finish before the later one has started; they
    # do not --exit, so one that finished early stays connected until killed.
    with closing(seed_node(rate_cap=2e6, peer_timeout_s=2.0)) as (seed,):
        baseline_threads = swarm_threads()
        baseline = resources()
        for round_ in range(2):
            procs = [
                members.start(
                    "fetch",
                    *member_args(SIZE),
                    "--peers",
                    peers_of(seed),
                    "--quiet",
                    name=f"l{round_}{i}",
                )
                for i in range(2)
            ]
            wait_until(
                lambda: len(seed.status()["to"]) >= 2 and seed.bytes_out > 0, 60, "both leechers pulling"
            )
            wait_until(lambda: seed.scheduler._serving, 10, "uploads running")  # mid-transfer
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
            for p in procs:
                p.wait(10)
            wait_until(
                lambda: _seed_resources_settled(seed), seed.config.peer_timeout_s + 3, "the seed to free them"
            )
            assert not seed.scheduler._serving and not seed.scheduler._queue
            wait_until(lambda: swarm_threads() == baseline_threads, 5, "the seed's threads to end")
        # still serving, at its capped rate
        with closing(leecher_node(peers=peers_of(seed))) as (n,):
            run = FetchRun(n).start().wait(30)
            assert run.error is None, run.error
            assert wrong_bytes(dict(n.tensors)) == 0
        after = resources()
        assert after.fds <= baseline.fds + 4, (baseline, after)
        assert threading.active_count() < 64
