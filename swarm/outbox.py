"""One loop turn's outgoing piece events, batched per peer: the control plane's hot path, without IO.

The node records here what the scheduler decided and what the transport reported during one turn of
its loop (pieces verified, pieces handed out, requests, cancels, completion signals, refusals of a
peer's requests), and at the end of the turn `flush` turns them into at most one `protocol.Batch` per
peer (more only past `MAX_BATCH` entries a list). Rules:

- `have` and `handed` are news for every accepted peer; the rest belongs to one peer.
- A request withdrawn in the turn it was made never leaves (the peer never hears of it); a cancel of a
  request sent in an earlier turn does. Requests leave in the order they were made.
- A peer that gets only the news shares one packed payload with every other such peer (packed once).

Limits: it holds one turn's events; the node sends what `flush` returns and starts afresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from swarm import protocol as P


@dataclass
class _Box:
    """One peer's share of the next `Batch` (insertion-ordered: requests leave in the scheduler's order)."""

    cancel: dict[int, None] = field(default_factory=dict)
    request: dict[int, None] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)
    busy: dict[int, None] = field(default_factory=dict)  # answers to its requests: ask later/elsewhere
    refused: dict[int, None] = field(default_factory=dict)  # ... and: not held


class Outbox:
    def __init__(self) -> None:
        self._have: list[int] = []
        self._handed: list[int] = []
        self._boxes: dict[str, _Box] = {}

    def _box(self, peer: str) -> _Box:
        box = self._boxes.get(peer)
        if box is None:
            box = self._boxes[peer] = _Box()
        return box

    def have(self, piece: int) -> None:
        """A piece verified this turn: news for every accepted peer."""
        self._have.append(piece)

    def handed(self, piece: int) -> None:
        """A full seed started to hand this piece out (scheduler rule 12): news for every accepted peer."""
        self._handed.append(piece)

    def request(self, peer: str, piece: int) -> None:
        self._box(peer).request[piece] = None

    def cancel(self, peer: str, piece: int) -> None:
        box = self._box(peer)
        if piece in box.request:
            del box.request[piece]  # withdrawn before it left: the peer never hears of it
        else:
            box.cancel[piece] = None

    def sent(self, peer: str, piece: int) -> None:
        """The data plane finished sending `piece` to `peer` (a completion signal)."""
        self._box(peer).sent.append(piece)

    def refuse(self, peer: str, piece: int, *, busy: bool) -> None:
        """`peer`'s request for `piece` will not be served: busy (ask later or elsewhere), or not held."""
        box = self._box(peer)
        (box.busy if busy else box.refused)[piece] = None

    def flush(self, peers: Iterable[tuple[str, bool]]) -> list[tuple[str, P.Batch, bytes | None]]:
        """The turn's frames: (peer, batch, its packed payload when shared) for each of `peers` (id,
        accepted) that has something to hear; the outbox is then empty."""
        have, handed, boxes = self._have, self._handed, self._boxes
        if not (have or handed or boxes):
            return []
        self._have, self._handed, self._boxes = [], [], {}
        out: list[tuple[str, P.Batch, bytes | None]] = []
        shared: list[tuple[P.Batch, bytes]] | None = None  # for peers that get only the news
        for peer, accepted in peers:
            box = boxes.get(peer)
            news = accepted and bool(have or handed)
            if box is None:
                if news:
                    if shared is None:
                        shared = [(b, P.pack(b)) for b in batches(have, handed)]
                    out += [(peer, b, payload) for b, payload in shared]
            else:
                h, ho = (have, handed) if news else ([], [])
                lists = (box.cancel, box.request, box.sent, box.busy, box.refused)
                out += [(peer, b, None) for b in batches(h, ho, *map(list, lists)) if len(b)]
        return out


def batches(have: list[int], handed: list[int], *others: list[int]) -> list[P.Batch]:
    """One Batch of these lists (have, handed, then the per-peer ones in `Batch`'s order; missing ones
    empty), or several when a list is longer than the protocol's bound."""
    lists = (have, handed, *others, *([] for _ in range(len(P.Batch.SCHEMA) - 2 - len(others))))
    n = max(map(len, lists))
    step = P.MAX_BATCH
    if n <= step:
        return [P.Batch(*lists)]
    return [P.Batch(*(x[i : i + step] for x in lists)) for i in range(0, n, step)]
