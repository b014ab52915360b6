"""Bounds on the connections of a node's control port (its ZeroMQ ROUTER), which anyone can open.

ZeroMQ accepts every TCP connection and keeps it while the other end answers its heartbeats, and a
ROUTER has no call to drop one peer. Left alone, strangers that connect and stay silent hold one fd each
until the process runs out (then libzmq's accept spins and no new peer gets in). This guard:

- follows the ROUTER's connections through its monitor socket (accepted: fd; disconnected: fd);
- learns which connection each message that decoded (with a token: carried a valid MAC) came from (the
  message's source fd, ZMQ_SRCFD) and its ROUTER identity; a connection is *trusted* while that
  identity belongs to a peer the node keeps (`is_member`), so trust ends when the peer is dropped;
- ends (shutdown(2) on the fd, which libzmq then sees as a hang-up and cleans up itself) every
  untrusted connection silent for STRANGER_IDLE_S, and, once more than `connection_cap()` are open
  (MAX_CONNECTIONS, fewer where the fd limit is low), the untrusted one silent the longest, at once.
  Honest peers send Hello as their first frame, so they are trusted within a round trip; `swarm
  status` connects, asks and leaves.

Limits, stated: a message read just as its connection closed and its fd number was reused by a new
connection can mark the new one (the monitor and the ROUTER are two queues); the shutdown is done only
after checking that the fd still belongs to the recorded connection (same local port, same peer
address), so a reused fd of anything else is never touched. An untrusted connection costs one fd for at
most STRANGER_IDLE_S; a flood of new connections is bounded by MAX_CONNECTIONS plus what arrives
between two reads of the monitor.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("swarm.control_guard")

#: Open control connections at most (inbound), trusted ones included: MAX_PEERS (64) peers may dial in,
#: the rest is room for status queries and newcomers being checked. Lower where the process may open
#: few files (a third of what is left after 64 for everything else), so that strangers reconnecting as
#: fast as they are ended never run the process out of fds.
MAX_CONNECTIONS = 128


def connection_cap() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, (soft - 64) // 3))


#: An untrusted connection (no authenticated message from a known peer) is ended after this long silent.
STRANGER_IDLE_S = 5.0


@dataclass
class _Conn:
    fd: int
    since: float
    last: float
    peer_addr: Any = None
    ident: bytes = b""


class ConnectionGuard:
    def __init__(
        self, router: zmq.Socket[bytes], ctx: zmq.Context[zmq.Socket[bytes]], local_port: int
    ) -> None:
        self.local_port = local_port
        self.conns: dict[int, _Conn] = {}
        self.cap = connection_cap()
        self.ended = 0
        addr = f"inproc://swarm-guard-{id(self):x}"
        router.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        mon = ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.setsockopt(zmq.RCVHWM, 0)  # no event may be dropped: the table must match libzmq's
        mon.connect(addr)
        self.socket = mon
        self._router = router

    def read_events(self, now: float, is_member: Callable[[bytes], bool]) -> None:
        for _ in range(10000):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = parse_monitor_message(parts)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.conns[fd] = _Conn(fd, now, now, _peer_of(fd, self.local_port))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.conns.pop(fd, None)
        if len(self.conns) > self.cap:
            strangers = [c for c in self.conns.values() if not is_member(c.ident)]
            strangers.sort(key=lambda c: c.last)
            for c in strangers[: len(self.conns) - self.cap]:
                self._end(c, "too many control connections")

    def seen(self, fd: int, ident: bytes, now: float) -> None:
        """A message that decoded (and authenticated) came in on `fd` from ROUTER identity `ident`."""
        c = self.conns.get(fd)
        if c is not None:
            c.last = now
            c.ident = ident

    def sweep(self, now: float, is_member: Callable[[bytes], bool]) -> None:
        for c in list(self.conns.values()):
            if not is_member(c.ident) and now - c.last > STRANGER_IDLE_S:
                self._end(c, f"silent stranger for {STRANGER_IDLE_S:.0f} s")

    def _end(self, c: _Conn, why: str) -> None:
        self.conns.pop(c.fd, None)
        if c.peer_addr is None or _peer_of(c.fd, self.local_port) != c.peer_addr:
            return  # closed already, or the fd number now belongs to something else: leave it alone
        try:
            dup = socket.socket(fileno=os.dup(c.fd))
        except OSError:
            return
        try:
            dup.shutdown(socket.SHUT_RDWR)
            self.ended += 1
            log.debug("ended control connection from %s: %s", c.peer_addr, why)
        except OSError:
            pass
        finally:
            dup.close()

    def close(self) -> None:
        try:
            self._router.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(0)


def _peer_of(fd: int, local_port: int) -> Any:
    """The peer address of TCP socket `fd` when its local port is `local_port`; None otherwise."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if dup.type != socket.SOCK_STREAM or dup.getsockname()[1] != local_port:
            return None
        return dup.getpeername()
    except OSError:
        return None
    finally:
        dup.close()
