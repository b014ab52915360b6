"""The swarm's piece scheduler: a pure, sans-IO state machine (one per node).

Both the real node (swarm/node.py) and the simulator (sim/) drive this same object, so what the
simulator predicts is what the product does. It owns no sockets, threads, clocks or torch; time is
passed in (``now``, seconds on any monotonic clock) and the only randomness is a `random.Random`
seeded by the caller. Events go in as method calls; decisions come out as lists of frozen dataclasses
(`Request`, `Cancel`, `Serve`, `Refuse`, `HandedOut`) that the caller must carry out.

Rules
=====

Rule 1: everything that decides which piece moves from which peer, and when, lives in this file. The
caller only moves bytes, verifies checksums, and reports what happened.

Rule 2: a piece is requested only from a peer that is known (bitfield or have) to hold it, that is
live, that is not excluded, and that has not failed that very piece before.

Rule 3 (download, piece selection): *rarest first*. Among the pieces this node misses, that nobody is
already fetching, and that the peer holds, pick one with the fewest live holders among this node's
peers (a peer that failed a piece is not counted as a holder of it). Ties are broken uniformly at random by
the seeded generator, so that different nodes pick different pieces.

Rule 4 (download, pipelining): each peer has up to ``depth`` requests outstanding, so that its link does
not idle between pieces. ``depth = clamp(ceil(rate * pipeline_window_s / mean_piece_size), min_pipeline,
max_pipeline)`` where ``rate`` is the peer's measured rate (below); before the first piece arrives it is
``min_pipeline``. Over all peers together at most ``max_requests`` requests are outstanding: a
node's downlink is shared by all the pieces flowing to it at once, so more at once only makes each
piece arrive later, and a piece that arrives later is forwarded later (the spread of new pieces
through the swarm slows). Peers with free pipeline slots are filled fastest first (rule 5), so fast
peers get the rarest pieces and the most requests; a peer that could not be asked because of
``max_requests`` is remembered and asked when a request ends.

Rule 5 (rates): the rate of a peer is measured from this node's own `piece_received` calls. Each piece's
*service time* is ``now - max(request time, previous receive from that peer)`` (the time the peer spent
on that piece alone: pieces that were queued behind earlier ones are not charged their queueing twice).
``rate = sum(bytes) / sum(service time)``, both sums decayed by ``exp(-service time / horizon)`` at each
sample, the horizon being ``rate_window`` pieces' worth of time at the current estimate. Decaying by
time, not per sample, keeps the estimate right when a peer sends several pieces at once: they complete
together, one long service time and then near-zero ones, and the ratio is still the link's rate. A
peer not measured yet sorts before measured ones (it gets a chance to show its rate).

Rule 6 (failures): `piece_failed` reasons are treated as in `FAILURE_RULES`: ``bad_checksum``,
``timeout`` and ``error`` count against the peer and exclude it *for that piece*; ``refused`` (the peer
is busy) does neither, but the peer is asked nothing more for ``refuse_backoff_s``. A peer with more
than ``max_failures_per_peer`` counted failures is excluded: never asked again, its pieces no longer
count as available, its outstanding requests are cancelled. A failed piece becomes requestable again
from other holders at once.

Rule 7 (timeouts): a request outstanding longer than ``max(request_timeout_s, timeout_factor * depth *
piece_size / rate)`` is withdrawn (a `Cancel` from `tick`) and handled as a ``timeout`` failure.

Rule 8 (endgame): when every missing piece is in flight (none is left to request) and ``endgame`` is
on, peers with free slots are also asked for pieces already requested elsewhere (fewest outstanding
requests first, at most ``1 + endgame_duplicates`` requests per piece). When a piece arrives, every other
outstanding request for it is cancelled (`piece_received` returns those `Cancel`s).

Rule 9 (upload admission): an upload request for a piece this node does not hold is refused
(``"not_held"``); otherwise it is served at once while fewer than ``max_uploads`` uploads run
(``seed_max_uploads`` once this node is complete), queued while fewer than ``max_upload_queue`` wait,
and refused (``"busy"``) beyond that. See `ADMISSION`. The queue is short on purpose: a request
waiting behind a busy uploader holds its piece hostage (it is "in flight", so nobody asks anyone else
for it); a quick refusal sends the requester to another holder.

Rule 10 (upload order): requests from peers that this node is not uploading to yet come first (so
that the slots are spread over the peers that asked: one receiver cannot take every slot while others
wait, which would leave the uploader's link throttled by that one receiver's downlink). Among those, a
leecher serves first come, first served. A full seed serves the queued request for a piece it has
never sent, else the one whose piece the swarm (as seen through haves and bitfields, counting pieces
this node has just sent) holds least, preferring pieces it is not uploading right now, oldest first
among equals: this is what makes a seed hand out *different* pieces, so that its leechers can trade,
rather than the same piece to everyone. Against starvation, a request that has seen more than
``seed_max_overtakes`` uploads start since it was queued is served next. (Leechers stay FIFO: the same
preference there starved the requests of nodes that lagged behind, in the simulator.)

Rule 11: a leecher serves every piece it holds as soon as it holds it (`piece_received` makes the
piece servable; there is no choking: the swarm is cooperative).

Rule 12 (handed-out hints): when a full seed starts to upload a piece for the first time it emits
`HandedOut(piece)`, which the caller tells every peer (`peer_handed_out` on their side). A node asking
that seed picks among the pieces the seed has not handed out yet (rarest first among those), and
among the others only when none is left. Why: a seed's egress is the swarm's scarcest resource, and
every piece it sends twice delays the last new piece by one piece time; a leecher sees only its own
peers, so it cannot tell which pieces the seed has already given to nodes outside that view, and
without the hint it often asks the seed for pieces the swarm already holds. (Simulator, 100
receivers of one seed, 1,000 pieces: the last new piece left the seed at 1.16 T without the hint and
at 1.03 T with it, T being one model over one link.) The hint is advice: it never makes a piece
unrequestable, so it cannot stall a fetch.

Theory of operation
===================

Each piece, from this node's download side, is in one of three states (`PieceState`): ``WANTED``
(missing, no request outstanding), ``REQUESTED`` (missing, at least one request outstanding) and
``HELD``. `PIECE_TRANSITIONS` lists every legal transition; `_move` applies them and refuses anything
else, so an illegal sequence of calls raises `SchedulerError` instead of corrupting state.

Each upload request is ``QUEUED`` or ``SERVING`` until it ends (finished, cancelled, or its peer left);
which of the three ways in (`Serve`, queue, `Refuse`) it takes is the table `ADMISSION`.

Data structures (all pieces as bits of Python ints, so that set algebra over k pieces costs O(k/64)
machine words in C rather than O(k) Python steps; k is a few thousand at most in practice):

- ``_wanted``, ``_inflight``, ``_held``: masks of the three piece states (``_held`` also as a
  bytearray of bits, ``_held_bits``, for one-piece tests that read a byte rather than build an int);
- per peer: the pieces it holds (``bits``, a bytearray set in place by each have, the hottest call of a
  large swarm; ``mask`` gives them as an int), the mask of pieces it failed (``bad``), of pieces
  requested from it;
- availability: a *bit-sliced counter* ``_avail`` (slice j holds bit j of every piece's holder count).
  Only the counts of the pieces in ``_counted`` are kept: a leecher never asks for a piece it holds and
  serves in arrival order (rule 10), so it skips the counts of its held pieces (about half the haves it
  hears of) until it is complete, when it counts everything once and from then on (rule 10 of a seed
  reads them); `availability` answers for any piece either way.
  Adding or removing a whole peer is a ripple-carry over log2(peers) slices, and "the pieces with the
  fewest holders among mask m" is found by walking the slices from the top (keep the pieces whose bit
  is 0 wherever any exist). So rarest-first selection is O(log peers) big-int operations, with no sort
  and no per-piece loop, which is what lets the simulator run 1,000 nodes x 1,000 pieces quickly.
- ``_want``: the peers that may accept a request now (they gained a free pipeline slot or announced a
  piece this node wants); `tick` looks only at those, so a tick with nothing to do is O(1).

Additions to the API the node was written against (all optional to use): `PeerStats` (returned by
`peer_stats`), `next_timeout` (when to call `tick` next even if nothing happens; like a QUIC
connection's timer), `wants_tick` (a `tick` now could return decisions), `has`, `held_count`,
`have_mask` and `peer_bitfield_mask` (bitfields as the bits of an int), `in_endgame`, `availability`,
`peers`, `num_pieces`, `FAILURE_RULES`, `ADMISSION`, `PIECE_TRANSITIONS`, `HandedOut` with
`peer_handed_out` (rule 12), `peer_have_mask` (a batch of haves: the node receives them as one
bitfield delta per peer and loop turn), `peer_have`'s result (true when a `tick` may now ask that peer for
something), and the config fields
``seed_max_uploads``, ``max_requests``, ``pipeline_window_s``, ``timeout_factor``,
``refuse_backoff_s``, ``endgame_duplicates``, ``seed_max_overtakes`` and ``rate_window``.
`piece_failed` and `upload_cancelled` return nothing (as agreed); the decisions they cause
(cancelling an excluded peer's requests, serving the next queued upload) come out of the next `tick`,
and `wants_tick` is true until then. Events about peers never joined are handled as if the
peer had joined first (a have can race a join on the wire); a piece index out of range raises
`SchedulerError`, except in `upload_requested`, where it is refused as ``"not_held"``.
"""

