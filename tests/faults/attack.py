"""Tools of the attacker in tests/faults/test_attacks.py: a sniffer that records what crosses a TCP link,
a parser that cuts the recorded ZeroMQ stream into the frames it carried, and a control-plane client
that speaks the protocol as a member (with the token or, in an open swarm, without).

Replays use the recorded frames as they were: a fresh ZeroMQ connection carries them to the node again
(ZMTP's NULL mechanism has no nonce, so this is what replaying the recorded TCP bytes amounts to).
Everything binds 127.0.0.1 and every thread, socket and context is ended by `close()`.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import msgpack

from swarm import protocol as P
from swarm.identity import Identity
from tests.faults.harness import HOST, RawClient


class Sniffer:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that records both directions of every link."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.links: list[tuple[bytearray, bytearray]] = []  # (client -> server, server -> client)
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._spawn(self._accept)

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name="sniffer", daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection((HOST, self.target), timeout=2)
            except OSError:
                client.close()
                continue
            up, down = bytearray(), bytearray()
            with self._lock:
                self.links.append((up, down))
                self._socks += [client, server]
            self._spawn(self._pump, client, server, up)
            self._spawn(self._pump, server, client, down)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        src.settimeout(0.2)
        while not self._closed:
            try:
                data = src.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                record += data
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def sent(self, link: int = 0) -> list[bytes]:
        """The message frames the client sent on one recorded link."""
        with self._lock:
            return zmtp_frames(bytes(self.links[link][0]))

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for t in self._threads:
            t.join(2)
        for s in self._socks:
            s.close()


def zmtp_frames(stream: bytes) -> list[bytes]:
    """Message frames of one direction of a ZMTP 3 stream (greeting and commands skipped; every message
    the swarm sends is one frame)."""
    out: list[bytes] = []
    i = 64  # the greeting: signature, version, mechanism, as-server, filler
    while i + 2 <= len(stream):
        flags = stream[i]
        if flags & 0x02:
            if i + 9 > len(stream):
                break
            (size,) = struct.unpack("!Q", stream[i + 1 : i + 9])
            start = i + 9
        else:
            size, start = stream[i + 1], i + 2
        if start + size > len(stream):
            break
        if not flags & 0x04:
            out.append(stream[start : start + size])
        i = start + size
    return out


def frame_type(frame: bytes) -> str:
    """The message type inside a recorded frame ('' when it does not decode): read without the token, as
    a sniffer would (the payload is not encrypted)."""
    try:
        envelope = msgpack.unpackb(frame, raw=False)
        payload = next(x for x in envelope if isinstance(x, bytes) and x != P.MAGIC)
        return str(msgpack.unpackb(payload, raw=False)[0])
    except (ValueError, StopIteration, TypeError, IndexError, KeyError, msgpack.UnpackException):
        return ""


def replay(port: int, frames: list[bytes], wait_s: float = 1.5) -> list[bytes]:
    """Send recorded frames to a node on a fresh connection; the raw frames it answered with."""
    client = RawClient(port)
    try:
        for f in frames:
            client.send(f)
        got: list[bytes] = []
        end = time.monotonic() + wait_s
        while (left := end - time.monotonic()) > 0:
            got += client.replies(wait_s=min(left, 0.1))
        return got
    finally:
        client.close()


class Member:
    """A control-plane client that speaks the protocol as a member would (with `token`, or open): runs
    the session handshake under its own key, then sends messages or (type, fields) pairs that bypass the
    dataclasses, and decodes what comes back."""

    def __init__(self, port: int, token: str | None, *, handshake: bool = True) -> None:
        self.identity = Identity()
        self.id = self.identity.id
        self.session = P.Session(P.Codec(token), self.identity, dialer=True)
        self.raw = RawClient(port)
        #: messages that came before the session was up (unauthenticated Errors)
        self.early: list[P.Message] = []
        if handshake:
            self.handshake()

    def handshake(self, wait_s: float = 5.0) -> None:
        self.raw.send(self.session.open())
        end = time.monotonic() + wait_s
        while not self.session.established:
            if time.monotonic() > end:
                raise AssertionError(f"no session with port {self.raw.port} within {wait_s:.0f} s")
            for f in self.raw.replies(wait_s=0.1, limit=1):
                msg, answer = self.session.receive(f)
                if answer is not None:
                    self.raw.send(answer)
                elif msg is not None:
                    self.early.append(msg)

    def send(self, msg: P.Message) -> None:
        self.raw.send(self.session.encode(msg))

    def send_fields(self, kind: str, fields: dict[str, Any]) -> None:
        self.raw.send(self.session.seal(msgpack.packb([kind, fields], use_bin_type=True)))

    def received(self, wait_s: float = 0.5) -> list[P.Message]:
        out = []
        for f in self.raw.replies(wait_s=wait_s):
            try:
                msg, _ = self.session.receive(f)
            except P.ProtocolError:
                continue
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        self.raw.close()


def sealed_elsewhere(token: str | None) -> P.Session:
    """A session established with someone else (in memory): its frames are valid on that link only."""
    return P.connected_pair(token)[0]


def data_credentials(nonce: bytes, listener_id: str, token: str | None = None) -> tuple[str, bytes]:
    """Valid data-channel credentials of a new member of our own (a fresh key), for a listener's nonce:
    (its id, the bytes to send). Made by the transport's own code."""
    from swarm.transport.tcp import TcpTransport

    t = TcpTransport(token=token)
    t.identity = Identity()
    t.peer_id = t.identity.id
    return t.peer_id, t._credentials(nonce, listener_id)


def read_nonce(sock: socket.socket) -> bytes:
    from swarm.transport.tcp import NONCE_SIZE

    nonce = b""
    while len(nonce) < NONCE_SIZE:
        chunk = sock.recv(NONCE_SIZE - len(nonce))
        if not chunk:
            break
        nonce += chunk
    return nonce
