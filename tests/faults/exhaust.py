"""Resource-exhaustion attacks on live members (issue 13, items 1, 2, 5 and 7), each followed or
accompanied by an honest fetch; used by tests/faults/test_exhaustion.py (which asserts the bounds) and
bench/faults.py (which reports them).

Seeds under a memory or fd attack are `swarm seed` processes, so /proc shows their own figures (and a
low RLIMIT_NOFILE can be set on them alone); the attacks that count dials, peers, channels and threads
run against nodes in this process and report the node's own tables. Every attack is bounded in time and
stops early once the bound it measures is clearly broken, so a regression fails fast instead of eating
the machine. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from swarm import protocol as P
from swarm.node import MAX_DIALS, MAX_PEERS, Node
from swarm.synthetic import synthetic_key
from swarm.transport.tcp import NONCE_SIZE, TcpTransport
from tests.faults.attack import Member
from tests.faults.harness import (
    HOST,
    SIZE,
    FetchRun,
    Members,
    Resources,
    WatchedTcp,
    alive,
    closing,
    leecher_node,
    peers_of,
    resources,
    seed_node,
    wait_for_member,
    wrong_bytes,
    zmtp_connect,
    zmtp_frame_head,
)
from tests.loopback import free_port, wait_until

TOKEN = "exhaustion-cluster-token"
#: RSS a seed process may gain under a memory attack (stated in docs/reliability.md)
RSS_BOUND_MB = 64.0


@dataclass
class Outcome:
    """What one attack did: the honest fetch, and the victim's figures (peak over the attack)."""

    fetched: bool = False
    error: str = ""
    verified: int = 0
    wrong: int = 0
    #: seed process: RSS growth (MB), peak fds and threads; in-process victims: their own tables
    figures: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)

    @property
    def within(self) -> bool:
        return all(self.figures.get(k, 0) <= v for k, v in self.bounds.items())

    @property
    def survived(self) -> bool:
        return self.fetched and self.wrong == 0 and self.within

    def describe(self) -> str:
        figs = ", ".join(f"{k} {self.figures.get(k, 0):g} (bound {v:g})" for k, v in self.bounds.items())
        return figs + ("" if self.fetched else f"; honest fetch failed: {self.error}")


def honest_fetch(out: Outcome, seed_port: int, **cfg: Any) -> None:
    with closing(
        leecher_node(transport=WatchedTcp(token=TOKEN), token=TOKEN, peers=peers_of(seed_port), **cfg)
    ) as (n,):
        _fetch_into(out, n)


def _fetch_into(out: Outcome, n: Node) -> None:
    run = FetchRun(n).start().wait(60)
    out.fetched = run.error is None
    out.error = "" if run.error is None else f"{type(run.error).__name__}: {run.error}"[:300]
    out.verified += getattr(n.transport, "verified", 0)
    out.wrong += getattr(n.transport, "wrong_loaded", 0) + (
        wrong_bytes(dict(n.tensors)) if out.fetched else 0
    )


@contextlib.contextmanager
def seed_process(members: Members, nofile: int = 0) -> Iterator[tuple[int, int]]:
    """A `swarm seed` process with the token; yields (pid, control port); fails if it died."""
    port = free_port()
    proc = members.seed(port, name=f"seed{port}", env={"SWARM_TOKEN": TOKEN}, nofile=nofile)
    wait_for_member(port, proc, token=TOKEN)
    yield proc.pid, port
    assert proc.poll() is None, f"the seed died: {members.log(proc)[-2000:]}"


