"""Building blocks of the fault tests and of bench/faults.py: swarm members in this process (`Node`) or as
`swarm seed`/`swarm fetch` processes, byte checks, a transport that serves wrong bytes, and /proc probes.

Rules kept by every helper: traffic goes to 127.0.0.1 only, every loop is bounded in count and time, and
every process or node started here is ended by its owner (`Members.close`, `closing(...)`) also on failure.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarm.node import FetchReport, Node, NodeConfig
from swarm.synthetic import synthetic_key, synthetic_tensors
from swarm.transport.base import Events
from swarm.transport.tcp import NONCE_SIZE, TcpTransport
from tests.loopback import wait_until

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
SIZE = 8 << 20
PIECE = 256 << 10

_expected: dict[int, dict[str, torch.Tensor]] = {}


def expected(size: int = SIZE) -> dict[str, torch.Tensor]:
    """The synthetic model's true tensors (cached: every test compares against the same bytes)."""
    if size not in _expected:
        _expected[size] = synthetic_tensors(size)
    return _expected[size]


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors.values()])


def wrong_bytes(tensors: dict[str, torch.Tensor], size: int = SIZE) -> int:
    """How many bytes of `tensors` differ from the synthetic model's (0: byte-identical)."""
    return int((flat(tensors) != flat(expected(size))).sum())


def config(**overrides: Any) -> NodeConfig:
    """Short timeouts so that a fault shows within seconds; loopback only, no mDNS."""
    values: dict[str, Any] = {
        "mdns": False,
        "host": HOST,
        "piece_size": PIECE,
        "discovery_timeout_s": 3.0,
        "stall_timeout_s": 15.0,
        "peer_timeout_s": 3.0,
        "io_timeout_s": 5.0,
        "deadline_s": 60.0,
        "model_name": "synthetic",
    }
    values.update(overrides)
    return NodeConfig(**values)


def seed_node(size: int = SIZE, *, transport: TcpTransport | None = None, **cfg: Any) -> Node:
    tensors = {k: v.clone() for k, v in expected(size).items()}
    return Node(synthetic_key(size), tensors, config(**cfg), complete=True, transport=transport).start()


def leecher_node(size: int = SIZE, *, transport: TcpTransport | None = None, **cfg: Any) -> Node:
    tensors = synthetic_tensors(size, fill=False)
    return Node(synthetic_key(size), tensors, config(**cfg), complete=False, transport=transport).start()


def tcp_of(node: Node) -> Any:
    """The node's TCP transport (the one under "auto", or the transport itself when forced)."""
    return getattr(node.transport, "subs", {}).get("tcp", node.transport)


def peers_of(*nodes: Node | int) -> str:
    return ",".join(f"{HOST}:{n if isinstance(n, int) else n.control_port}" for n in nodes)


@contextlib.contextmanager
def closing(*nodes: Node) -> Iterator[list[Node]]:
    """Close every node at the end, also on failure (a close error must not hide the test's error)."""
    owned = list(nodes)
    try:
        yield owned
    finally:
        for n in reversed(owned):
            with contextlib.suppress(Exception):
                n.close()


# --- transports for tests ---------------------------------------------------------------------------


class CorruptTcp(TcpTransport):
    """Serves wrong bytes for the pieces `bad(piece)` selects (one flipped byte in the middle). Test only:
    the hook is the documented `_piece_buffers` override; nothing of this reaches the production path."""

    def __init__(self, bad: Callable[[int], bool], **kw: Any) -> None:
        super().__init__(**kw)
        self.bad = bad
        self.corrupted = 0

    def _piece_buffers(self, piece: int) -> list[memoryview]:
        buffers = super()._piece_buffers(piece)
        if not self.bad(piece):
            return buffers
        data = bytearray(b"".join(bytes(b) for b in buffers))
        data[len(data) // 2] ^= 0x5A
        self.corrupted += 1
        return [memoryview(bytes(data))]


class WatchedTcp(TcpTransport):
    """A leecher's transport that checks, at the moment each piece is reported received (before the node
    announces or uses it), that the piece's bytes in the tensors are the true ones. `wrong_loaded`
    counts bytes that were wrong at that moment: the figure that must stay 0."""

    def __init__(self, size: int = SIZE, **kw: Any) -> None:
        super().__init__(**kw)
        self.size = size
        self.wrong_loaded = 0
        self.verified = 0
        self.bad_checksums = 0
        self._truth: list[torch.Tensor] | None = None

    def bind(self, manifest: Any, tensors: Any, events: Events) -> None:
        super().bind(manifest, tensors, events)
        self._truth = manifest.byte_views(expected(self.size))
        received, failed = events.received, events.failed

        def on_received(peer: str, piece: int) -> None:
            assert self.manifest is not None and self._truth is not None
            got = self.manifest.piece_views(self.views, piece)
            want = self.manifest.piece_views(self._truth, piece)
            self.wrong_loaded += sum(int((g != w).sum()) for g, w in zip(got, want, strict=True))
            self.verified += self.manifest.pieces[piece].length
            received(peer, piece)

        def on_failed(peer: str, piece: int, reason: str) -> None:
            if reason == "bad_checksum":
                self.bad_checksums += 1
            failed(peer, piece, reason)

        self.events = Events(on_received, on_failed, events.sent, events.closed, events.notify)


# --- fetching in a thread ---------------------------------------------------------------------------


@dataclass
class FetchRun:
    """`node.fetch()` running in a thread, so the test can inject a fault meanwhile."""

    node: Node
    report: FetchReport | None = None
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    thread: threading.Thread | None = None

    def start(self) -> FetchRun:
        def run() -> None:
            try:
                self.report = self.node.fetch()
            except BaseException as e:  # reported to the test, which asserts on it
                self.error = e
            finally:
                self.ended = time.monotonic()

        self.thread = threading.Thread(target=run, name=f"fetch-{self.node.id}", daemon=True)
        self.thread.start()
        return self

    def wait(self, timeout: float) -> FetchRun:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"fetch of {self.node.id} still running after {timeout:.0f} s (a hang)")
        return self

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


