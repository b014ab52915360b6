"""The per-turn batching of piece events (swarm/outbox.py): what each peer hears at the end of a turn."""

from __future__ import annotations

from swarm import protocol as P
from swarm.outbox import Outbox


def _lists(out: list[tuple[str, P.Batch, bytes | None]], peer: str) -> list[P.Batch]:
    return [b for p, b, _ in out if p == peer]


def test_news_reach_accepted_peers_and_each_peer_gets_its_own_lists() -> None:
    box = Outbox()
    box.have(3)
    box.handed(5)
    box.request("a", 1)
    box.request("a", 0)  # requests leave in the order they were made
    box.sent("a", 2)
    box.refuse("a", 6, busy=True)
    box.refuse("a", 7, busy=False)
    box.request("checking", 4)
    out = box.flush([("a", True), ("b", True), ("checking", False), ("quiet", False)])
    assert _lists(out, "a") == [P.Batch([3], [5], [], [1, 0], [2], [6], [7])]
    assert _lists(out, "b") == [P.Batch([3], [5], [], [], [], [], [])]
    assert _lists(out, "checking") == [P.Batch([], [], [], [4], [], [], [])]  # no news before acceptance
    assert _lists(out, "quiet") == []
    assert box.flush([("a", True), ("b", True)]) == []  # the turn is over: nothing left


def test_peers_that_get_only_the_news_share_one_payload() -> None:
    box = Outbox()
    box.have(1)
    out = box.flush([("a", True), ("b", True)])
    (pa, ba, payload_a), (pb, bb, payload_b) = out
    assert (pa, pb) == ("a", "b") and ba == bb == P.Batch([1], [], [], [], [], [], [])
    assert payload_a is payload_b and payload_a == P.pack(ba)


def test_a_request_withdrawn_in_its_turn_never_leaves_a_later_cancel_does() -> None:
    box = Outbox()
    box.request("a", 1)
    box.cancel("a", 1)
    assert box.flush([("a", True)]) == []
    box.request("a", 2)
    assert _lists(box.flush([("a", True)]), "a") == [P.Batch([], [], [], [2], [], [], [])]
    box.cancel("a", 2)
    assert _lists(box.flush([("a", True)]), "a") == [P.Batch([], [], [2], [], [], [], [])]


def test_a_long_turn_is_split_at_the_protocol_bound() -> None:
    box = Outbox()
    n = P.MAX_BATCH + 10
    for piece in range(n):
        box.request("a", piece)
    out = _lists(box.flush([("a", True)]), "a")
    assert [len(b.request) for b in out] == [P.MAX_BATCH, 10]
    assert [p for b in out for p in b.request] == list(range(n))