class _Peak:
    """Peak RSS growth, fds and threads of a process, sampled by `sample()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = resources(pid)
        self.rss = 0.0
        self.fds = self.base.fds
        self.threads = self.base.threads

    def sample(self) -> Resources:
        r = resources(self.pid)
        self.rss = max(self.rss, r.rss_mb - self.base.rss_mb)
        self.fds = max(self.fds, r.fds)
        self.threads = max(self.threads, r.threads)
        return r

    def into(self, out: Outcome) -> None:
        out.figures.update(rss_growth_mb=round(self.rss, 1), peak_fds=self.fds, peak_threads=self.threads)


def _seed_bounds(nofile: int = 0) -> dict[str, float]:
    # threads: the seed's own (control loop, accept, zeromq's, mdns off) plus one sender per leecher
    return {"rss_growth_mb": RSS_BOUND_MB, "peak_threads": 16} | ({"peak_fds": nofile} if nofile else {})


# --- 1. memory without the token ----------------------------------------------------------------------


def bogus_frames(members: Members, size: int, seconds: float = 4.0) -> Outcome:
    """Complete frames with a bogus MAC, sent as fast as one connection takes them."""
    out = Outcome(bounds=_seed_bounds())
    with seed_process(members) as (pid, port):
        peak = _Peak(pid)
        # a well-formed envelope (magic, version, sequence, payload, MAC) whose MAC is wrong
        envelope = [P.MAGIC, P.VERSION, 1, bytes(size - 64), os.urandom(32)]
        frame = bytes(msgpack.packb(envelope, use_bin_type=True))
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 2)  # keeps the attacker's own memory small
        sock.connect(f"tcp://{HOST}:{port}")
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end and peak.rss < 4 * RSS_BOUND_MB:
                with contextlib.suppress(zmq.Again):
                    sock.send(frame, zmq.NOBLOCK, copy=False)
                peak.sample()
                time.sleep(0.001)
        finally:
            sock.close(0)
            ctx.term()
        peak.into(out)
        honest_fetch(out, port)
    return out


def partial_frames(members: Members, size: int, conns: int = 40) -> Outcome:
    """`conns` connections each send all but one byte of a `size`-byte frame and hold it."""
    out = Outcome(bounds=_seed_bounds())
    with seed_process(members) as (pid, port):
        peak = _Peak(pid)
        chunk = bytes(1 << 20)
        held: list[socket.socket] = []
        try:
            for _ in range(conns):
                s = zmtp_connect(port)
                held.append(s)
                try:
                    s.sendall(zmtp_frame_head(size))
                    left = size - 1
                    while left > 0:
                        n = min(left, len(chunk))
                        s.sendall(chunk[:n])
                        left -= n
                except OSError:
                    pass  # refused by the node
                time.sleep(0.02)
                peak.sample()
                if peak.rss > 4 * RSS_BOUND_MB:
                    break
            time.sleep(0.5)
            peak.sample()
        finally:
            for s in held:
                s.close()
        peak.into(out)
        honest_fetch(out, port)
    return out


# --- 2. file descriptors ------------------------------------------------------------------------------


def connections(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(socket.create_connection((HOST, port), timeout=2))
        except OSError:
            break
    return out


def fd_exhaustion(members: Members, nofile: int = 128) -> Outcome:
    """Idle TCP connections to the seed's control port, then to its data port, more than the seed's fd
    limit `nofile` allows (before issue 13 the data accept loop met EMFILE and exited; now the control
    guard and the handshake cap shed them first: the EMFILE path itself is tested in-process by
    test_exhaustion.py); then the attacker hangs up and an honest fetch follows."""
    out = Outcome(bounds=_seed_bounds(nofile))
    with seed_process(members, nofile=nofile) as (pid, port):
        peak = _Peak(pid)
        data_port = data_port_of(port)
        held = connections(port, nofile + 12)
        held += connections(data_port, 40)
        for _ in range(15):  # the data accept loop meets EMFILE meanwhile
            peak.sample()
            time.sleep(0.1)
        for s in held:
            s.close()
        time.sleep(1.0)
        peak.into(out)
        honest_fetch(
            out, port, io_timeout_s=3.0, discovery_timeout_s=8.0, stall_timeout_s=10.0, deadline_s=30.0
        )
    return out


def idle_control(members: Members, conns: int = 300, nofile: int = 256) -> Outcome:
    """`conns` ZeroMQ connections that finish the handshake and say nothing, held during an honest fetch
    against a seed whose fd limit is `nofile`."""
    out = Outcome(bounds=_seed_bounds() | {"peak_fds": nofile * 3 // 4})
    with seed_process(members, nofile=nofile) as (pid, port):
        peak = _Peak(pid)
        ctx = zmq.Context()
        socks = []
        try:
            for _ in range(conns):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(f"tcp://{HOST}:{port}")
                socks.append(s)
            for _ in range(20):
                peak.sample()
                time.sleep(0.1)
            done = threading.Event()
            sampler = threading.Thread(target=_sample_until, args=(peak, done), daemon=True)
            sampler.start()
            try:
                honest_fetch(out, port, discovery_timeout_s=8.0)
            finally:
                done.set()
                sampler.join(2)
        finally:
            for s in socks:
                s.close(0)
            ctx.term()
        peak.into(out)
    return out


def _sample_until(peak: _Peak, done: threading.Event) -> None:
    while not done.wait(0.1):
        with contextlib.suppress(OSError):
            peak.sample()


def data_port_of(port: int) -> int:
    """The data port a seed announces in its Hello (what any insider learns)."""
    m = Member(port, TOKEN)
    try:
        key = synthetic_key(SIZE)
        m.send(P.Hello(m.id, key.to_wire(), key.digest, "", "", "leecher", "tcp", {}))
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            for reply in m.received(0.2):
                if isinstance(reply, P.Hello):
                    return int(reply.data["port"])
        raise AssertionError("no Hello from the seed within 5 s")
    finally:
        m.close()


# --- 5. peer exchange and accepted peers --------------------------------------------------------------


@contextlib.contextmanager
def _members(port: int) -> Iterator[Callable[[], Member]]:
    """Members of our own (each a fresh key and a session with the node), closed at the end."""
    made: list[Member] = []

    def new() -> Member:
        made.append(Member(port, TOKEN))
        return made[-1]

    try:
        yield new
    finally:
        for m in made:
            m.close()


def _watch(n: Node, seconds: float, tables: dict[str, Callable[[], int]], out: Outcome) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, f in tables.items():
            out.figures[name] = max(out.figures.get(name, 0), f())
        time.sleep(0.05)


def pex_flood(hellos: int = 32, listed: int = 32) -> Outcome:
    """`hellos` insiders each list `listed` made-up peers in their Hello, to a leecher that was told of a
    real seed; then the leecher fetches."""
    from swarm.node import MAX_CANDIDATES

    out = Outcome(bounds={"dials": MAX_DIALS, "candidates": MAX_CANDIDATES, "loop_died": 0})
    with closing(seed_node(token=TOKEN)) as (seed,):
        leecher = leecher_node(transport=WatchedTcp(token=TOKEN), token=TOKEN, peers=peers_of(seed))
        with closing(leecher) as (n,), _members(n.control_port) as new:
            for i in range(hellos):
                made_up = [[f"x{i}-{j}", HOST, 20000 + listed * i + j] for j in range(listed)]
                data = {"addrs": [HOST], "ctl": 1, "peers": made_up}
                m = new()
                hello = dataclasses.replace(n._hello(), content_digest="", role="seed", data=data)
                m.send(dataclasses.replace(hello, peer_id=m.id))
            tables = {"dials": lambda: len(n._dials), "candidates": lambda: len(n._candidates)}
            _watch(n, 3.0, tables, out)
            out.figures["loop_died"] = 0 if alive(n, TOKEN) else 1
            _fetch_into(out, n)
    return out


class NonceServer:
    """A data port that answers every connection with a nonce and then holds it: fake peers' channels."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nonce-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError):
                c.sendall(os.urandom(NONCE_SIZE))
            self.conns.append(c)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(2)
        for c in self.conns:
            c.close()