from __future__ import annotations

import heapq
import math
import operator
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

from swarm.errors import SwarmError

PeerId: TypeAlias = str


class SchedulerError(SwarmError):
    """The scheduler was driven in a way that breaks its rules (a bug in the caller)."""


# --- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerConfig:
    """Tuning of one node's scheduler. Defaults are justified field by field.

    The figures were chosen with the simulator (docs/simulation.md): they keep 1,000 leechers of one
    seed within 1.25 x the lower bound on homogeneous links while staying sane over slow TCP.
    """

    #: Concurrent uploads. A node's egress is shared by its uploads; a few in parallel keep the link busy
    #: while requests arrive one latency apart, and still hand each receiver a useful share (1/4 of the
    #: link). More slots mean every piece takes longer to cross one hop, which slows the spread of new
    #: pieces through the swarm.
    max_uploads: int = 4
    #: Concurrent uploads once this node is complete. A seed's egress is the swarm's scarcest resource
    #: (every piece must leave a seed once), and each of its uploads competes for its receiver's
    #: downlink with that receiver's other downloads; twice the slots keep the seed's link full when
    #: its receivers are busy, at the price of each seed upload taking longer.
    seed_max_uploads: int = 8
    #: Queued upload requests beyond the running ones; past this, requests are refused ("busy"). Large
    #: enough to hold a full pipeline from every peer of a bounded peer set, so refusals stay rare.
    max_upload_queue: int = 8
    #: The same once complete: a longer queue gives a seed more requests to choose new pieces from
    #: (rule 10).
    seed_max_upload_queue: int = 8
    #: Requests in flight per peer (rule 4). Two hide one round trip: with one, a peer whose pieces take
    #: longer than the pipeline window to send idles for a round trip per piece (simulator, 140 MB
    #: pieces at 50 GB/s: a lone receiver at 1.036 x the bound with 1, 1.000 with 2; 100 receivers
    #: 1.144 -> 1.111; 1,000 receivers of 16 MB pieces 1.148 -> 1.141). 16 caps what a peer that
    #: vanishes can hold hostage.
    min_pipeline: int = 2
    max_pipeline: int = 16
    #: Requests outstanding over all peers together. A node's downlink is shared by every piece that
    #: flows to it at once; many at once make each piece arrive late, which slows the spread of new
    #: pieces through the swarm (each hop takes longer) without adding throughput. Too few leave
    #: uploaders idle: in a swarm where everyone downloads, every uplink must stay busy. Kept below
    #: ``max_uploads + max_upload_queue`` (12), what a peer can take before it refuses: at 14 and 16 the
    #: simulator showed refusal storms (100,000+ at N = 100) and 1.27-1.28 x the bound; 10 gave 1.11
    #: (8 gave 1.22).
    max_requests: int = 10
    #: Keep about this much time's worth of data requested from each peer at its measured rate.
    pipeline_window_s: float = 0.0005
    #: Floor of the request timeout (rule 7): generous, because connection errors are reported at once
    #: by the transport; this only catches a peer that silently stopped.
    request_timeout_s: float = 10.0
    #: The timeout is also at least this many times the expected time to drain the peer's pipeline.
    timeout_factor: float = 4.0
    #: Counted failures (bad checksum, timeout, error) tolerated per peer before it is excluded.
    max_failures_per_peer: int = 3
    #: After a "busy" refusal, ask that peer nothing for this long.
    refuse_backoff_s: float = 0.0003
    #: Endgame (rule 8) and how many extra requests one piece may have outstanding in it.
    endgame: bool = True
    endgame_duplicates: int = 1
    #: A full seed serves the queued request whose piece the swarm holds least (rule 10), but a request
    #: that has seen this many uploads start since it was queued is served next (no starvation).
    seed_max_overtakes: int = 16
    #: The rate estimator's memory, in pieces' worth of time at the current rate (rule 5).
    rate_window: float = 4.0

    def __post_init__(self) -> None:
        if self.max_uploads < 1 or self.max_upload_queue < 0:
            raise SchedulerError("max_uploads must be >= 1 and max_upload_queue >= 0")
        if not 1 <= self.min_pipeline <= self.max_pipeline:
            raise SchedulerError("need 1 <= min_pipeline <= max_pipeline")
        if self.request_timeout_s <= 0 or self.timeout_factor <= 0 or self.pipeline_window_s < 0:
            raise SchedulerError("timeouts and the pipeline window must be positive")
        if self.max_failures_per_peer < 0 or self.endgame_duplicates < 0 or self.refuse_backoff_s < 0:
            raise SchedulerError("failure, duplicate and backoff limits must be >= 0")
        if self.rate_window <= 0:
            raise SchedulerError("rate_window must be positive")


