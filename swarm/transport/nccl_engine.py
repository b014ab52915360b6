"""The NCCL transport's engine: channels, piece signals, sends, receives, verification, failure.

The design (channels, set-up, signals, memory, failure) is in swarm.transport.nccl's docstring;
`NcclEngine` holds the part that runs on the engine thread, `NcclTransport` subclasses it with the
configuration and the node's calls, which only enqueue commands.

Threads: one engine thread owns every communicator and stream (NCCL calls for a communicator are never
issued concurrently); the node's calls only enqueue commands; callbacks to the node come from the
engine thread; aborts run on short-lived background threads.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.errors import TransportError
from swarm.manifest import checksum, checksum_async
from swarm.protocol import Channel
from swarm.transport.base import Events, Transport
from swarm.transport.command_loop import CommandLoop
from swarm.transport.nccl_binding import NCCL_IN_PROGRESS, NCCL_SUCCESS, Nccl

log = logging.getLogger("swarm.transport.nccl")

WARMUP_BYTES = 4
#: A receiver repeats its "open" this often until its channel is up (control messages can be dropped).
OPEN_RESEND_S = 1.0


@dataclass(eq=False)
class _Op:
    """One piece (or the warm-up) on a channel."""

    piece: int
    seq: int = -1
    nbytes: int = 0
    buf: torch.Tensor | None = None  # what NCCL reads or writes; holds a staging buffer alive
    direct: bool = False  # receiver: written straight into the parameters
    issued: float = 0.0
    done: torch.cuda.Event | None = None  # after the NCCL operation, on the channel stream
    checked: torch.cuda.Event | None = None  # receiver: after checksum (and copy to host)
    sums: torch.Tensor | None = None  # receiver: pinned host [s1, s2]
    copied: torch.cuda.Event | None = None  # receiver: after a verified staging buffer was scattered


@dataclass(eq=False)
class _Chan:
    peer: str
    cid: str
    sending: bool
    comm: int
    stream: torch.cuda.Stream
    side: torch.cuda.Stream | None  # receiver: verification and scatter
    created: float
    state: str = "init"  # init -> ready -> dead
    busy: _Op | None = None  # an NCCL call answered "in progress": nothing else may be issued yet
    waiting: deque[_Op] = field(default_factory=deque)  # not yet issued (sender: queued pieces;
    # receiver: "piece" signals)
    flight: deque[_Op] = field(default_factory=deque)  # issued, in stream order
    scatter: deque[_Op] = field(default_factory=deque)  # receiver: verified, being scattered
    next_seq: int = 0  # seq 0 is the warm-up
    progress_at: float = 0.0  # last time the head of `flight` moved
    ready_at: float = 0.0
    uid: bytes = b""  # receiver: the NCCL unique id it created, re-sent until the channel is up
    opened_at: float = 0.0  # receiver: when "open" was last sent
    batch: bool = False  # sender: the receiver reads "pieces" signals (several pieces in one message)


def _stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def _event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def _done(event: torch.cuda.Event) -> bool:
    return bool(event.query())  # type: ignore[no-untyped-call]


def _open_params(ch: _Chan) -> dict[str, Any]:
    """A receiver's "open": its NCCL unique id, and that it reads "pieces" signals (a peer that does
    not say so gets one "piece" message a piece, as before they existed)."""
    return {"op": "open", "cid": ch.cid, "uid": ch.uid, "batch": True}


def _ops(ch: _Chan) -> list[_Op]:
    """Every piece operation a channel holds, issued or not."""
    return ([ch.busy] if ch.busy is not None else []) + list(ch.flight) + list(ch.waiting) + list(ch.scatter)


class NcclEngine(Transport):
    """The engine thread's half of `NcclTransport` (see the module docstring): every method here runs
    on that thread, except `_post`, which hands it a command."""

    # Set by NcclTransport.
    nccl: Nccl | None
    pipeline: int
    rate_limit: float | None
    max_ctas: int | None
    init_timeout: float
    op_timeout: float

    def __init__(self) -> None:
        super().__init__()
        self._checksum: Callable[[Sequence[torch.Tensor]], torch.Tensor] = checksum_async
        self._gpu_checksum = True  # the manifest's algorithm is wsum32, computed on the GPU
        self.device: torch.device | None = None
        self._loop = CommandLoop("swarm-nccl", "NCCL transport", log)
        self._teardowns: list[threading.Thread] = []
        # Engine-thread state.
        self._send: dict[str, _Chan] = {}
        self._recv: dict[str, _Chan] = {}
        self._orphans: dict[str, list[tuple[int, float]]] = {}  # sends asked before the channel exists
        self._dead_cids: set[str] = set()
        self._have: set[int] = set()  # pieces this transport received and verified
        self._direct: dict[int, _Op] = {}  # piece -> its receive straight into the parameters
        self._committing: set[int] = set()  # pieces whose verified staging buffer is being scattered
        self._rate_next = 0.0
        self._stats: dict[str, Any] = {
            "bytes_sent": 0,
            "bytes_received": 0,
            "pieces_sent": 0,
            "pieces_received": 0,
            "checksum_failures": 0,
            "channels_opened": 0,
            "channels_failed": 0,
            "init_s": [],
        }

    def _post(self, fn: Callable[[], None]) -> None:
        self._loop.post(fn)

    # --- the engine thread -------------------------------------------------------------------------

    def _step(self, now: float) -> bool:
        """After each round of commands (swarm.transport.command_loop): move every channel on; whether
        anything is under way (set-up, queued or in-flight pieces)."""
        active = bool(self._orphans)
        for ch in list(self._send.values()) + list(self._recv.values()):
            try:
                self._progress(ch, now)
            except Exception as e:
                log.exception("NCCL channel %s to %s failed", ch.cid, ch.peer)
                self._fail(ch, f"{type(e).__name__}: {e}")
            active = active or (
                ch.state == "init" or ch.busy is not None or bool(ch.waiting or ch.flight or ch.scatter)
            )
        self._expire_orphans(now)
        return active

    def _events(self) -> Events:
        assert self.events is not None
        return self.events

    def _notify(self, peer: str, params: dict[str, Any]) -> None:
        try:
            self._events().notify(peer, Channel(self.name, params))
        except Exception:
            log.exception("could not send an NCCL channel message to %s", peer)

    def _new_chan(self, peer: str, cid: str, uid: bytes, sending: bool) -> _Chan:
        assert self.nccl is not None and self.device is not None
        comm, _ = self.nccl.init_rank(2, uid, 0 if sending else 1, blocking=False, max_ctas=self.max_ctas)
        ch = _Chan(
            peer=peer,
            cid=cid,
            sending=sending,
            comm=comm,
            stream=_stream(self.device),
            side=None if sending else _stream(self.device),
            created=time.monotonic(),
            uid=b"" if sending else uid,
        )
        self._stats["channels_opened"] += 1
        # The warm-up transfer is the channel's first operation on both sides (seq 0).
        ch.waiting.appendleft(_Op(piece=-1, nbytes=WARMUP_BYTES, seq=0))
        ch.next_seq = 1
        return ch

    def _open_recv(self, peer: str) -> None:
        old = self._recv.get(peer)
        if old is not None and old.state != "dead":
            return
        assert self.nccl is not None
        cid = secrets.token_hex(6)
        try:
            uid = self.nccl.unique_id()
            self._recv[peer] = ch = self._new_chan(peer, cid, uid, sending=False)
            ch.opened_at = time.monotonic()
        except TransportError as e:
            log.warning("cannot open an NCCL channel from %s: %s", peer, e)
            self._events().closed(peer, f"NCCL set-up failed: {e}")
            return
        self._notify(peer, _open_params(ch))

    def _message(self, peer: str, params: dict[str, Any]) -> None:
        op = params.get("op")
        cid = params.get("cid")
        if not isinstance(cid, str):
            log.warning("NCCL channel message without a channel id from %s: %.200r", peer, params)
            return
        if op == "open":
            uid = params.get("uid")
            if not isinstance(uid, bytes):
                log.warning("NCCL open from %s without a unique id", peer)
                return
            old = self._send.get(peer)
            if (old is not None and old.cid == cid) or cid in self._dead_cids:
                return  # a repeated "open" of a channel this side already has (or has given up)
            if old is not None:
                self._fail(old, "peer opened a new channel", notify=False, report_closed=False)
            try:
                sender = self._new_chan(peer, cid, uid, sending=True)
            except TransportError as e:
                log.warning("cannot open an NCCL channel to %s: %s", peer, e)
                self._notify(peer, {"op": "close", "cid": cid, "reason": f"NCCL set-up failed: {e}"[:200]})
                return
            sender.batch = params.get("batch") is True
            self._send[peer] = sender
            for p, _ in self._orphans.pop(peer, []):
                sender.waiting.append(_Op(piece=p))
        elif op in ("piece", "pieces"):
            receiver = self._recv.get(peer)
            if receiver is None or receiver.cid != cid:
                if cid not in self._dead_cids:
                    log.warning("NCCL piece signal from %s for unknown channel %s", peer, cid)
                return
            assert self.manifest is not None  # bound before any channel opened
            seq = params.get("seq")
            pieces = params.get("pieces") if op == "pieces" else [params.get("piece")]
            if (
                type(seq) is not int
                or not isinstance(pieces, list)
                or not 0 < len(pieces) <= len(self.manifest.pieces)
                or any(type(p) is not int for p in pieces)
            ):
                self._fail(receiver, f"malformed piece signal {params!r:.200}")
                return
            # Checked one by one when issued (order, range), as single signals are.
            receiver.waiting.extend(_Op(piece=p, seq=seq + i) for i, p in enumerate(pieces))
        elif op == "close":
            reason = str(params.get("reason", ""))[:200]
            for chans in (self._send, self._recv):
                found = chans.get(peer)
                if found is not None and found.cid == cid:
                    self._fail(found, f"peer closed the channel: {reason}", notify=False)
        else:
            log.warning("unknown NCCL channel op %r from %s", op, peer)

    def _queue_send(self, peer: str, piece: int) -> None:
        ch = self._send.get(peer)
        if ch is None or ch.state == "dead":
            self._orphans.setdefault(peer, []).append((piece, time.monotonic()))
            return
        ch.waiting.append(_Op(piece=piece))

    def _cancel(self, peer: str, piece: int) -> None:
        ch = self._send.get(peer)
        if ch is not None:
            for op in list(ch.waiting):
                if op.piece == piece:
                    ch.waiting.remove(op)
                    self._events().sent(peer, piece, False)
                    return
        orphans = self._orphans.get(peer)
        if orphans:
            for item in orphans:
                if item[0] == piece:
                    orphans.remove(item)
                    self._events().sent(peer, piece, False)
                    return

    def _expire_orphans(self, now: float) -> None:
        for peer, items in list(self._orphans.items()):
            keep = [(p, t) for p, t in items if now - t < self.init_timeout]
            for p, t in items:
                if now - t >= self.init_timeout:
                    log.warning(
                        "no NCCL channel to %s opened within %.0f s; piece %d not sent", peer, now - t, p
                    )
                    self._events().sent(peer, p, False)
            if keep:
                self._orphans[peer] = keep
            else:
                del self._orphans[peer]

    # --- progress of one channel ---------------------------------------------------------------------

    def _progress(self, ch: _Chan, now: float) -> None:
        assert self.nccl is not None
        if ch.state == "dead":
            return
        if ch.state == "init":
            state = self.nccl.async_error(ch.comm)
            if state == NCCL_IN_PROGRESS:
                if now - ch.created > self.init_timeout:
                    self._fail(ch, f"NCCL set-up did not finish within {self.init_timeout:.0f} s")
                elif not ch.sending and now - ch.opened_at > OPEN_RESEND_S:
                    # The control plane may have dropped "open" (a peer not yet accepted, say):
                    # repeat it; the sender ignores copies of a channel it already has.
                    ch.opened_at = now
                    self._notify(ch.peer, _open_params(ch))
                return
            if state != NCCL_SUCCESS:
                self._fail(ch, f"NCCL set-up failed: {self.nccl.error_string(state)}")
                return
            ch.state = "ready"
            ch.ready_at = ch.progress_at = now
            self._stats["init_s"].append(round(now - ch.created, 4))
        if ch.busy is not None:
            state = self.nccl.async_error(ch.comm)
            if state == NCCL_IN_PROGRESS:
                if now - ch.busy.issued > self.op_timeout:
                    self._fail(ch, f"NCCL call did not return within {self.op_timeout:.0f} s")
                return
            if state != NCCL_SUCCESS:
                self._fail(ch, f"NCCL error: {self.nccl.error_string(state)}")
                return
            op, ch.busy = ch.busy, None
            self._enqueued(ch, op)
        elif ch.flight:
            state = self.nccl.async_error(ch.comm)
            if state not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                self._fail(ch, f"NCCL error: {self.nccl.error_string(state)}")
                return
        self._reap(ch, now)
        if ch.state != "dead":
            self._issue(ch, now)

    def _issue(self, ch: _Chan, now: float) -> None:
        """Enqueue what the channel can take now. A sender tells the receiver the pieces it numbered
        here in one message once they are enqueued (also when it stops early or fails)."""
        signals: list[_Op] = []
        try:
            self._issue_ops(ch, now, signals)
        finally:
            if signals:
                self._signal(ch, signals)

    def _signal(self, ch: _Chan, ops: list[_Op]) -> None:
        """The pieces `ops` follow on the channel, in `seq` order: one "pieces" message to a receiver
        that announced it reads them, else one "piece" message each."""
        if ch.batch:
            self._notify(
                ch.peer, {"op": "pieces", "cid": ch.cid, "seq": ops[0].seq, "pieces": [o.piece for o in ops]}
            )
            return
        for op in ops:
            self._notify(ch.peer, {"op": "piece", "cid": ch.cid, "seq": op.seq, "piece": op.piece})

    def _issue_ops(self, ch: _Chan, now: float, signals: list[_Op]) -> None:
        assert self.nccl is not None and self.manifest is not None and self.device is not None
        while ch.busy is None and ch.waiting and len(ch.flight) < self.pipeline:
            op = ch.waiting[0]
            if ch.sending:
                if op.seq < 0:  # a piece: pace it, number it, tell the receiver
                    length = self.manifest.pieces[op.piece].length
                    if self.rate_limit:
                        if now < self._rate_next:
                            return
                        self._rate_next = max(self._rate_next, now) + length / self.rate_limit
                    op.seq = ch.next_seq
                    ch.next_seq += 1
                    op.nbytes = length
                    signals.append(op)
                ch.waiting.popleft()
                op.buf = self._source(op, ch.stream)
                rc = self.nccl.send(ch.comm, op.buf.data_ptr(), op.nbytes, 1, ch.stream.cuda_stream)
            else:
                expected = 0 if op.piece < 0 else ch.next_seq
                if op.seq != expected:
                    raise TransportError(f"piece signal out of order: seq {op.seq}, expected {expected}")
                if op.piece >= 0:
                    if not 0 <= op.piece < len(self.manifest.pieces):
                        raise TransportError(f"piece signal for piece {op.piece} outside the manifest")
                    ch.next_seq += 1
                ch.waiting.popleft()
                op.buf = self._destination(op, ch.stream)
                rc = self.nccl.recv(ch.comm, op.buf.data_ptr(), op.nbytes, 0, ch.stream.cuda_stream)
            op.issued = now
            if not ch.flight:
                ch.progress_at = now
            if rc == NCCL_IN_PROGRESS:
                ch.busy = op
                return
            self._enqueued(ch, op)

    def _source(self, op: _Op, stream: torch.cuda.Stream) -> torch.Tensor:
        """The bytes to send; a staging buffer is allocated and packed on the channel's stream."""
        assert self.manifest is not None and self.device is not None
        if op.piece < 0:
            torch.cuda.set_stream(stream)
            return torch.zeros(WARMUP_BYTES, dtype=torch.uint8, device=self.device)
        views = self.manifest.piece_views(self.views, op.piece)
        if len(views) == 1:
            return views[0]
        torch.cuda.set_stream(stream)
        buf = torch.empty(op.nbytes, dtype=torch.uint8, device=self.device)
        torch.cat(views, out=buf)
        return buf

    def _destination(self, op: _Op, stream: torch.cuda.Stream) -> torch.Tensor:
        """Where a receive lands: the parameters when nothing else may write or has verified them,
        else a staging buffer allocated on the channel's stream (which is left current)."""
        assert self.manifest is not None and self.device is not None
        if op.piece < 0:
            op.nbytes = WARMUP_BYTES
            torch.cuda.set_stream(stream)
            return torch.empty(WARMUP_BYTES, dtype=torch.uint8, device=self.device)
        piece = self.manifest.pieces[op.piece]
        op.nbytes = piece.length
        if (
            piece.zero_copy
            and op.piece not in self._have
            and op.piece not in self._direct
            and op.piece not in self._committing
        ):
            op.direct = True
            self._direct[op.piece] = op
            return self.manifest.piece_views(self.views, op.piece)[0]
        torch.cuda.set_stream(stream)
        return torch.empty(piece.length, dtype=torch.uint8, device=self.device)

    def _enqueued(self, ch: _Chan, op: _Op) -> None:
        """The NCCL operation is on the channel stream: mark its end; on a receiver, verify after it."""
        assert op.buf is not None
        op.done = _event()
        op.done.record(ch.stream)
        if not ch.sending and op.piece >= 0 and self._gpu_checksum:
            assert ch.side is not None
            # The engine thread's current stream is set per operation (set_stream costs ~3 us where
            # a `with torch.cuda.stream()` block costs ~20 us, measured on an H200 host).
            torch.cuda.set_stream(ch.side)
            ch.side.wait_event(op.done)
            sums = self._checksum([op.buf])
            op.sums = torch.empty(2, dtype=torch.int64, pin_memory=True)
            op.sums.copy_(sums, non_blocking=True)
            op.checked = _event()
            op.checked.record(ch.side)
        ch.flight.append(op)

    def _reap(self, ch: _Chan, now: float) -> None:
        """Report what finished, in order; time out a head that does not move."""
        events = self._events()
        while ch.flight:
            op = ch.flight[0]
            last = op.checked if op.checked is not None else op.done
            assert last is not None
            if not _done(last):
                if now - max(ch.progress_at, op.issued) > self.op_timeout:
                    raise TransportError(
                        f"piece {op.piece} made no progress for {self.op_timeout:.0f} s "
                        f"({'send' if ch.sending else 'receive'})"
                    )
                break
            ch.flight.popleft()
            ch.progress_at = now
            if op.piece < 0:
                continue
            if ch.sending:
                self._stats["bytes_sent"] += op.nbytes
                self._stats["pieces_sent"] += 1
                op.buf = None
                events.sent(ch.peer, op.piece, True)
            else:
                self._verified(ch, op)
        while ch.scatter and ch.scatter[0].copied is not None and _done(ch.scatter[0].copied):
            op = ch.scatter.popleft()
            self._committing.discard(op.piece)
            self._have.add(op.piece)
            op.buf = None
            self._stats["bytes_received"] += op.nbytes
            self._stats["pieces_received"] += 1
            events.received(ch.peer, op.piece)

    def _verified(self, ch: _Chan, op: _Op) -> None:
        assert self.manifest is not None and op.buf is not None
        events = self._events()
        if op.sums is not None:
            s1, s2 = (int(v) & 0xFFFFFFFFFFFFFFFF for v in op.sums.tolist())
            got = f"{s1:016x}{s2:016x}"
        else:  # a manifest with a host-memory algorithm (blake3): hash a host copy, synchronously
            if ch.side is not None:
                torch.cuda.set_stream(ch.side)
            got = checksum([op.buf], self.manifest.checksum)
        want = self.checksums[op.piece] if self.checksums is not None else None
        if op.direct and self._direct.get(op.piece) is op:
            del self._direct[op.piece]
        if want is None or got != want:
            self._stats["checksum_failures"] += 1
            op.buf = None
            if want is None:
                log.warning("piece %d from %s arrived before its checksums were known", op.piece, ch.peer)
                events.failed(ch.peer, op.piece, "error")
            else:
                log.warning(
                    "piece %d from %s: checksum mismatch (got %s, expected %s)", op.piece, ch.peer, got, want
                )
                events.failed(ch.peer, op.piece, "bad_checksum")
            return
        if op.direct or op.piece in self._have or op.piece in self._committing:
            self._have.add(op.piece)
            op.buf = None
            self._stats["bytes_received"] += op.nbytes
            self._stats["pieces_received"] += 1
            events.received(ch.peer, op.piece)
            return
        # A verified staging buffer: scatter it into the parameters, after any receive of the same
        # piece that still writes there straight, then report.
        assert ch.side is not None and op.buf is not None
        self._committing.add(op.piece)
        torch.cuda.set_stream(ch.side)
        other = self._direct.get(op.piece)
        if other is not None and other.done is not None:
            ch.side.wait_event(other.done)
        offset = 0
        for view in self.manifest.piece_views(self.views, op.piece):
            n = view.numel()
            view.copy_(op.buf[offset : offset + n])
            offset += n
        op.copied = _event()
        op.copied.record(ch.side)
        ch.scatter.append(op)

    # --- failure and tear-down ----------------------------------------------------------------------

    def _fail(self, ch: _Chan, reason: str, *, notify: bool = True, report_closed: bool = True) -> None:
        """Abort one channel (and, on a failure, the peer's other direction): report its pieces."""
        if ch.state == "dead":
            return
        self._stats["channels_failed"] += 1
        log.warning("NCCL channel %s %s %s: %s", ch.cid, "to" if ch.sending else "from", ch.peer, reason)
        ops = self._retire(ch, reason, notify=notify)
        events = self._events()
        for op in ops:
            if op.piece < 0:
                continue
            if ch.sending:
                events.sent(ch.peer, op.piece, False)
            else:
                events.failed(ch.peer, op.piece, "error")
        self._abort_later(ch, ops)
        if report_closed:
            other = (self._recv if ch.sending else self._send).get(ch.peer)
            if other is not None:
                self._fail(other, reason, notify=notify, report_closed=False)
            try:
                events.closed(ch.peer, reason)
            except Exception:
                log.exception("closed() callback failed")

    def _abort_later(self, ch: _Chan, ops: list[_Op]) -> None:
        """Abort the communicator off the engine thread. Until its streams are idle, the buffers stay
        alive and the pieces it was writing stay fenced (`_direct`, `_committing`): a new receive of
        such a piece lands in staging, and a scatter of it waits for the aborted receive's event."""
        assert self.nccl is not None
        nccl = self.nccl
        for op in ch.scatter:
            self._committing.add(op.piece)

        def unfence() -> None:
            for op in ops:
                if self._direct.get(op.piece) is op:
                    del self._direct[op.piece]
                if op.copied is not None:
                    self._committing.discard(op.piece)
            ops.clear()

        def teardown() -> None:
            started = time.monotonic()
            rc = nccl.abort(ch.comm)
            if rc != NCCL_SUCCESS:
                log.warning("ncclCommAbort of channel %s returned %s", ch.cid, nccl.error_string(rc))
            deadline = started + 30.0
            for s in (ch.stream, ch.side):
                if s is None:
                    continue
                marker = _event()
                marker.record(s)
                while not _done(marker):
                    if time.monotonic() > deadline:
                        log.error("streams of aborted NCCL channel %s still busy after 30 s", ch.cid)
                        _leaked.append(ops)  # never freed, never unfenced
                        return
                    time.sleep(0.001)
            log.info("NCCL channel %s aborted in %.3f s", ch.cid, time.monotonic() - started)
            self._post(unfence)

        t = threading.Thread(
            target=self._with_device(teardown), name=f"swarm-nccl-abort-{ch.cid}", daemon=True
        )
        self._teardowns = [x for x in self._teardowns if x.is_alive()]
        self._teardowns.append(t)
        t.start()

    def _with_device(self, fn: Callable[[], None]) -> Callable[[], None]:
        device = self.device

        def run() -> None:
            if device is not None:
                torch.cuda.set_device(device)
            try:
                fn()
            except Exception:
                log.exception("NCCL tear-down failed")

        return run

    def _drop(self, peer: str, reason: str, *, report: bool) -> None:
        for chans in (self._send, self._recv):
            ch = chans.get(peer)
            if ch is not None:
                if report:
                    self._fail(ch, reason, report_closed=False)
                else:
                    self._silent_abort(ch, reason)
        self._orphans.pop(peer, None)

    def _silent_abort(self, ch: _Chan, reason: str) -> None:
        """Abort without reporting pieces (the node dropped the peer and forgets its requests)."""
        self._abort_later(ch, self._retire(ch, reason, notify=True))

    def _retire(self, ch: _Chan, reason: str, *, notify: bool) -> list[_Op]:
        """Mark a channel dead and forget it (its id stays known, so late messages for it are ignored);
        tell the peer unless `notify` is false. Returns every piece operation it held."""
        ch.state = "dead"
        chans = self._send if ch.sending else self._recv
        if chans.get(ch.peer) is ch:
            del chans[ch.peer]
        self._dead_cids.add(ch.cid)
        if notify:
            self._notify(ch.peer, {"op": "close", "cid": ch.cid, "reason": reason[:200]})
        return _ops(ch)

    def _close_all(self) -> None:
        for peer in set(self._send) | set(self._recv):
            self._drop(peer, "closing", report=False)


_leaked: list[list[_Op]] = []  # buffers of channels whose streams never went idle: never freed