def progress(node: Node) -> float:
    return float(node.status()["progress"])


# --- members as processes ---------------------------------------------------------------------------


class Members:
    """`swarm seed` / `swarm fetch` processes on loopback; `close()` kills every one (SIGCONT first)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(
        self, command: str, *args: str, name: str, env: dict[str, str] | None = None, nofile: int = 0
    ) -> subprocess.Popen[bytes]:
        return self.python("-m", "swarm.cli", command, *args, name=name, env=env, nofile=nofile)

    def paced_seed(self, port: int, rate: float, *, name: str = "paced") -> subprocess.Popen[bytes]:
        """A seed process sending pieces in small chunks at `rate` bytes/s (see serve_paced)."""
        return self.python("-m", "tests.faults.harness", str(port), str(rate), name=name)

    def python(
        self, *args: str, name: str, env: dict[str, str] | None = None, nofile: int = 0
    ) -> subprocess.Popen[bytes]:
        """`nofile`, when given, is the process's limit of open files (so that a test can exhaust it)."""
        log = self.logdir / f"{name}.log"
        full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full["PYTHONPATH"] = str(REPO) + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
        if not (env and "SWARM_TOKEN" in env):
            full.pop("SWARM_TOKEN", None)
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [sys.executable, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full,
                cwd=REPO,
                preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
                if nofile
                else None,
            )
        self.procs.append(p)
        self.logs[p.pid] = log
        return p

    def seed(
        self, port: int, *args: str, size: int = SIZE, name: str = "seed", **kw: Any
    ) -> subprocess.Popen[bytes]:
        return self.start("seed", *member_args(size), "--port", str(port), *args, name=name, **kw)

    def log(self, p: subprocess.Popen[bytes]) -> str:
        return self.logs[p.pid].read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


def member_args(size: int = SIZE) -> list[str]:
    return ["--synthetic", str(size), "--piece-size", str(PIECE), "--no-mdns", "--host", HOST]


def status_of(port: int, token: str | None = None, timeout_s: float = 1.0) -> dict[str, Any] | None:
    from swarm.cli import query_status

    return query_status(HOST, port, token=token, timeout_s=timeout_s)


def wait_for_member(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0, **kw: Any
) -> None:
    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"member on port {port} exited with {proc.returncode}")
        return status_of(port, **kw) is not None

    wait_until(up, timeout, f"the member on port {port} to answer", step=0.2)


# --- resources of a process -------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    fds: int
    threads: int
    rss_mb: float

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.rss_mb:.0f} MB RSS"


def resources(pid: int | None = None) -> Resources:
    base = Path(f"/proc/{pid or os.getpid()}")
    fds = len(os.listdir(base / "fd"))
    threads = rss = 0
    for line in (base / "status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Resources(fds, threads, rss / 1024)


def swarm_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("swarm-"))


# --- raw control-plane clients ----------------------------------------------------------------------


