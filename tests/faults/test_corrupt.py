"""Corrupt data: a peer that serves wrong bytes. Every bad piece is caught by its checksum before it
touches the tensors (so before it is announced or used), fetched again from an honest peer, and the bad
peer is excluded as a source; the result is byte-identical. With no honest holder, the fetch fails with
StallError in bounded time and the wrong bytes are still never loaded."""

from __future__ import annotations

import pytest

from swarm.errors import StallError
from tests.faults.harness import (
    CorruptTcp,
    FetchRun,
    WatchedTcp,
    closing,
    leecher_node,
    peers_of,
    seed_node,
    wrong_bytes,
)


@pytest.mark.timeout(60)
def test_bad_peer_is_caught_refetched_and_excluded() -> None:
    bad_transport = CorruptTcp(lambda piece: piece % 2 == 0)
    with closing() as nodes:
        good = seed_node(rate_cap=8e6)  # the honest seed is the slower one: the bad one gets asked a lot
        nodes.append(good)
        bad = seed_node(transport=bad_transport)
        nodes.append(bad)
        watch = WatchedTcp()
        leecher = leecher_node(transport=watch, peers=peers_of(good, bad))
        nodes.append(leecher)
        run = FetchRun(leecher).start().wait(45)
        assert run.error is None, run.error
        assert bad_transport.corrupted >= 1
        assert watch.bad_checksums >= 1
        assert watch.wrong_loaded == 0
        assert wrong_bytes(dict(leecher.tensors)) == 0
        stats = leecher.scheduler.peer_stats(bad.id)
        # Every piece the bad seed handed over intact was kept; each corrupt one counted as a failure,
        # and past max_failures_per_peer the peer is excluded (never asked again).
        assert stats.failures == watch.bad_checksums
        if watch.bad_checksums > leecher.scheduler.config.max_failures_per_peer:
            assert stats.excluded
        assert run.report is not None and run.report.total_bytes == leecher.manifest.total_bytes


@pytest.mark.timeout(60)
def test_no_honest_holder_fails_with_stall_and_loads_nothing_wrong() -> None:
    corrupt_piece = 5
    with closing() as nodes:
        bad = seed_node(transport=CorruptTcp(lambda piece: piece == corrupt_piece))
        nodes.append(bad)
        watch = WatchedTcp()
        leecher = leecher_node(transport=watch, peers=peers_of(bad), discovery_timeout_s=2.0)
        nodes.append(leecher)
        run = FetchRun(leecher).start().wait(30)
        assert isinstance(run.error, StallError), run.error
        assert run.error.missing == [corrupt_piece]
        assert run.seconds < leecher.config.discovery_timeout_s + 5
        assert watch.wrong_loaded == 0
        piece = leecher.manifest.pieces[corrupt_piece]
        views = leecher.manifest.piece_views(leecher.transport.views, corrupt_piece)
        assert all(int(v.count_nonzero()) == 0 for v in views), "a corrupt piece reached the tensors"
        assert piece.length > 0
