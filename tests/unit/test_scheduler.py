"""Unit tests of swarm.scheduler, one rule at a time (the rules are numbered in its docstring)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.scheduler import (
    ADMISSION,
    FAILURE_RULES,
    PIECE_TRANSITIONS,
    Cancel,
    Decision,
    HandedOut,
    Refuse,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerError,
    Serve,
)

MB = 1 << 20


def sched(k: int = 8, have: tuple[int, ...] = (), seed: int = 0, **cfg: object) -> Scheduler:
    return Scheduler([MB] * k, have, seed=seed, config=SchedulerConfig(**cfg))  # type: ignore[arg-type]


def requests(ds: list[Decision]) -> list[tuple[str, int]]:
    return [(d.peer, d.piece) for d in ds if isinstance(d, Request)]


# --- rule 2 and 3: who is asked for what ------------------------------------------------------------


def test_nothing_is_requested_from_a_peer_without_pieces() -> None:
    s = sched()
    s.peer_joined("a", 0.0)
    assert s.tick(0.0) == []


def test_requests_only_pieces_the_peer_holds() -> None:
    s = sched(max_requests=100, min_pipeline=8)
    s.peer_bitfield("a", [1, 3, 5], 0.0)
    got = requests(s.tick(0.0))
    assert sorted(p for _, p in got) == [1, 3, 5]
    assert all(peer == "a" for peer, _ in got)


def test_rarest_first() -> None:
    s = sched(k=4, min_pipeline=1, max_pipeline=1)
    s.peer_bitfield("a", [0, 1, 2, 3], 0.0)
    s.peer_bitfield("b", [0, 1, 2], 0.0)
    s.peer_bitfield("c", [0, 1], 0.0)
    # availability: 0 -> 3, 1 -> 3, 2 -> 2, 3 -> 1; "a" alone holds 3
    got = dict(requests(s.tick(0.0)))
    assert got["a"] == 3
    assert got["b"] == 2
    assert got["c"] in (0, 1)
    assert s.availability(0) == 3 and s.availability(3) == 1


def test_tie_break_is_seeded_and_differs_between_nodes() -> None:
    def first_pick(seed: int) -> int:
        s = sched(k=64, seed=seed, min_pipeline=1, max_pipeline=1)
        s.peer_bitfield("seed", range(64), 0.0)
        return requests(s.tick(0.0))[0][1]

    assert first_pick(7) == first_pick(7)
    assert len({first_pick(i) for i in range(20)}) > 5


def test_have_makes_a_peer_askable() -> None:
    s = sched(k=4)
    s.peer_joined("a", 0.0)
    assert s.tick(0.0) == []
    s.peer_have("a", 2, 0.1)
    assert s.wants_tick
    assert requests(s.tick(0.1)) == [("a", 2)]


def test_a_piece_is_requested_from_one_peer_outside_endgame() -> None:
    s = sched(k=12, min_pipeline=4, max_pipeline=4)
    s.peer_bitfield("a", range(12), 0.0)
    s.peer_bitfield("b", range(12), 0.0)
    got = requests(s.tick(0.0))
    pieces = [p for _, p in got]
    assert len(pieces) == len(set(pieces)) == 8
    assert not s.in_endgame


# --- rule 4 and 5: pipelining and rates -------------------------------------------------------------


def test_pipeline_starts_at_min_and_grows_with_the_measured_rate() -> None:
    s = sched(k=200, min_pipeline=1, max_pipeline=6, pipeline_window_s=0.01, max_requests=100)
    s.peer_bitfield("a", range(200), 0.0)
    now = 0.0
    assert len(requests(s.tick(now))) == 1
    assert s.peer_stats("a").depth == 1
    for _ in range(20):  # one piece (1 MiB) every ms: 1 MiB/ms; a 10 ms window is ~10 pieces, cap 6
        piece = min(s.in_flight()["a"])
        now += 0.001
        s.piece_received("a", piece, now)
        s.tick(now)
    st = s.peer_stats("a")
    assert st.rate == pytest.approx(MB / 0.001, rel=1e-6)
    assert st.depth == 6 and st.in_flight == 6
    assert st.bytes_received == 20 * MB and st.pieces_received == 20


def test_rate_of_pieces_that_arrive_together() -> None:
    s = sched(k=8, min_pipeline=4, max_pipeline=4)
    s.peer_bitfield("a", range(8), 0.0)
    got = requests(s.tick(0.0))
    assert len(got) == 4
    # all four were sent in parallel and arrive together after 4 ms: the link did 4 MiB in 4 ms
    for i, (_, p) in enumerate(got):
        s.piece_received("a", p, 0.004 + i * 1e-9)
    assert s.peer_stats("a").rate == pytest.approx(MB / 0.001, rel=1e-3)


def test_faster_peers_are_filled_first() -> None:
    s = sched(k=40, min_pipeline=1, max_pipeline=1, max_requests=2)
    s.peer_bitfield("slow", range(40), 0.0)
    s.peer_bitfield("fast", range(40), 0.0)
    got = dict(requests(s.tick(0.0)))  # unmeasured peers are both tried
    s.piece_received("fast", got["fast"], 0.001)
    s.piece_received("slow", got["slow"], 0.010)
    assert s.peer_stats("fast").rate > s.peer_stats("slow").rate  # type: ignore[operator]
    assert [peer for peer, _ in requests(s.tick(0.02))] == ["fast", "slow"]


def test_max_requests_caps_requests_over_all_peers() -> None:
    s = sched(k=50, min_pipeline=4, max_requests=6)
    for name in "abc":
        s.peer_bitfield(name, range(50), 0.0)
    assert len(requests(s.tick(0.0))) == 6
    (peer, piece) = next((p, next(iter(ps))) for p, ps in s.in_flight().items())
    s.piece_received(peer, piece, 0.01)
    assert len(requests(s.tick(0.01))) == 1


# --- rule 6 and 7: failures and timeouts ------------------------------------------------------------


@pytest.mark.parametrize("reason", ["bad_checksum", "timeout", "error"])
def test_a_failed_piece_is_asked_elsewhere_and_never_again_from_that_peer(reason: str) -> None:
    s = sched(k=1)
    s.peer_bitfield("a", [0], 0.0)
    assert requests(s.tick(0.0)) == [("a", 0)]
    s.peer_bitfield("b", [0], 0.0)
    s.piece_failed("a", 0, 0.1, reason)
    assert requests(s.tick(0.1)) == [("b", 0)]
    assert s.peer_stats("a").failures == 1
    s.piece_failed("b", 0, 0.2, reason)
    assert s.tick(0.2) == []  # neither may be asked again
    assert s.unavailable() == [0]


def test_refused_is_not_a_failure_but_backs_off() -> None:
    s = sched(k=1, refuse_backoff_s=1.0)
    s.peer_bitfield("a", [0], 0.0)
    s.tick(0.0)
    s.piece_failed("a", 0, 0.1, "refused")
    assert s.peer_stats("a").failures == 0
    assert requests(s.tick(0.5)) == []
    assert s.next_timeout() == pytest.approx(1.1)
    assert requests(s.tick(1.2)) == [("a", 0)]


def test_too_many_failures_exclude_a_peer() -> None:
    s = sched(k=10, max_failures_per_peer=2, min_pipeline=1, max_pipeline=1)
    s.peer_bitfield("a", range(10), 0.0)
    for i in range(3):
        ((_, p),) = requests(s.tick(float(i)))
        s.piece_failed("a", p, float(i), "bad_checksum")
    st = s.peer_stats("a")
    assert st.failures == 3 and st.excluded
    assert s.tick(5.0) == []
    assert sorted(s.unavailable()) == list(range(10))


def test_exclusion_cancels_outstanding_requests_via_tick() -> None:
    s = sched(k=10, max_failures_per_peer=0, min_pipeline=3)
    s.peer_bitfield("a", range(10), 0.0)
    got = requests(s.tick(0.0))
    s.piece_failed("a", got[0][1], 0.1, "error")
    out = s.tick(0.1)
    assert sorted((d.peer, d.piece) for d in out if isinstance(d, Cancel)) == sorted(got[1:])
    assert s.in_flight() == {}


def test_timeout_cancels_and_rerequests_elsewhere() -> None:
    s = sched(k=1, request_timeout_s=5.0, endgame=False)
    s.peer_bitfield("a", [0], 0.0)
    s.peer_bitfield("b", [0], 0.0)
    ((first, _),) = requests(s.tick(0.0))
    assert s.next_timeout() == pytest.approx(5.0)
    assert s.tick(4.9) == []
    out = s.tick(5.0)
    other = "b" if first == "a" else "a"
    assert Cancel(first, 0) in out and Request(other, 0) in out
    assert s.peer_stats(first).failures == 1


def test_unknown_failure_reason_is_an_error() -> None:
    s = sched()
    with pytest.raises(SchedulerError):
        s.piece_failed("a", 0, 0.0, "gremlins")


# --- rule 8: endgame --------------------------------------------------------------------------------


def test_endgame_duplicates_the_last_requests_and_cancels_the_losers() -> None:
    s = sched(k=2, min_pipeline=1, max_pipeline=1)
    s.peer_bitfield("a", [0, 1], 0.0)
    s.peer_bitfield("b", [0, 1], 0.0)
    first = requests(s.tick(0.0))
    assert len(first) == 2
    # one arrives; the peer that sent it now has a free slot and everything is in flight: endgame
    (peer, piece) = first[0]
    s.piece_received(peer, piece, 0.1)
    dup = requests(s.tick(0.1))
    assert s.in_endgame
    other_piece = first[1][1]
    assert dup == [(peer, other_piece)]
    # the duplicate wins: the original request is cancelled
    out = s.piece_received(peer, other_piece, 0.2)
    assert out == [Cancel(first[1][0], other_piece)]
    assert s.complete


def test_no_endgame_when_disabled() -> None:
    s = sched(k=2, min_pipeline=1, max_pipeline=1, endgame=False)
    s.peer_bitfield("a", [0, 1], 0.0)
    s.peer_bitfield("b", [0, 1], 0.0)
    (peer, piece), _ = requests(s.tick(0.0))
    s.piece_received(peer, piece, 0.1)
    assert requests(s.tick(0.1)) == []


def test_late_duplicate_is_ignored() -> None:
    s = sched(k=1)
    s.peer_bitfield("a", [0], 0.0)
    s.tick(0.0)
    s.piece_received("a", 0, 0.1)
    assert s.piece_received("b", 0, 0.2) == []
    assert s.complete and s.have == frozenset({0})


# --- rules 9 to 11: uploads -------------------------------------------------------------------------


def test_upload_admission() -> None:
    s = sched(k=4, have=(0, 1, 2, 3), seed_max_uploads=2, seed_max_upload_queue=1)
    assert s.upload_requested("x", 0, 0.0) == [Serve("x", 0), HandedOut(0)]
    assert s.upload_requested("y", 1, 0.0) == [Serve("y", 1), HandedOut(1)]
    assert s.upload_requested("z", 2, 0.0) == []  # queued
    assert s.upload_requested("w", 3, 0.0) == [Refuse("w", 3, "busy")]
    assert s.upload_finished("x", 0, 0.1, ok=True) == [Serve("z", 2), HandedOut(2)]
    assert s.upload_requested("x", 99, 0.1) == [Refuse("x", 99, "not_held")]


def test_a_leecher_serves_only_what_it_holds_and_everything_it_holds() -> None:
    s = sched(k=4)
    s.peer_bitfield("a", [0], 0.0)
    s.tick(0.0)
    assert s.upload_requested("x", 0, 0.0) == [Refuse("x", 0, "not_held")]
    s.piece_received("a", 0, 0.1)
    assert s.upload_requested("x", 0, 0.1) == [Serve("x", 0)]


def test_admission_table_covers_every_case() -> None:
    assert len(ADMISSION) == 8
    assert {v for k, v in ADMISSION.items() if not k[0]} == {"not_held"}
    assert set(FAILURE_RULES) == {"bad_checksum", "timeout", "error", "refused"}
    assert not FAILURE_RULES["refused"].counts


def test_upload_slots_are_spread_over_requesting_peers() -> None:
    s = sched(k=8, have=range(8), seed_max_uploads=2)
    assert s.upload_requested("x", 0, 0.0) == [Serve("x", 0), HandedOut(0)]
    assert s.upload_requested("x", 1, 0.0) == [Serve("x", 1), HandedOut(1)]
    s.upload_requested("x", 2, 0.0)
    s.upload_requested("x", 3, 0.0)
    s.upload_requested("y", 4, 0.0)
    # "y" waits behind x's requests, but gets the next slot: x already has one running
    assert s.upload_finished("x", 0, 0.1, ok=True) == [Serve("y", 4), HandedOut(4)]


def test_seed_serves_the_piece_the_swarm_holds_least() -> None:
    s = sched(k=4, have=range(4), seed_max_uploads=1)
    for peer, pieces in {"p": [0, 1], "q": [0, 1], "r": [0]}.items():
        s.peer_bitfield(peer, pieces, 0.0)
    assert s.upload_requested("t", 3, 0.0) == [Serve("t", 3), HandedOut(3)]
    s.upload_requested("u", 0, 0.0)  # held by 3 peers
    s.upload_requested("v", 1, 0.0)  # held by 2
    s.upload_requested("w", 2, 0.0)  # held by none, never sent
    assert s.upload_finished("t", 3, 0.1, ok=True) == [Serve("w", 2), HandedOut(2)]
    assert s.upload_finished("w", 2, 0.2, ok=True) == [Serve("v", 1), HandedOut(1)]
    assert s.upload_finished("v", 1, 0.3, ok=True) == [Serve("u", 0), HandedOut(0)]


def test_seed_preference_cannot_starve_a_request() -> None:
    s = sched(k=64, have=range(64), seed_max_uploads=1, seed_max_overtakes=3)
    s.peer_bitfield("p", [0], 0.0)
    assert s.upload_requested("first", 63, 0.0) == [Serve("first", 63), HandedOut(63)]
    s.upload_requested("old", 0, 0.0)  # piece 0 is held by p: less urgent than pieces nobody has
    for i in range(1, 10):
        s.upload_requested(f"n{i}", i, 0.0)
    running = ("first", 63)
    order = []
    for step in range(6):
        serve, handed = s.upload_finished(*running, 0.1 * (step + 1), ok=True)
        assert isinstance(serve, Serve) and handed == HandedOut(serve.piece)
        order.append(serve.peer)
        running = (serve.peer, serve.piece)
    # overtaken by four uploads (more than 3), then served; without the bound it would wait for all nine
    assert order.index("old") == 4


def test_leecher_serves_in_arrival_order() -> None:
    s = sched(k=4, have=(0, 1, 2), max_uploads=1)
    s.peer_bitfield("p", [0], 0.0)
    assert s.upload_requested("a", 1, 0.0) == [Serve("a", 1)]
    s.upload_requested("b", 0, 0.0)
    s.upload_requested("c", 2, 0.0)
    assert s.upload_finished("a", 1, 0.1, ok=True) == [Serve("b", 0)]


def test_upload_cancelled_drops_a_queued_request_and_frees_a_running_one() -> None:
    s = sched(k=4, have=range(4), seed_max_uploads=1)
    s.upload_requested("a", 0, 0.0)
    s.upload_requested("b", 1, 0.0)
    s.upload_requested("c", 2, 0.0)
    s.upload_cancelled("b", 1, 0.1)
    s.upload_cancelled("a", 0, 0.1)  # the running one: its slot is free
    assert s.wants_tick
    assert s.tick(0.1) == [Serve("c", 2), HandedOut(2)]


# --- rule 12: handed-out hints ----------------------------------------------------------------------


def test_a_seed_announces_each_piece_once_and_a_leecher_never() -> None:
    s = sched(k=2, have=range(2), seed_max_uploads=4)
    assert s.upload_requested("x", 0, 0.0) == [Serve("x", 0), HandedOut(0)]
    s.upload_finished("x", 0, 0.1, ok=True)
    assert s.upload_requested("y", 0, 0.1) == [Serve("y", 0)]  # already handed out once
    leecher = sched(k=2)
    leecher.peer_bitfield("a", [0], 0.0)
    leecher.tick(0.0)
    leecher.piece_received("a", 0, 0.1)
    assert leecher.upload_requested("x", 0, 0.1) == [Serve("x", 0)]


def test_a_seed_is_asked_for_pieces_it_has_not_handed_out_first() -> None:
    s = sched(k=8, min_pipeline=1, max_pipeline=1)
    s.peer_bitfield("seed", range(8), 0.0)
    for p in (0, 1, 2, 3, 5, 6, 7):
        s.peer_handed_out("seed", p, 0.0)
    assert s.tick(0.0) == [Request("seed", 4)]
    s.piece_received("seed", 4, 0.1)
    (req,) = s.tick(0.1)  # nothing new is left at the seed: the hint gives way, the fetch goes on
    assert isinstance(req, Request) and req.peer == "seed" and req.piece != 4


def test_at_a_seed_the_hint_outranks_rarity() -> None:
    # pieces 2 and 3 look rarest from here (only the seed holds them among this node's peers), but the
    # seed has handed them to someone outside this view already; its egress goes to pieces 0 and 1
    s = sched(k=4, min_pipeline=1, max_pipeline=1)
    s.peer_bitfield("seed", range(4), 0.0)
    s.peer_bitfield("other", [0, 1], 0.0)
    s.peer_handed_out("seed", 2, 0.0)
    s.peer_handed_out("seed", 3, 0.0)
    reqs = requests(s.tick(0.0))
    assert sorted(p for _, p in reqs) == [0, 1] and {q for q, _ in reqs} == {"seed", "other"}


# --- peers leaving ---------------------------------------------------------------------------------


def test_peer_left_returns_its_requests_to_the_pool_and_frees_its_uploads() -> None:
    s = sched(k=4, have=(0,), min_pipeline=3, max_uploads=1)
    s.peer_bitfield("a", [1, 2, 3], 0.0)
    s.peer_bitfield("b", [1, 2, 3], 0.0)
    got = requests(s.tick(0.0))
    s.upload_requested("a", 0, 0.0)
    s.upload_requested("b", 0, 0.0)
    out = s.peer_left("a", 0.1)
    a_pieces = sorted(p for peer, p in got if peer == "a")
    assert sorted(d.piece for d in out if isinstance(d, Cancel)) == a_pieces
    assert Serve("b", 0) in out
    again = requests(s.tick(0.1))
    assert all(peer == "b" for peer, _ in again)
    assert s.availability(1) == 1


def test_unavailable_names_pieces_no_live_peer_holds() -> None:
    s = sched(k=4, have=(0,))
    s.peer_bitfield("a", [1], 0.0)
    s.peer_bitfield("b", [2], 0.0)
    assert s.unavailable() == [3]
    s.peer_left("b", 1.0)
    assert s.unavailable() == [2, 3]
    assert s.missing() == [1, 2, 3]


# --- the state machine itself ------------------------------------------------------------------------


def test_transition_table_rejects_illegal_moves() -> None:
    s = sched(k=2)
    with pytest.raises(SchedulerError):
        s._move(0, "ended_last")
    assert ("held", "request") not in {(a.value, e) for a, e in PIECE_TRANSITIONS}


def test_bad_inputs() -> None:
    with pytest.raises(SchedulerError):
        Scheduler([], seed=0)
    with pytest.raises(SchedulerError):
        Scheduler([1, 0], seed=0)
    with pytest.raises(SchedulerError):
        Scheduler([1], have=[5], seed=0)
    with pytest.raises(SchedulerError):
        SchedulerConfig(min_pipeline=4, max_pipeline=2)
    s = sched(k=4)
    with pytest.raises(SchedulerError):
        s.peer_have("a", 4, 0.0)
    with pytest.raises(SchedulerError):
        s.peer_bitfield_mask("a", 1 << 4, 0.0)
    with pytest.raises(SchedulerError):
        s.peer_stats("nobody")


def test_queries_of_a_seed() -> None:
    s = sched(k=3, have=range(3))
    assert s.complete and s.missing() == [] and s.held_count == 3 and s.has(2)
    assert s.have == frozenset({0, 1, 2}) and s.have_mask == 0b111
    s.peer_bitfield("a", [], 0.0)
    assert s.tick(0.0) == [] and not s.wants_tick and s.next_timeout() is None


@settings(max_examples=300, deadline=None)
@given(mask=st.integers(1, (1 << 3000) - 1), pick=st.integers(0, 10**6))
def test_nth_bit_finds_the_nth_set_bit(mask: int, pick: int) -> None:
    from swarm.scheduler import _nth_bit

    bits = [i for i in range(mask.bit_length()) if mask >> i & 1]
    n = pick % len(bits)
    assert _nth_bit(mask, n) == bits[n]