# --- decisions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """Download: ask `peer` for `piece`."""

    peer: PeerId
    piece: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """Download: withdraw the request for `piece` from `peer` (endgame loser, timeout, peer gone)."""

    peer: PeerId
    piece: int


@dataclass(frozen=True, slots=True)
class Serve:
    """Upload: start sending `piece` to `peer` now; report the end with `upload_finished`."""

    peer: PeerId
    piece: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Upload: answer `peer`'s request for `piece` with a refusal; `reason` is "busy" or "not_held"."""

    peer: PeerId
    piece: int
    reason: str


@dataclass(frozen=True, slots=True)
class HandedOut:
    """Upload: tell every peer that this full seed has started to send `piece` to someone (rule 12)."""

    piece: int


Decision: TypeAlias = Request | Cancel | Serve | Refuse | HandedOut


@dataclass(frozen=True)
class PeerStats:
    """What this node measured about one peer (download side)."""

    bytes_received: int
    pieces_received: int
    rate: float | None  # bytes/s, None before the first piece
    depth: int  # current pipeline depth (rule 4)
    in_flight: int
    failures: int
    excluded: bool
    held: int  # pieces the peer is known to hold
    handed_out: int = 0  # pieces the peer announced it has handed out (rule 12)


# --- the rules as data ------------------------------------------------------------------------------


class PieceState(Enum):
    WANTED = "wanted"
    REQUESTED = "requested"
    HELD = "held"


WANTED: Final = PieceState.WANTED
REQUESTED: Final = PieceState.REQUESTED
HELD: Final = PieceState.HELD

#: (state, event) -> new state. Events: "request" (a Request is issued), "received" (verified piece),
#: "ended" (one request ended without the piece and others are still outstanding), "ended_last" (the
#: last outstanding request ended without the piece). Anything else is a bug and raises.
PIECE_TRANSITIONS: Final[Mapping[tuple[PieceState, str], PieceState]] = {
    (WANTED, "request"): REQUESTED,
    (REQUESTED, "request"): REQUESTED,  # endgame duplicate
    (REQUESTED, "received"): HELD,
    (WANTED, "received"): HELD,  # a piece we had given up on (timed out) arrives after all
    (HELD, "received"): HELD,  # late endgame duplicate: ignored
    (REQUESTED, "ended"): REQUESTED,
    (REQUESTED, "ended_last"): WANTED,
}

#: `PIECE_TRANSITIONS` for `_move`, the hot path: event -> (new state index or -1) by old state index.
#: The table above is keyed by enum members, whose hash is a Python-level call (several per piece).
_STATES: Final = (WANTED, REQUESTED, HELD)
_WANTED: Final = 0
_REQUESTED: Final = 1
_HELD: Final = 2
_NEXT: Final[Mapping[str, tuple[int, ...]]] = {
    event: tuple(
        _STATES.index(PIECE_TRANSITIONS[(old, event)]) if (old, event) in PIECE_TRANSITIONS else -1
        for old in _STATES
    )
    for event in sorted({e for _, e in PIECE_TRANSITIONS})
}


@dataclass(frozen=True)
class FailureRule:
    counts: bool  # counts towards max_failures_per_peer
    avoid_piece: bool  # never ask this peer for this piece again
    backoff: bool  # ask this peer nothing for refuse_backoff_s


#: How each `piece_failed` reason is handled (rule 6).
FAILURE_RULES: Final[Mapping[str, FailureRule]] = {
    "bad_checksum": FailureRule(counts=True, avoid_piece=True, backoff=False),
    "timeout": FailureRule(counts=True, avoid_piece=True, backoff=False),
    "error": FailureRule(counts=True, avoid_piece=True, backoff=False),
    "refused": FailureRule(counts=False, avoid_piece=False, backoff=True),
}

