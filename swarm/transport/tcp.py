"""TCP transport: pieces of host-memory tensors over plain TCP streams, one stream per peer pair.

Set-up: every node listens on one data port (announced in its Hello). A leecher that wants pieces from a
peer connects to that peer's data port; the connection then carries that peer's pieces to the leecher.
The first bytes authenticate the leecher: the listener sends a random nonce; the leecher answers with
its peer id, its Ed25519 public key, its signature over "vllm-swarm-data" + nonce + the listener's id +
its own id, and, when a cluster token is set, HMAC-SHA256(key, the same bytes). The listener checks that
the id is the key's (swarm/identity.py), the signature, and the MAC, so nobody opens a channel under a
member's id, with or without a token, and recorded credentials are worth nothing (the nonce is fresh).
The listener only serves pieces to a channel whose peer id matches a control-plane peer it accepted a
request from (the node's scheduler decides `send`), so an unauthenticated client receives nothing.

Wire form of a piece: a 12-byte header (piece index u32, length u64, big-endian), then the bytes.

Bytes move without per-element Python work: the sender hands each span's memory (a zero-copy numpy view
of the tensor) to `sendall`; the receiver `recv_into`s a preallocated staging buffer, verifies the
checksum there, and only then copies the piece into the tensors (one memcpy, ~10x faster than any LAN
link), so a bad or duplicated piece never touches verified memory. Tensors on a GPU are staged through
host memory (this transport is for host memory; use the NCCL transport between GPUs).

Limits: one stream per pair, so a pair's pieces move one after another (pipelining keeps the stream
busy); every socket operation is bounded by `io_timeout_s`, after which the channel is dropped and the
peer reported closed. `rate_cap` (bytes/s per node, shared by all uploads) limits how much a serving
node sends, for links shared with inference traffic.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from swarm import capture
from swarm.errors import TransportError
from swarm.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, peer_id_of, verify
from swarm.manifest import checksum
from swarm.transport.base import Transport

HEADER = struct.Struct("!IQ")
NONCE_SIZE = 16
_DATA_CONTEXT = b"vllm-swarm-data"
_STOP = -1
_POLL_S = 0.5


class RateLimiter:
    """A token bucket shared by every upload of one node; `None` rate means unlimited."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


class _Sender:
    """Sends queued pieces to one peer over its data stream, in its own thread."""

    def __init__(self, transport: TcpTransport, peer: str, sock: socket.socket) -> None:
        self.transport = transport
        self.peer = peer
        self.sock = sock
        self.queue: queue.Queue[int] = queue.Queue()
        self.cancelled: set[int] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"swarm-tcp-send-{peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t = self.transport
        reason = "closed"
        try:
            while True:
                try:
                    piece = self.queue.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._peer_hung_up():
                        reason = "peer closed the data channel"
                        break
                    continue
                if piece == _STOP:
                    return
                with self.lock:
                    skip = piece in self.cancelled
                    self.cancelled.discard(piece)
                if skip:
                    t._emit_sent(self.peer, piece, False)
                    continue
                try:
                    buffers = t._piece_buffers(piece)
                    length = sum(len(b) for b in buffers)
                    t.limiter.take(length)
                    self.sock.sendall(HEADER.pack(piece, length))
                    for b in buffers:
                        self.sock.sendall(b)
                except OSError as e:
                    reason = f"send failed: {e}"
                    t._emit_sent(self.peer, piece, False)
                    break
                t.bytes_sent += length
                t._emit_sent(self.peer, piece, True)
        finally:
            self.stop_socket()
            # Fail whatever was still queued so the node frees the upload slots.
            while True:
                try:
                    piece = self.queue.get_nowait()
                except queue.Empty:
                    break
                if piece != _STOP:
                    t._emit_sent(self.peer, piece, False)
            if not self.closed:
                t._channel_lost(self.peer, "out", self, reason)

    def _peer_hung_up(self) -> bool:
        """The receiving end never writes after its credentials, so a readable socket means it is gone
        (EOF or reset) or broke the protocol. Checked while idle: without it, a channel whose peer died
        without a word, or a stranger the control plane never accepted (so never `drop`s), would keep
        its thread and socket forever."""
        try:
            poller = select.poll()  # not select.select: fds above 1023 are common in a serving process
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # ValueError: the socket is closed already
            return True

    def stop_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close(self, join_s: float) -> None:
        self.closed = True
        self.stop_socket()
        self.queue.put(_STOP)
        if threading.current_thread() is not self.thread:
            self.thread.join(join_s)