def accepted_flood(extra: int = 16) -> Outcome:
    """Insiders that pass every check (right manifest and checksums, a data port that answers) join a
    leecher, MAX_PEERS + `extra` of them, after the honest seed; then the leecher fetches."""
    from swarm.transport.tcp import MAX_STAGING

    out = Outcome(bounds={"peers": MAX_PEERS, "data_channels": MAX_PEERS, "staging_buffers": MAX_STAGING})
    with closing(seed_node(token=TOKEN)) as (seed,):
        assert seed.checksums is not None
        leecher = leecher_node(transport=WatchedTcp(token=TOKEN), token=TOKEN, peers=peers_of(seed))
        fake_data = NonceServer()
        try:
            with closing(leecher) as (n,), _members(n.control_port) as new:
                wait_until(lambda: any(p.accepted for p in n._peers.values()), 10, "the seed to be accepted")
                # the seed's own Hello data (paths etc.), pointing at the fake data port
                data = {**seed._hello().data, "addrs": [HOST], "ctl": 1, "port": fake_data.port, "peers": []}
                for _ in range(MAX_PEERS + extra):
                    m = new()  # the leecher has checksums: a Hello with the right digests is accepted
                    m.send(dataclasses.replace(seed._hello(), peer_id=m.id, data=data))
                t = n.transport
                tables = {
                    "peers": lambda: sum(p.accepted for p in list(n._peers.values())),
                    "data_channels": lambda: len(t._receivers),  # type: ignore[attr-defined]
                }
                _watch(n, 3.0, tables, out)
                _fetch_into(out, n)
                # before the pool (issue 13), every data channel had a piece-sized buffer of its own
                pool = getattr(t, "staging", None)
                out.figures["staging_buffers"] = pool.made if pool else out.figures["data_channels"]
        finally:
            fake_data.close()
    return out


# --- 7. slow senders on the data port -----------------------------------------------------------------


def trickle(conns: int = 100) -> Outcome:
    """`conns` data connections trickle their credentials one byte a second while an honest leecher
    fetches; the seed must cut each at its deadline, with no thread of its own."""
    from swarm.transport.tcp import MAX_HANDSHAKES

    deadline_s = 2.0
    out = Outcome(bounds={"extra_threads": 2, "not_cut_after_deadline": 0})
    out.figures["max_handshakes"] = MAX_HANDSHAKES
    transport = TcpTransport(token=TOKEN, connect_timeout_s=deadline_s)
    with closing(seed_node(token=TOKEN, transport=transport)) as (seed,):
        port = int(seed.data_params["port"])
        threads = threading.active_count()
        socks = connections(port, conns)
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"\x28")  # a long peer id, one byte at a time
                stop.wait(1.0)

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        try:
            time.sleep(1.0)
            out.figures["extra_threads"] = threading.active_count() - threads - 1  # the dripper itself
            honest_fetch(out, seed.control_port)
            end = time.monotonic() + deadline_s + 3.0
            while time.monotonic() < end and not all(_cut(s) for s in socks):
                time.sleep(0.1)
            out.figures["not_cut_after_deadline"] = sum(not _cut(s) for s in socks)
        finally:
            stop.set()
            t.join(3)
            for s in socks:
                s.close()
    return out


def _cut(s: socket.socket) -> bool:
    """The other end closed `s` (reads EOF or an error)."""
    s.settimeout(0.01)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True