SERVE: Final = "serve"
QUEUE: Final = "queue"
REFUSE_NOT_HELD: Final = "not_held"
REFUSE_BUSY: Final = "busy"

#: Upload admission (rule 9): (piece held, upload slot free, queue has room) -> outcome.
ADMISSION: Final[Mapping[tuple[bool, bool, bool], str]] = {
    (False, False, False): REFUSE_NOT_HELD,
    (False, False, True): REFUSE_NOT_HELD,
    (False, True, False): REFUSE_NOT_HELD,
    (False, True, True): REFUSE_NOT_HELD,
    (True, True, False): SERVE,
    (True, True, True): SERVE,
    (True, False, True): QUEUE,
    (True, False, False): REFUSE_BUSY,
}


# --- bit-sliced counters ----------------------------------------------------------------------------


def _counter_add(slices: list[int], mask: int) -> None:
    """Add 1 to the count of every piece in `mask` (ripple carry through the slices)."""
    carry = mask
    for j, s in enumerate(slices):
        if not carry:
            return
        slices[j] = s ^ carry
        carry &= s
    if carry:
        slices.append(carry)


def _counter_sub(slices: list[int], mask: int) -> None:
    """Subtract 1 from the count of every piece in `mask`; each of those counts must be >= 1."""
    borrow = mask
    for j, s in enumerate(slices):
        if not borrow:
            break
        slices[j] = s ^ borrow
        borrow &= ~s
    while slices and not slices[-1]:
        slices.pop()


def _counter_min(slices: list[int], mask: int) -> int:
    """The pieces of (non-empty) `mask` whose count is smallest."""
    for s in reversed(slices):
        zero = mask & ~s
        if zero:
            mask = zero
    return mask


def _counter_get(slices: list[int], piece: int) -> int:
    return sum(((s >> piece) & 1) << j for j, s in enumerate(slices))


def _nth_bit(mask: int, n: int) -> int:
    """Index of the n-th (from 0) set bit of `mask`, by halving on bit counts: O(k) word operations.

    A uniform choice matters: picking the first candidate after a random offset favours pieces that
    follow long gaps, so leechers asking one seed at the same moment often chose the same piece and the
    seed sent it twice (measured: 1.17-1.26 seed copies per LAN run before, 1.08-1.10 after)."""
    base = 0
    width = mask.bit_length()
    while width > 64:
        half = width // 2
        low = mask & ((1 << half) - 1)
        c = low.bit_count()
        if n < c:
            mask, width = low, half
        else:
            n -= c
            mask >>= half
            base += half
            width -= half
    for _ in range(n):
        mask &= mask - 1
    return base + (mask & -mask).bit_length() - 1


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


# --- per-peer state ---------------------------------------------------------------------------------


class _Peer:
    __slots__ = (
        "backoff_until",
        "bad",
        "bits",
        "bytes_received",
        "depth",
        "excluded",
        "failures",
        "handed",
        "id",
        "last_receive",
        "pieces_received",
        "rate_bytes",
        "rate_time",
        "req_mask",
        "requests",
        "speed_key",
    )

    def __init__(self, peer: PeerId, depth: int, nbytes: int) -> None:
        self.id = peer
        # The pieces it holds, bit p of byte p // 8. Every have of every peer sets one bit here (16
        # million times in a 1,000-node simulation): in place, where an int would be rebuilt (a new
        # object of k bits each time). `mask` is the same set as an int, for set algebra.
        self.bits = bytearray(nbytes)
        self.bad = 0  # pieces it failed (rule 6): never asked again, not counted as available
        self.req_mask = 0  # pieces requested from it
        self.handed = 0  # pieces it announced as handed out (rule 12)
        self.requests: dict[int, float] = {}  # piece -> time requested
        self.failures = 0
        self.excluded = False
        self.backoff_until = -math.inf
        self.bytes_received = 0
        self.pieces_received = 0
        self.rate_bytes = 0.0
        self.rate_time = 0.0
        self.last_receive = -math.inf
        self.depth = depth
        self.speed_key = -math.inf  # -rate, for sorting fastest first; unmeasured peers first

    @property
    def mask(self) -> int:
        return int.from_bytes(self.bits, "little")

    @mask.setter
    def mask(self, value: int) -> None:
        self.bits[:] = value.to_bytes(len(self.bits), "little")

    def holds(self, piece: int) -> bool:
        return bool(self.bits[piece >> 3] >> (piece & 7) & 1)

    @property
    def rate(self) -> float | None:
        return self.rate_bytes / self.rate_time if self.rate_time > 0 else None


_SPEED_KEY = operator.attrgetter("speed_key")


# --- the scheduler ----------------------------------------------------------------------------------