class _Receiver:
    """Connects to one peer's data port and receives, verifies and stores its pieces."""

    def __init__(self, transport: TcpTransport, peer: str, host: str, port: int) -> None:
        self.transport = transport
        self.peer = peer
        self.addr = (host, port)
        self.expected: set[int] = set()
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"swarm-tcp-recv-{peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t = self.transport
        reason = "closed"
        try:
            sock = socket.create_connection(self.addr, timeout=t.connect_timeout_s)
            self.sock = sock
            if self.closed:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(t.io_timeout_s)
            nonce = _recv_exact(sock, NONCE_SIZE, t.io_timeout_s)
            sock.sendall(t._credentials(nonce, self.peer))
            # Short socket timeouts let the loop notice close() and tell idle from stalled.
            sock.settimeout(_POLL_S)
            staging = bytearray(t.max_piece)
            view = memoryview(staging)
            header = bytearray(HEADER.size)

            def idle() -> bool:
                return not self.expected

            def stopped() -> bool:
                return self.closed

            while not self.closed:
                # Idle between pieces is normal (nothing requested); only a stalled piece is an error.
                _recv_into(sock, memoryview(header), t.io_timeout_s, idle=idle, stopped=stopped)
                piece, length = HEADER.unpack(header)
                if not t._valid_header(piece, length):
                    reason = f"peer sent an invalid piece header (piece {piece}, {length} bytes)"
                    break
                _recv_into(sock, view[:length], t.io_timeout_s, stopped=stopped)
                with self.lock:
                    wanted = piece in self.expected
                    self.expected.discard(piece)
                if wanted:
                    t._deliver(self.peer, piece, view[:length])
        except (OSError, TransportError) as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            with self.lock:
                lost = sorted(self.expected)
                self.expected.clear()
            for piece in lost:
                t._emit_failed(self.peer, piece, "error")
            if self.sock is not None:
                self.sock.close()
            if not self.closed:
                t._channel_lost(self.peer, "in", self, reason)

    def close(self, join_s: float) -> None:
        self.closed = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if threading.current_thread() is not self.thread:
            self.thread.join(join_s)


