"""Batched events into the scheduler: a bitfield delta (`peer_have_mask`) is the same as one `peer_have` a
piece, and the holder counts a leecher keeps only for the pieces it misses (until it is complete) still
answer `availability` exactly for every piece.

Two schedulers of the same seed are driven through the same random program; one hears of haves a piece
at a time, the other in batches. Every decision, every count and every answer must match.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.scheduler import HandedOut, Request, Scheduler, SchedulerConfig, Serve

PEERS = ("a", "b", "c")


def brute_availability(s: Scheduler, piece: int) -> int:
    """What availability(piece) must be: live, non-excluded peers that hold it and did not fail it."""
    bit = 1 << piece
    return sum(
        1
        for p in s.peers
        if not s.peer_stats(p).excluded and s._peers[p].mask & bit and not s._peers[p].bad & bit
    )


def check_counts(s: Scheduler) -> None:
    for piece in range(s.num_pieces):
        assert s.availability(piece) == brute_availability(s, piece), piece


program = st.lists(
    st.one_of(
        st.tuples(st.just("have"), st.sampled_from(PEERS), st.sets(st.integers(0, 11), max_size=6)),
        st.tuples(st.just("bitfield"), st.sampled_from(PEERS), st.sets(st.integers(0, 11))),
        st.tuples(st.just("receive"), st.integers(0, 100), st.none()),
        st.tuples(st.just("fail"), st.integers(0, 100), st.sampled_from(("bad_checksum", "refused"))),
        st.tuples(st.just("leave"), st.sampled_from(PEERS), st.none()),
        st.tuples(st.just("upload"), st.sampled_from(PEERS), st.integers(0, 11)),
        st.tuples(st.just("time"), st.floats(0.0, 20.0), st.none()),
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(start=st.sets(st.integers(0, 11), max_size=11), ops=program, max_failures=st.integers(0, 2))
def test_a_batch_of_haves_is_the_same_as_one_have_a_piece(
    start: set[int], ops: list[tuple[str, object, object]], max_failures: int
) -> None:
    k = 12
    cfg = SchedulerConfig(max_failures_per_peer=max_failures, min_pipeline=2, max_requests=4)
    one = Scheduler([100 + i for i in range(k)], start, seed=7, config=cfg)
    many = Scheduler([100 + i for i in range(k)], start, seed=7, config=cfg)
    now = 0.0
    for peer in PEERS:
        one.peer_joined(peer, now)
        many.peer_joined(peer, now)
    for op, x, y in ops:
        now += 0.001
        if op == "have":
            assert isinstance(x, str) and isinstance(y, set)
            results = [one.peer_have(x, p, now) for p in sorted(y)]
            mask = sum(1 << p for p in y)
            assert many.peer_have_mask(x, mask, now) == any(results)
        elif op == "bitfield":
            assert isinstance(x, str) and isinstance(y, set)
            for s in (one, many):
                s.peer_bitfield(x, y, now)
        elif op in ("receive", "fail"):
            flights = sorted((p, q) for q, ps in one.in_flight().items() for p in ps)
            assert flights == sorted((p, q) for q, ps in many.in_flight().items() for p in ps)
            if flights:
                piece, peer = flights[int(x) % len(flights)]  # type: ignore[call-overload]
                if op == "receive":
                    assert one.piece_received(peer, piece, now) == many.piece_received(peer, piece, now)
                else:
                    for s in (one, many):
                        s.piece_failed(peer, piece, now, str(y))
        elif op == "leave":
            assert one.peer_left(str(x), now) == many.peer_left(str(x), now)
            one.peer_joined(str(x), now)
            many.peer_joined(str(x), now)
        elif op == "upload":
            assert isinstance(y, int)
            assert one.upload_requested(str(x), y, now) == many.upload_requested(str(x), y, now)
        else:
            now += float(x)  # type: ignore[arg-type]
        assert one.wants_tick == many.wants_tick
        assert one.tick(now) == many.tick(now)
        assert one.have_mask == many.have_mask
        for s in (one, many):
            check_counts(s)


def test_counts_of_held_pieces_are_exact_again_once_complete() -> None:
    """A leecher stops counting holders of the pieces it holds; a seed's upload order (rule 10) reads
    those counts, so completing recounts them: the seed then serves the piece the swarm holds least."""
    s = Scheduler([10, 10, 10], seed=0, config=SchedulerConfig(seed_max_uploads=1, seed_max_upload_queue=4))
    for peer in ("x", "y", "z"):
        s.peer_joined(peer, 0.0)
    s.peer_bitfield("x", {0, 1, 2}, 0.0)
    requested = [d.piece for d in s.tick(0.0) if isinstance(d, Request)]
    for piece in requested:
        s.piece_received("x", piece, 0.0)
    s.peer_have("y", 0, 0.0)  # heard while piece 0 is held and s incomplete: not counted then
    s.peer_have("z", 0, 0.0)
    s.peer_have("y", 1, 0.0)
    for d in s.tick(0.0):
        if isinstance(d, Request):
            s.piece_received(d.peer, d.piece, 0.0)
    assert s.complete
    assert [s.availability(p) for p in range(3)] == [3, 2, 1]
    check_counts(s)
    # one slot: the first request is served, then of the queued ones the rarest piece goes first
    assert s.upload_requested("y", 0, 0.0) == [Serve("y", 0), HandedOut(0)]
    s.upload_requested("z", 1, 0.0)
    s.upload_requested("x", 2, 0.0)
    out = s.upload_finished("y", 0, 0.0, ok=False)
    assert [d for d in out if isinstance(d, Serve)] == [Serve("x", 2)]