class Scheduler:
    """One node's piece picker and upload slots. See the module docstring for the rules."""

    def __init__(
        self,
        piece_sizes: Sequence[int],
        have: Iterable[int] = (),
        *,
        seed: int,
        config: SchedulerConfig | None = None,
    ) -> None:
        if not piece_sizes:
            raise SchedulerError("a swarm needs at least one piece")
        if any(s <= 0 for s in piece_sizes):
            raise SchedulerError("piece sizes must be positive")
        self.config = config or SchedulerConfig()
        self._sizes = list(piece_sizes)
        self._k = len(self._sizes)
        self._full = (1 << self._k) - 1
        self._mean_size = sum(self._sizes) / self._k
        self._rng = random.Random(seed)
        held = 0
        for p in have:
            self._check_piece(p)
            held |= 1 << p
        self._held = held
        self._held_n = held.bit_count()
        self._nbytes = (self._k + 7) // 8
        self._held_bits = bytearray(held.to_bytes(self._nbytes, "little"))  # `_held`, for bit tests
        self._wanted = self._full & ~held
        self._inflight = 0
        self._requesters: dict[int, dict[PeerId, None]] = {}  # in-flight piece -> peers asked, in order
        self._avail: list[int] = []  # bit-sliced holder counts (live, non-excluded peers; minus bad)
        self._counted = self._full if held == self._full else self._wanted  # whose counts are kept
        self._peers: dict[PeerId, _Peer] = {}
        self._want: dict[PeerId, None] = {}  # insertion-ordered: deterministic
        self._outstanding = 0  # requests outstanding, all peers together
        self._endgame = False
        self._pending: list[Decision] = []
        self._timeouts: list[tuple[float, PeerId, int, float]] = []  # (deadline, peer, piece, requested)
        self._backoffs: list[tuple[float, PeerId]] = []
        self._have_cache: frozenset[int] | None = None
        # upload side
        self._queue: dict[tuple[PeerId, int], int] = {}  # (peer, piece) -> serves before it, FIFO order
        self._serves = 0  # uploads started so far
        self._sent_mask = 0  # pieces this node has started to upload at least once
        self._queued_count: dict[int, int] = {}
        self._queued_mask = 0
        self._serving: set[tuple[PeerId, int]] = set()
        self._serving_count: dict[int, int] = {}
        self._serving_mask = 0
        self._serving_peers: dict[PeerId, int] = {}  # peer -> uploads running to it

    # --- queries -------------------------------------------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return self._k

    @property
    def complete(self) -> bool:
        return self._held_n == self._k

    @property
    def held_count(self) -> int:
        return self._held_n

    @property
    def have(self) -> frozenset[int]:
        """The pieces held (cached; O(k) after a change)."""
        if self._have_cache is None:
            self._have_cache = frozenset(_bits(self._held))
        return self._have_cache

    @property
    def have_mask(self) -> int:
        """The pieces held, as the bits of an int (what `peer_bitfield_mask` takes)."""
        return self._held

    def has(self, piece: int) -> bool:
        return bool(self._held_bits[piece >> 3] >> (piece & 7) & 1)

    def missing(self) -> list[int]:
        return list(_bits(self._full & ~self._held))

    def unavailable(self) -> list[int]:
        """Missing pieces that no live, non-excluded peer can be asked for (what a stall names)."""
        anyone = 0
        for s in self._avail:
            anyone |= s
        return list(_bits(self._full & ~self._held & ~anyone))

    def in_flight(self) -> dict[PeerId, set[int]]:
        return {q.id: set(q.requests) for q in self._peers.values() if q.requests}

    def peer_stats(self, peer: PeerId) -> PeerStats:
        q = self._peers.get(peer)
        if q is None:
            raise SchedulerError(f"unknown peer {peer!r}")
        return PeerStats(
            bytes_received=q.bytes_received,
            pieces_received=q.pieces_received,
            rate=q.rate,
            depth=q.depth,
            in_flight=len(q.requests),
            failures=q.failures,
            excluded=q.excluded,
            held=q.mask.bit_count(),
            handed_out=q.handed.bit_count(),
        )

    @property
    def peers(self) -> list[PeerId]:
        return list(self._peers)

    def availability(self, piece: int) -> int:
        """How many live, non-excluded peers (that did not fail it) hold `piece`."""
        self._check_piece(piece)
        if (self._counted >> piece) & 1:
            return _counter_get(self._avail, piece)
        bit = 1 << piece
        return sum(1 for q in self._peers.values() if q.holds(piece) and not q.bad & bit and not q.excluded)

    @property
    def in_endgame(self) -> bool:
        return self._endgame

    @property
    def wants_tick(self) -> bool:
        """True when `tick` at the current time may return decisions (new requests, serves, pending)."""
        if self._pending:
            return True
        if self._want and self._outstanding < self.config.max_requests and self._held_n != self._k:
            return True
        return bool(self._queue) and len(self._serving) < self._slots()

    def next_timeout(self) -> float | None:
        """The earliest time at which `tick` has work even if no other event happens."""
        tq = self._timeouts
        while tq:
            _, peer, piece, t_req = tq[0]
            q = self._peers.get(peer)
            if q is not None and q.requests.get(piece) == t_req:
                break
            heapq.heappop(tq)
        bq = self._backoffs
        while bq and bq[0][1] not in self._peers:
            heapq.heappop(bq)
        if not bq:
            return tq[0][0] if tq else None
        return bq[0][0] if not tq or bq[0][0] < tq[0][0] else tq[0][0]

    # --- peers ---------------------------------------------------------------------------------------

    def peer_joined(self, peer: PeerId, now: float) -> None:
        if peer not in self._peers:
            self._peers[peer] = _Peer(peer, self.config.min_pipeline, self._nbytes)

    def peer_left(self, peer: PeerId, now: float) -> list[Decision]:
        q = self._peers.pop(peer, None)
        out: list[Decision] = []
        if q is not None:
            if not q.excluded:
                _counter_sub(self._avail, q.mask & ~q.bad & self._counted)
            for piece in list(q.requests):
                self._end_request(q, piece)
                out.append(Cancel(peer, piece))
            self._want.pop(peer, None)
        # upload side: drop its queue and running uploads
        for key in [key for key in self._queue if key[0] == peer]:
            self._unqueue(key)
        for key in [key for key in self._serving if key[0] == peer]:
            self._unserve(key)
        self._serve_free_slots(now, out)
        return out

    def peer_bitfield(self, peer: PeerId, pieces: Iterable[int], now: float) -> None:
        """The full set of pieces `peer` holds (replaces what was known)."""
        mask = 0
        for p in pieces:
            self._check_piece(p)
            mask |= 1 << p
        self.peer_bitfield_mask(peer, mask, now)

    def peer_bitfield_mask(self, peer: PeerId, mask: int, now: float) -> None:
        """`peer_bitfield` with the pieces as the bits of an int (bit p set: piece p held); O(k/64)."""
        if mask < 0 or mask >> self._k:
            raise SchedulerError(f"bitfield names pieces outside 0..{self._k - 1}")
        q = self._peer(peer)
        if not q.excluded:
            counted = self._counted
            _counter_sub(self._avail, q.mask & ~q.bad & ~mask & counted)
            _counter_add(self._avail, mask & ~q.mask & ~q.bad & counted)
        q.mask = mask
        self._maybe_want(q, mask)

    def peer_handed_out(self, peer: PeerId, piece: int, now: float) -> None:
        """`peer` (a full seed) has started to send `piece` to someone: ask it for others first (rule 12)."""
        self._check_piece(piece)
        self._peer(peer).handed |= 1 << piece

    def peer_have(self, peer: PeerId, piece: int, now: float) -> bool:
        """`peer` now holds `piece`. True when that made `peer` a candidate for a request (a `tick`
        may now have something to ask it); callers that tick on every event may ignore the result."""
        # the hot path of a large swarm (every piece, every peer): kept flat on purpose
        if not 0 <= piece < self._k:
            self._check_piece(piece)
        q = self._peers.get(peer)
        if q is None:
            q = self._peer(peer)
        i = piece >> 3
        b = 1 << (piece & 7)
        bits = q.bits
        v = bits[i]
        if v & b:
            return False
        bits[i] = v | b
        # not counted (a leecher, a piece it holds: about half the haves it hears of) stops here
        if self._held_bits[i] & b and self._held_n != self._k:
            return False
        bit = 1 << piece
        if q.excluded or q.bad & bit:
            return False
        slices = self._avail  # _counter_add(self._avail, bit), inlined
        for j, sl in enumerate(slices):
            if sl & bit:
                slices[j] = sl ^ bit
            else:
                slices[j] = sl | bit
                break
        else:
            slices.append(bit)
        if (self._wanted & bit or (self._endgame and self._inflight & bit)) and len(q.requests) < q.depth:
            self._want[peer] = None
            return True
        return False

    def peer_have_mask(self, peer: PeerId, mask: int, now: float) -> bool:
        """Batched `peer_have`: `peer` now also holds the pieces of `mask` (bit p set: piece p), a delta
        of its bitfield; O(k/64). The same state as one `peer_have` per piece, in one step; the result
        likewise says whether a `tick` may now ask that peer for something."""
        if mask < 0 or mask >> self._k:
            raise SchedulerError(f"have names pieces outside 0..{self._k - 1}")
        q = self._peer(peer)
        new = mask & ~q.mask
        if not new:
            return False
        q.mask |= new
        if q.excluded:
            return False
        new &= ~q.bad
        _counter_add(self._avail, new & self._counted)
        if new & (self._wanted | (self._inflight if self._endgame else 0)) and len(q.requests) < q.depth:
            self._want[peer] = None
            return True
        return False

    # --- download side -------------------------------------------------------------------------------

    def piece_received(self, peer: PeerId, piece: int, now: float) -> list[Decision]:
        """A verified piece from `peer`: it is now held and servable. Returns endgame Cancels."""
        self._check_piece(piece)
        bit = 1 << piece
        q = self._peers.get(peer)
        if q is not None:
            t_req = q.requests.pop(piece, None)
            if t_req is not None:
                self._outstanding -= 1
                q.req_mask &= ~bit
                size = self._sizes[piece]
                q.bytes_received += size
                q.pieces_received += 1
                start = t_req if t_req > q.last_receive else q.last_receive
                dt = max(0.0, now - start)
                if q.rate_time > 0:  # forget at a pace of rate_window pieces' worth of time
                    horizon = self.config.rate_window * self._mean_size * q.rate_time / q.rate_bytes
                    d = math.exp(-dt / horizon)
                    q.rate_bytes *= d
                    q.rate_time *= d
                q.rate_bytes += size
                q.rate_time += dt
                q.last_receive = now
                q.speed_key = -q.rate_bytes / q.rate_time if q.rate_time > 0 else 0.0
                q.depth = self._depth_for(q)
                if not q.excluded:
                    self._want[peer] = None
            if not q.holds(piece):  # it evidently holds it
                self.peer_have(peer, piece, now)
        out: list[Decision] = []
        if self._held & bit:
            self._move(piece, "received")
            return out
        requesters = self._requesters.pop(piece, None)
        if requesters:
            requesters.pop(peer, None)
            for other in requesters:
                o = self._peers[other]
                del o.requests[piece]
                self._outstanding -= 1
                o.req_mask &= ~bit
                if not o.excluded:
                    self._want[other] = None
                out.append(Cancel(other, piece))
        self._move(piece, "received")
        self._held |= bit
        self._held_bits[piece >> 3] |= 1 << (piece & 7)
        self._held_n += 1
        self._have_cache = None
        if self._held_n == self._k:
            self._count_everything()
        else:
            self._counted &= ~bit
        return out

    def _count_everything(self) -> None:
        """Complete: from now on keep the counts of every piece (rule 10 of a seed reads them)."""
        self._counted = self._full
        self._avail = []
        for q in self._peers.values():
            if not q.excluded:
                _counter_add(self._avail, q.mask & ~q.bad)

    def piece_failed(self, peer: PeerId, piece: int, now: float, reason: str) -> None:
        """A request ended without a good piece. `reason` is a key of `FAILURE_RULES`."""
        rule = FAILURE_RULES.get(reason)
        if rule is None:
            expected = sorted(FAILURE_RULES)
            raise SchedulerError(f"unknown failure reason {reason!r}; expected one of {expected}")
        self._check_piece(piece)
        q = self._peers.get(peer)
        if q is None:
            return
        if piece in q.requests:
            self._end_request(q, piece)
        self._apply_failure(q, piece, now, rule)

    def tick(self, now: float) -> list[Decision]:
        """Time out stale requests, issue new requests, serve queued uploads while slots are free."""
        out = self._pending
        self._pending = []
        self._expire(now, out)
        self._serve_free_slots(now, out)
        if self._want and self._held_n != self._k:
            self._fill(now, out)
            if self.config.endgame and not self._wanted and self._inflight and not self._endgame:
                self._endgame = True
                self._want.update((p, None) for p, q in self._peers.items() if not q.excluded)
                self._fill(now, out)
        else:
            self._want.clear()
        return out

    # --- upload side ---------------------------------------------------------------------------------

    def upload_requested(self, peer: PeerId, piece: int, now: float) -> list[Decision]:
        key = (peer, piece)
        out: list[Decision] = []
        if key in self._queue or key in self._serving:
            return out  # a duplicate of a request already taken: nothing new to decide
        self._serve_free_slots(now, out)  # catch up first, so "slot free" implies "queue empty"
        held = 0 <= piece < self._k and bool((self._held >> piece) & 1)
        outcome = ADMISSION[
            (
                held,
                len(self._serving) < self._slots(),
                len(self._queue) < self._queue_cap(),
            )
        ]
        if outcome == SERVE:
            self._serve(key, out)
        elif outcome == QUEUE:
            self._queue[key] = self._serves
            c = self._queued_count.get(piece, 0)
            self._queued_count[piece] = c + 1
            if not c:
                self._queued_mask |= 1 << piece
        else:
            out.append(Refuse(peer, piece, outcome))
        return out

    def upload_finished(self, peer: PeerId, piece: int, now: float, ok: bool) -> list[Decision]:
        key = (peer, piece)
        if key in self._serving:
            self._unserve(key)
            if ok and peer in self._peers:
                # The receiver holds it now (its have will follow): count it at once, so that the next
                # choice of rule 10 already sees this copy.
                self.peer_have(peer, piece, now)
        elif key in self._queue:
            self._unqueue(key)
        out: list[Decision] = []
        self._serve_free_slots(now, out)
        return out

    def upload_cancelled(self, peer: PeerId, piece: int, now: float) -> None:
        key = (peer, piece)
        if key in self._queue:
            self._unqueue(key)
        elif key in self._serving:
            self._unserve(key)  # the next queued request is served by the next tick

    # --- internals: pieces -----------------------------------------------------------------------------

    def _check_piece(self, piece: int) -> None:
        if not 0 <= piece < self._k:
            raise SchedulerError(f"piece {piece} out of range (0..{self._k - 1})")

    def _move(self, piece: int, event: str) -> None:
        """Apply `PIECE_TRANSITIONS` (through `_NEXT`, its form for the hot path)."""
        bit = 1 << piece
        old = _HELD if self._held & bit else _REQUESTED if self._inflight & bit else _WANTED
        new = _NEXT[event][old]
        if new < 0:
            raise SchedulerError(f"piece {piece}: no transition from {_STATES[old].value} on {event!r}")
        if new == old:
            return
        if old == _WANTED:
            self._wanted &= ~bit
        elif old == _REQUESTED:
            self._inflight &= ~bit
        if new == _WANTED:
            self._wanted |= bit
            self._endgame = False
            # every holder that can take a request may now be asked for it
            i = piece >> 3
            b = 1 << (piece & 7)
            for q in self._peers.values():
                if q.bits[i] & b and not q.excluded and not q.bad & bit:
                    self._want[q.id] = None
        elif new == _REQUESTED:
            self._inflight |= bit

    def _peer(self, peer: PeerId) -> _Peer:
        q = self._peers.get(peer)
        if q is None:
            q = self._peers[peer] = _Peer(peer, self.config.min_pipeline, self._nbytes)
        return q

    def _maybe_want(self, q: _Peer, mask: int) -> None:
        """Put `q` in the want set if it has a free pipeline slot and now holds something to ask for."""
        if q.excluded or self._held_n == self._k or len(q.requests) >= q.depth:
            return
        if self._outstanding >= self.config.max_requests and q.id not in self._want:
            self._want[q.id] = None  # no request is possible now; remember it for later
            return
        if mask & (self._wanted | (self._inflight if self._endgame else 0)) & ~q.bad:
            self._want[q.id] = None

    def _depth_for(self, q: _Peer) -> int:
        c = self.config
        rate = q.rate
        if rate is None:
            return c.min_pipeline
        d = math.ceil(rate * c.pipeline_window_s / self._mean_size)
        return min(c.max_pipeline, max(c.min_pipeline, d))

    # --- internals: requests ---------------------------------------------------------------------------

    def _fill(self, now: float, out: list[Decision]) -> None:
        peers = self._peers
        order = [peers[p] for p in self._want if p in peers]
        if len(order) > 1:
            order.sort(key=_SPEED_KEY)  # fastest first (rule 5); stable, so ties stay in arrival order
        cap = self.config.max_requests
        keep: dict[PeerId, None] = {}
        for q in order:
            if q.excluded or q.backoff_until > now:
                continue
            while len(q.requests) < q.depth:
                if self._outstanding >= cap:
                    keep[q.id] = None  # ask it again when a request of ours ends
                    break
                piece = self._pick(q)
                if piece < 0:
                    break
                self._request(q, piece, now, out)
        self._want = keep

    def _pick(self, q: _Peer) -> int:
        """Rule 3 (or rule 8 in endgame): the piece to ask `q` for next, or -1."""
        cand = self._wanted & q.mask & ~q.bad
        if cand:
            if q.handed:
                cand = cand & ~q.handed or cand
            cand = _counter_min(self._avail, cand)
            if cand & (cand - 1):  # several: a uniformly random one of them
                return _nth_bit(cand, self._rng.randrange(cand.bit_count()))
            return (cand & -cand).bit_length() - 1
        if not self._endgame:
            return -1
        cand = self._inflight & q.mask & ~q.bad & ~q.req_mask
        best, best_n = -1, 1 + self.config.endgame_duplicates
        for p in _bits(cand):
            n = len(self._requesters[p])
            if n < best_n:
                best, best_n = p, n
        return best

    def _request(self, q: _Peer, piece: int, now: float, out: list[Decision]) -> None:
        self._move(piece, "request")
        bit = 1 << piece
        q.requests[piece] = now
        self._outstanding += 1
        q.req_mask |= bit
        r = self._requesters.get(piece)
        if r is None:
            self._requesters[piece] = {q.id: None}
        else:
            r[q.id] = None
        heapq.heappush(self._timeouts, (now + self._timeout_for(q, piece), q.id, piece, now))
        out.append(Request(q.id, piece))

    def _timeout_for(self, q: _Peer, piece: int) -> float:
        c = self.config
        rate = q.rate
        if rate is None:
            return c.request_timeout_s
        return max(c.request_timeout_s, c.timeout_factor * q.depth * self._sizes[piece] / rate)

    def _end_request(self, q: _Peer, piece: int) -> None:
        """A request of `q` for `piece` ended without the piece (failure, cancel, peer gone)."""
        del q.requests[piece]
        self._outstanding -= 1
        q.req_mask &= ~(1 << piece)
        r = self._requesters.get(piece)
        if r is not None:
            r.pop(q.id, None)
            if not r:
                del self._requesters[piece]
        if not q.excluded:
            self._want[q.id] = None
        if not self._held & (1 << piece):
            self._move(piece, "ended" if r else "ended_last")

    def _apply_failure(self, q: _Peer, piece: int, now: float, rule: FailureRule) -> None:
        bit = 1 << piece
        if rule.avoid_piece and not q.bad & bit:
            if q.holds(piece) and not q.excluded and self._counted & bit:
                _counter_sub(self._avail, bit)
            q.bad |= bit
        if rule.backoff:
            q.backoff_until = now + self.config.refuse_backoff_s
            heapq.heappush(self._backoffs, (q.backoff_until, q.id))
        if rule.counts:
            q.failures += 1
            if q.failures > self.config.max_failures_per_peer and not q.excluded:
                self._exclude(q)

    def _exclude(self, q: _Peer) -> None:
        _counter_sub(self._avail, q.mask & ~q.bad & self._counted)
        q.excluded = True
        self._want.pop(q.id, None)
        for piece in list(q.requests):
            self._end_request(q, piece)
            self._pending.append(Cancel(q.id, piece))
        self._want.pop(q.id, None)

    def _expire(self, now: float, out: list[Decision]) -> None:
        tq = self._timeouts
        while tq and tq[0][0] <= now:
            _, peer, piece, t_req = heapq.heappop(tq)
            q = self._peers.get(peer)
            if q is None or q.requests.get(piece) != t_req:
                continue  # that request already ended
            deadline = t_req + self._timeout_for(q, piece)
            if deadline > now:  # the peer's measured rate says it still has time
                heapq.heappush(tq, (deadline, peer, piece, t_req))
                continue
            self._end_request(q, piece)
            out.append(Cancel(peer, piece))
            self._apply_failure(q, piece, now, FAILURE_RULES["timeout"])
        bq = self._backoffs
        while bq and bq[0][0] <= now:
            _, peer = heapq.heappop(bq)
            q = self._peers.get(peer)
            if q is not None and not q.excluded and q.backoff_until <= now:
                self._want[peer] = None

    # --- internals: uploads ----------------------------------------------------------------------------

    def _queue_cap(self) -> int:
        c = self.config
        return c.seed_max_upload_queue if self._held_n == self._k else c.max_upload_queue

    def _slots(self) -> int:
        c = self.config
        return c.seed_max_uploads if self._held_n == self._k else c.max_uploads

    def _serve(self, key: tuple[PeerId, int], out: list[Decision]) -> None:
        self._serves += 1
        bit = 1 << key[1]
        out.append(Serve(*key))
        if not self._sent_mask & bit and self._held_n == self._k:
            out.append(HandedOut(key[1]))  # rule 12
        self._sent_mask |= bit
        self._serving.add(key)
        self._serving_peers[key[0]] = self._serving_peers.get(key[0], 0) + 1
        piece = key[1]
        c = self._serving_count.get(piece, 0)
        self._serving_count[piece] = c + 1
        if not c:
            self._serving_mask |= 1 << piece

    def _unserve(self, key: tuple[PeerId, int]) -> None:
        self._serving.discard(key)
        n = self._serving_peers[key[0]] - 1
        if n:
            self._serving_peers[key[0]] = n
        else:
            del self._serving_peers[key[0]]
        piece = key[1]
        c = self._serving_count[piece] - 1
        if c:
            self._serving_count[piece] = c
        else:
            del self._serving_count[piece]
            self._serving_mask &= ~(1 << piece)

    def _unqueue(self, key: tuple[PeerId, int]) -> None:
        del self._queue[key]
        piece = key[1]
        c = self._queued_count[piece] - 1
        if c:
            self._queued_count[piece] = c
        else:
            del self._queued_count[piece]
            self._queued_mask &= ~(1 << piece)

    def _serve_free_slots(self, now: float, out: list[Decision]) -> None:
        while self._queue and len(self._serving) < self._slots():
            key = self._next_queued(now)
            self._unqueue(key)
            self._serve(key, out)

    def _next_queued(self, now: float) -> tuple[PeerId, int]:
        """Rule 10: which queued upload request to serve next."""
        queue = self._queue
        busy = self._serving_peers
        if len(queue) == 1:
            return next(iter(queue))
        # requests of peers this node is not uploading to yet come first
        eligible = [key for key in queue if key[0] not in busy] if busy else list(queue)
        if not eligible:
            eligible = list(queue)
        first = eligible[0]
        if self._held_n != self._k or self._serves - queue[first] > self.config.seed_max_overtakes:
            return first
        pieces = 0
        for key in eligible:
            pieces |= 1 << key[1]
        pieces = pieces & ~self._sent_mask or pieces  # never sent by this node: new to the swarm
        best = _counter_min(self._avail, pieces & ~self._serving_mask or pieces)
        for key in eligible:
            if (best >> key[1]) & 1:
                return key
        raise AssertionError("unreachable: best is a subset of the eligible pieces")  # pragma: no cover
