"""Loss and delay in user space, for kernels without netem: a TCP relay on loopback that delays every
segment and, with a given probability, "loses" one.

What loss means here, honestly: both the control plane (ZeroMQ) and the data plane are TCP, and TCP
never shows a lost packet to the application; it shows a stall. A dropped segment is sent again after a
retransmission timeout (Linux: at least 200 ms) or, when later segments arrive behind it, after about
one round trip (fast retransmit); everything behind it waits, because TCP delivers in order. The relay
models the pessimistic case: the stream is cut into segments of `mss` bytes; each is delivered `delay_s`
after it was read (one-way delay), and with probability `loss` it is held back a further `rto_s`
(default 200 ms, Linux's minimum RTO), and no later segment overtakes it. Bandwidth is not limited, and
the relay does not emulate congestion control (a real sender halves its window on a loss). Connections
are never cut.

`RelayedTcp` is a TcpTransport whose announced data port is such a relay in front of its real one, so
that both planes of a seed go through relays (the control port's relay is started by the caller).
Test-only; every thread and socket is ended by `close()`.
"""

from __future__ import annotations

import contextlib
import queue
import random
import socket
import threading
import time
from typing import Any

from swarm.transport.tcp import TcpTransport

HOST = "127.0.0.1"
MSS = 1448
_EOF = b""


class LossyRelay:
    def __init__(
        self, target_port: int, *, loss: float, delay_s: float, rto_s: float = 0.2, seed: int = 0
    ) -> None:
        self.target = (HOST, target_port)
        self.loss, self.delay_s, self.rto_s = loss, delay_s, rto_s
        self.rng = random.Random(seed)
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stalls = 0
        self.segments = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name="lossy-relay", daemon=True)
        with self._lock:
            self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                a, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                a.close()
                continue
            for s in (a, b):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                q: queue.Queue[tuple[float, bytes]] = queue.Queue()
                self._spawn(self._read, src, q)
                self._spawn(self._write, dst, q)

    def _read(self, src: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        last = 0.0
        try:
            while not self._stop.is_set():
                data = src.recv(1 << 16)
                if not data:
                    break
                now = time.monotonic()
                for i in range(0, len(data), MSS):
                    at = now + self.delay_s
                    with self._lock:
                        self.segments += 1
                        if self.rng.random() < self.loss:
                            self.stalls += 1
                            at += self.rto_s
                    last = max(last, at)  # in order: nothing overtakes a held-back segment
                    q.put((last, data[i : i + MSS]))
        except OSError:
            pass
        q.put((last, _EOF))

    def _write(self, dst: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        pending: tuple[float, bytes] | None = None
        try:
            while True:
                if pending is None:
                    try:
                        pending = q.get(timeout=0.2)
                    except queue.Empty:
                        if self._stop.is_set():
                            return
                        continue
                at, seg = pending
                wait = at - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
                pending = None
                if seg == _EOF:
                    dst.shutdown(socket.SHUT_WR)
                    return
                batch = [seg]
                while True:  # everything already due goes out in one send
                    try:
                        nxt = q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[1] == _EOF or nxt[0] > time.monotonic():
                        pending = nxt
                        break
                    batch.append(nxt[1])
                dst.sendall(b"".join(batch))
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            socks, threads = list(self.socks), list(self.threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            t.join(2)


class RelayedTcp(TcpTransport):
    """A TcpTransport that announces a LossyRelay in front of its data port."""

    def __init__(self, *, loss: float, delay_s: float, seed: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.relay_args = {"loss": loss, "delay_s": delay_s, "seed": seed}
        self.relay: LossyRelay | None = None

    def open(self, host: str) -> dict[str, Any]:
        params = super().open(host)
        self.relay = LossyRelay(int(params["port"]), **self.relay_args)  # type: ignore[arg-type]
        return {**params, "port": self.relay.port}

    def close(self) -> None:
        super().close()
        if self.relay is not None:
            self.relay.close()