class RawClient:
    """A ZeroMQ DEALER that sends arbitrary frames to a node's control port (the hostile client)."""

    def __init__(self, port: int) -> None:
        import zmq

        self.zmq = zmq
        self.ctx: Any = zmq.Context()
        self.sock: Any = None
        self.port = port
        self.reconnect()

    def reconnect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(self.zmq.DEALER)
        self.sock.setsockopt(self.zmq.LINGER, 0)
        self.sock.setsockopt(self.zmq.SNDHWM, 100000)
        self.sock.connect(f"tcp://{HOST}:{self.port}")

    def send(self, frame: bytes) -> None:
        self.sock.send(frame, self.zmq.NOBLOCK)

    def replies(self, wait_s: float = 0.0, limit: int = 10000) -> list[bytes]:
        out: list[bytes] = []
        deadline = time.monotonic() + wait_s
        while len(out) < limit:
            left = max(0.0, deadline - time.monotonic())
            if not self.sock.poll(int(left * 1000)):
                break
            out.append(self.sock.recv())
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def zmtp_connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    """A raw TCP connection that completes the ZMTP 3.0 NULL handshake as a DEALER (what libzmq would
    do), so the caller can then send frames byte by byte: a frame header claiming `n` bytes, then fewer."""
    s = socket.create_connection((HOST, port), timeout=timeout_s)
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    prop = b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    ready = b"\x05READY" + prop
    s.sendall(greeting + bytes([0x04, len(ready)]) + ready)
    got = b""
    while len(got) < 64 + 2:  # the node's greeting and the head of its READY
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("the node closed the ZMTP handshake")
        got += chunk
    return s


def zmtp_frame_head(length: int) -> bytes:
    """The header of one ZMTP message frame (long form) of `length` bytes, last of its message."""
    return bytes([0x02]) + length.to_bytes(8, "big")


def alive(node: Node, token: str | None = None) -> bool:
    """The node's control loop runs and it answers a status query over the wire."""
    thread = node._thread
    return thread is not None and thread.is_alive() and status_of(node.control_port, token) is not None


class _Paced:
    """The buffers of one piece, handed out in chunks; iterating sleeps so that the chunks leave at
    `rate` bytes/s (the first iteration, which only measures the length, does not sleep). `hold`, when
    given, blocks the iteration after `hold_after` bytes until the event is set: a peer frozen mid-piece."""

    CHUNK = 16 << 10

    def __init__(self, buffers: list[memoryview], rate: float, hold: threading.Event | None, hold_after: int):
        self.chunks = [b[i : i + self.CHUNK] for b in buffers for i in range(0, len(b), self.CHUNK)]
        self.rate = rate
        self.hold = hold
        self.hold_after = hold_after
        self.passes = 0

    def __iter__(self) -> Iterator[memoryview]:
        self.passes += 1
        if self.passes == 1:
            yield from self.chunks
            return
        sent = 0
        for c in self.chunks:
            if self.hold is not None and sent >= self.hold_after:
                self.hold.wait(120)
            if self.rate:
                time.sleep(len(c) / self.rate)
            yield c
            sent += len(c)


class PacedTcp(TcpTransport):
    """Sends each piece in 16 KiB chunks at `rate` bytes/s, so a fault lands mid-piece. With `freeze`
    set, piece bytes stop half-way through any piece after `freeze` is set... until `release`."""

    def __init__(self, rate: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.rate = rate
        self.frozen = threading.Event()
        self.released = threading.Event()

    def _piece_buffers(self, piece: int) -> list[memoryview]:
        buffers = super()._piece_buffers(piece)
        hold = self.released if self.frozen.is_set() else None
        half = sum(len(b) for b in buffers) // 2
        return _Paced(buffers, self.rate, hold, half)  # type: ignore[return-value]


def serve_paced(argv: Sequence[str] | None = None) -> None:
    """`python -m tests.faults.harness PORT RATE [SIZE]`: a seed process whose pieces trickle at RATE
    bytes/s in small chunks (SIGSTOP then lands mid-piece). Prints "ready" and serves until killed."""
    args = list(sys.argv[1:] if argv is None else argv)
    port, rate = int(args[0]), float(args[1])
    size = int(args[2]) if len(args) > 2 else SIZE
    node = seed_node(size, transport=PacedTcp(rate), control_port=port, peer_timeout_s=6.0)
    print(f"ready {node.id}", flush=True)
    try:
        threading.Event().wait(600)
    finally:
        node.close()


if __name__ == "__main__":
    serve_paced()


def expected_total(size: int = SIZE) -> int:
    """Bytes of the synthetic model of `size` (the manifest's total)."""
    return sum(t.numel() * t.element_size() for t in expected(size).values())


def data_port(node: Node) -> int:
    return int(node.data_params["port"])


def try_data_port(node: Node, credentials: bytes | None, wait_s: float = 1.5) -> int:
    """Connect to the data port, send `credentials` after the nonce; how many bytes come after it."""
    with socket.create_connection((HOST, data_port(node)), timeout=3) as s:
        nonce = b""
        while len(nonce) < NONCE_SIZE:
            chunk = s.recv(NONCE_SIZE - len(nonce))
            if not chunk:
                return 0
            nonce += chunk
        if credentials is not None:
            s.sendall(credentials)
        got = 0
        s.settimeout(0.2)
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += len(chunk)
        return got