class TcpTransport(Transport):
    name = "tcp"

    def __init__(
        self,
        *,
        token: str | None = None,
        io_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        rate_cap: float | None = None,
    ) -> None:
        super().__init__()
        self._key = hashlib.sha256(token.encode()).digest() if token else None
        self.io_timeout_s = io_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.limiter = RateLimiter(rate_cap)
        self.max_piece = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._senders: dict[str, _Sender] = {}
        self._receivers: dict[str, _Receiver] = {}
        self._lock = threading.Lock()
        self._closing = False
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- set-up -----------------------------------------------------------------------------------

    def open(self, host: str) -> dict[str, Any]:
        assert self.manifest is not None, "bind() first"
        self.max_piece = max((p.length for p in self.manifest.pieces), default=0)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(64)
        listener.settimeout(0.5)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="swarm-tcp-accept", daemon=True)
        self._accept_thread.start()
        return {"port": listener.getsockname()[1]}

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._handshake, args=(conn,), name="swarm-tcp-hello", daemon=True
            ).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.connect_timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = os.urandom(NONCE_SIZE)
            conn.sendall(nonce)
            (n,) = struct.unpack("!B", _recv_exact(conn, 1, self.connect_timeout_s))
            peer = _recv_exact(conn, n, self.connect_timeout_s).decode("utf-8", "replace")
            public = _recv_exact(conn, PUBLIC_KEY_SIZE, self.connect_timeout_s)
            sig = _recv_exact(conn, SIGNATURE_SIZE, self.connect_timeout_s)
            mac = _recv_exact(conn, 32, self.connect_timeout_s) if self._key else b""
            signed = self._signed(nonce, self.peer_id, peer)
            if peer_id_of(public) != peer or not verify(public, sig, signed):
                raise TransportError("data connection under an id its key does not prove")
            if self._key and not hmac.compare_digest(mac, self._mac(signed)):
                raise TransportError("data connection with a bad signature")
            conn.settimeout(self.io_timeout_s)
        except (OSError, TransportError, struct.error):
            conn.close()
            return
        with self._lock:
            if self._closing:
                conn.close()
                return
            old = self._senders.pop(peer, None)
            self._senders[peer] = _Sender(self, peer, conn)
        if old is not None:
            old.close(1.0)

    @staticmethod
    def _signed(nonce: bytes, listener: str, peer: str) -> bytes:
        return _DATA_CONTEXT + nonce + struct.pack("!B", len(listener)) + listener.encode() + peer.encode()

    def _mac(self, signed: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, signed, hashlib.sha256).digest()

    def _credentials(self, nonce: bytes, listener: str) -> bytes:
        """What the receiving end sends after the listener's nonce (see the module docstring)."""
        if self.identity is None:
            raise TransportError("the transport has no identity (the node sets it before open)")
        pid = self.peer_id.encode()
        signed = self._signed(nonce, listener, self.peer_id)
        proof = self.identity.public + self.identity.sign(signed)
        return struct.pack("!B", len(pid)) + pid + proof + (self._mac(signed) if self._key else b"")

    def connect(self, peer: str, params: Mapping[str, Any]) -> None:
        host, port = params.get("host"), params.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise TransportError(f"peer {peer} announced no usable TCP data address: {dict(params)!r:.200}")
        with self._lock:
            if peer in self._receivers or self._closing:
                return
            self._receivers[peer] = _Receiver(self, peer, host, port)

    # --- pieces -----------------------------------------------------------------------------------

    def expect(self, peer: str, piece: int) -> None:
        r = self._receivers.get(peer)
        if r is None:
            self._emit_failed(peer, piece, "error")
            return
        with r.lock:
            r.expected.add(piece)

    def unexpect(self, peer: str, piece: int) -> None:
        r = self._receivers.get(peer)
        if r is not None:
            with r.lock:
                r.expected.discard(piece)

    def send(self, peer: str, piece: int) -> None:
        s = self._senders.get(peer)
        if s is None:
            self._emit_sent(peer, piece, False)
            return
        s.queue.put(piece)

    def cancel(self, peer: str, piece: int) -> None:
        s = self._senders.get(peer)
        if s is not None:
            with s.lock:
                s.cancelled.add(piece)

    def has_channel(self, peer: str) -> bool:
        return peer in self._senders

    def _piece_buffers(self, piece: int) -> list[memoryview]:
        """The bytes of a piece as zero-copy buffers (tests override this to serve corrupt data)."""
        assert self.manifest is not None
        # GPU views are staged through host memory in a capture-safe way (swarm.capture)
        return [v.numpy().data for v in capture.copy_to_host(self.manifest.piece_views(self.views, piece))]

    def _valid_header(self, piece: int, length: int) -> bool:
        assert self.manifest is not None
        return piece < len(self.manifest.pieces) and length == self.manifest.pieces[piece].length

    def _deliver(self, peer: str, piece: int, data: memoryview) -> None:
        assert self.manifest is not None
        staged = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        if self.checksums is None or checksum([staged], self.manifest.checksum) != self.checksums[piece]:
            self._emit_failed(peer, piece, "bad_checksum")
            return
        capture.copy_from_host(self.manifest.piece_views(self.views, piece), staged)
        self.bytes_received += len(data)
        if self.events is not None:
            self.events.received(peer, piece)

    # --- events -----------------------------------------------------------------------------------

    def _emit_sent(self, peer: str, piece: int, ok: bool) -> None:
        if self.events is not None:
            self.events.sent(peer, piece, ok)

    def _emit_failed(self, peer: str, piece: int, reason: str) -> None:
        if self.events is not None:
            self.events.failed(peer, piece, reason)

    def _channel_lost(self, peer: str, direction: str, channel: _Sender | _Receiver, reason: str) -> None:
        with self._lock:
            table: dict[str, Any] = self._senders if direction == "out" else self._receivers
            if table.get(peer) is channel:
                del table[peer]
        if self.events is not None and not self._closing:
            self.events.closed(peer, f"data channel ({direction}) lost: {reason}")

    # --- tear-down --------------------------------------------------------------------------------

    def drop(self, peer: str) -> None:
        with self._lock:
            s = self._senders.pop(peer, None)
            r = self._receivers.pop(peer, None)
        for ch in (s, r):
            if ch is not None:
                ch.close(2.0)

    def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            try:  # wakes the accept() in progress at once (Linux) instead of at its 0.5 s poll
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(2.0)
        with self._lock:
            channels: list[_Sender | _Receiver] = [*self._senders.values(), *self._receivers.values()]
            self._senders.clear()
            self._receivers.clear()
        for ch in channels:
            ch.close(2.0)

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


def _recv_exact(sock: socket.socket, n: int, timeout_s: float = 30.0) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), timeout_s)
    return bytes(buf)


def _recv_into(
    sock: socket.socket,
    view: memoryview,
    timeout_s: float,
    *,
    idle: Callable[[], bool] | None = None,
    stopped: Callable[[], bool] | None = None,
) -> None:
    """Fill `view` from `sock`. Fails after `timeout_s` without a byte, except while `idle()` says
    nothing is awaited and no byte of this read has come yet; `stopped()` cancels the wait."""
    got = 0
    last = time.monotonic()
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            if stopped is not None and stopped():
                raise TransportError("channel closed") from None
            now = time.monotonic()
            if got == 0 and idle is not None and idle():
                last = now
            elif now - last > timeout_s:
                raise TransportError(f"no data for {timeout_s:.1f} s") from None
            continue
        if n == 0:
            raise TransportError("connection closed by peer")
        got += n
        last = time.monotonic()
