"""Resource exhaustion by hostile clients (issue 13, items 1, 2, 5 and 7): memory, file descriptors,
threads, dials and staging buffers must stay bounded by protocol constants whatever strangers or
insiders send, and an honest fetch must still complete, byte-identical.

Seeds under a memory or fd attack are `swarm seed` processes, so /proc shows their own figures (and a
low RLIMIT_NOFILE can be set on them alone); the attacks that count threads, dials and peers run against
nodes in this process. Every attack is bounded in time and stops early once the bound it tests is
clearly broken, so a regression fails fast instead of eating the machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from swarm import protocol as P
from swarm.node import Node
from swarm.synthetic import synthetic_key
from swarm.transport.tcp import NONCE_SIZE, TcpTransport
from tests.faults.harness import (
    HOST,
    SIZE,
    FetchRun,
    Members,
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
#: RSS a seed may gain under a memory attack (the stated bound in docs/reliability.md)
RSS_BOUND_MB = 64.0
#: Constants of the protocol's caps that the tests check against (swarm/node.py, swarm/transport/tcp.py)
MAX_PEERS = 64
MAX_DIALS = 32
MAX_CANDIDATES = 256
MAX_HANDSHAKES = 64
pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def _honest_fetch(seed_port: int, **cfg: Any) -> None:
    with closing(leecher_node(token=TOKEN, peers=peers_of(seed_port), **cfg)) as (n,):
        run = FetchRun(n).start().wait(60)
        assert run.error is None, run.error
        assert wrong_bytes(dict(n.tensors)) == 0


@contextlib.contextmanager
def _seed_process(members: Members, nofile: int = 0) -> Iterator[tuple[int, int]]:
    """A `swarm seed` process with the token; yields (pid, control port)."""
    port = free_port()
    proc = members.seed(port, name="seed", env={"SWARM_TOKEN": TOKEN}, nofile=nofile)
    wait_for_member(port, proc, token=TOKEN)
    yield proc.pid, port
    assert proc.poll() is None, f"the seed died: {members.log(proc)[-2000:]}"


# --- 1. memory without the token ----------------------------------------------------------------------


def _bogus_frame(size: int) -> bytes:
    """A well-formed envelope of about `size` bytes whose MAC is wrong: what a stranger can send."""
    return bytes(msgpack.packb([P.MAGIC, P.VERSION, bytes(size - 64), os.urandom(32)], use_bin_type=True))


@pytest.mark.parametrize("size", [16 << 20, 256 << 10])
def test_frames_with_a_bogus_mac_do_not_grow_the_seed(members: Members, size: int) -> None:
    """Complete frames with a bogus MAC, sent as fast as one connection takes them for 4 s (today's main
    queued 10,000 per connection: 3 GB in 8 s at 16 MiB). The seed must stay within RSS_BOUND_MB."""
    with _seed_process(members) as (pid, port):
        base = resources(pid).rss_mb
        frame = _bogus_frame(size)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 2)  # keeps the attacker's own memory small
        sock.connect(f"tcp://{HOST}:{port}")
        peak = 0.0
        try:
            end = time.monotonic() + 4.0
            while time.monotonic() < end and peak < 4 * RSS_BOUND_MB:
                with contextlib.suppress(zmq.Again):
                    sock.send(frame, zmq.NOBLOCK, copy=False)
                peak = max(peak, resources(pid).rss_mb - base)
                time.sleep(0.001)
        finally:
            sock.close(0)
            ctx.term()
        assert peak <= RSS_BOUND_MB, f"seed grew {peak:.0f} MB under {size >> 10} KiB bogus frames"
        _honest_fetch(port)


@pytest.mark.parametrize("size", [16 << 20, 256 << 10])
def test_partial_frames_do_not_pin_memory(members: Members, size: int) -> None:
    """Forty connections each send all but one byte of a large frame and hold it (today's main pinned
    656 MB at 16 MiB; the MAC is never checked). The seed must stay within RSS_BOUND_MB."""
    with _seed_process(members) as (pid, port):
        base = resources(pid).rss_mb
        chunk = bytes(1 << 20)
        held: list[socket.socket] = []
        peak = 0.0
        try:
            for _ in range(40):
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
                    pass  # refused by the node: what the fix does
                time.sleep(0.02)
                peak = max(peak, resources(pid).rss_mb - base)
                if peak > 4 * RSS_BOUND_MB:
                    break
            time.sleep(0.5)
            peak = max(peak, resources(pid).rss_mb - base)
        finally:
            for s in held:
                s.close()
        assert peak <= RSS_BOUND_MB, f"seed grew {peak:.0f} MB under partial {size >> 10} KiB frames"
        _honest_fetch(port)


# --- 2. file descriptors ------------------------------------------------------------------------------


def _connections(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(socket.create_connection((HOST, port), timeout=2))
        except OSError:
            break
    return out


def test_data_port_survives_running_out_of_fds(members: Members) -> None:
    """Exhaust the seed's fds (limit 128): idle TCP connections to its control port, then to its data
    port, so that its data accept loop meets EMFILE. Today's main: that thread exited and no fetch ever
    worked again. Once the attacker hangs up, an honest fetch must complete."""
    with _seed_process(members, nofile=128) as (_, port):
        data_port = _data_port_of(port)
        held = _connections(port, 140)
        held += _connections(data_port, 40)
        time.sleep(1.5)  # the data accept loop meets EMFILE meanwhile
        for s in held:
            s.close()
        time.sleep(1.0)
        _honest_fetch(port, io_timeout_s=3.0, discovery_timeout_s=8.0, stall_timeout_s=10.0, deadline_s=30.0)


def test_idle_control_connections_do_not_lock_out_honest_peers(members: Members) -> None:
    """300 ZeroMQ connections that finish the handshake and then say nothing, held against a seed whose
    fd limit is 256 (today's main kept every one: fds ran out, libzmq spun, no new peer got in). An
    honest fetch must complete while they are held, and the seed's fds stay within the limit's half."""
    with _seed_process(members, nofile=256) as (pid, port):
        ctx = zmq.Context()
        socks = []
        try:
            for _ in range(300):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(f"tcp://{HOST}:{port}")
                socks.append(s)
            time.sleep(2.0)
            _honest_fetch(port, discovery_timeout_s=8.0)
            assert resources(pid).fds <= 128 + 64, resources(pid)
        finally:
            for s in socks:
                s.close(0)
            ctx.term()


def _data_port_of(port: int) -> int:
    """The data port a seed announces in its Hello (what any insider learns)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{HOST}:{port}")
    codec = P.Codec(TOKEN)
    try:
        key = synthetic_key(SIZE)
        hello = P.Hello("probe", key.to_wire(), key.digest, "", "", "leecher", "tcp", {})
        sock.send(codec.encode(hello))
        assert sock.poll(5000), "no answer to a Hello"
        reply = codec.decode(sock.recv())
        assert isinstance(reply, P.Hello), reply
        return int(reply.data["port"])
    finally:
        sock.close(0)
        ctx.term()


# --- 5. peer exchange and accepted peers --------------------------------------------------------------


def _fake_hello(target: Node, pid: str, **data: Any) -> P.Hello:
    h = target._hello()
    return P.Hello(pid, h.key, h.key_digest, h.manifest_digest, "", "seed", h.transport, data)


def test_peer_exchange_flood_is_capped() -> None:
    """32 insiders each list 32 made-up peers in their Hello (today's main dialled all 1,024 and its
    control loop died: ZeroMQ's socket limit). Candidates and dials stay capped, the node lives, and a
    real seed it was told about still serves it."""
    with closing(seed_node(token=TOKEN)) as (seed,):
        with closing(leecher_node(token=TOKEN, peers=peers_of(seed), discovery_timeout_s=5.0)) as (n,):
            codec = P.Codec(TOKEN)
            ctx = zmq.Context()
            socks = []
            try:
                for i in range(32):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(f"tcp://{HOST}:{n.control_port}")
                    made_up = [[f"x{i}-{j}", HOST, 20000 + 32 * i + j] for j in range(32)]
                    s.send(codec.encode(_fake_hello(n, f"fake{i}", addrs=[HOST], ctl=1, peers=made_up)))
                    socks.append(s)
                peak_dials = 0
                end = time.monotonic() + 3.0
                while time.monotonic() < end:
                    peak_dials = max(peak_dials, len(n._dials))
                    time.sleep(0.05)
                assert alive(n, TOKEN), "the leecher's control loop died"
                assert len(n._candidates) <= MAX_CANDIDATES, len(n._candidates)
                assert peak_dials <= MAX_DIALS, peak_dials
                run = FetchRun(n).start().wait(60)
                assert run.error is None, run.error
                assert wrong_bytes(dict(n.tensors)) == 0
            finally:
                for s in socks:
                    s.close(0)
                ctx.term()


class _NonceServer:
    """A data port that answers every connection with a nonce and then holds it: a fake peer's channel."""

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


def test_accepted_peers_and_staging_are_capped() -> None:
    """Insiders that pass every check (right manifest, right checksums) join a leecher by the hundred
    (today's main accepted all, and gave each a data channel with a piece-sized staging buffer: 16 fake
    peers cost 1 GB at 64 MiB pieces). Accepted peers and data channels stay capped; the fetch from
    the honest seed still completes."""
    with closing(seed_node(token=TOKEN)) as (seed,):
        assert seed.checksums is not None
        reply = P.ManifestReply(seed.manifest.to_wire(), seed.checksums)
        with closing(leecher_node(token=TOKEN, peers=peers_of(seed))) as (n,):
            wait_until(lambda: any(p.accepted for p in n._peers.values()), 10, "the seed to be accepted")
            fake_data = _NonceServer()
            codec = P.Codec(TOKEN)
            ctx = zmq.Context()
            socks = []
            try:
                h = seed._hello()
                for i in range(MAX_PEERS + 16):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(f"tcp://{HOST}:{n.control_port}")
                    data = {"addrs": [HOST], "ctl": 1, "port": fake_data.port}
                    hello = dataclasses.replace(h, peer_id=f"fake{i}", role="seed", data=data)
                    s.send(codec.encode(hello))
                    s.send(codec.encode(reply))
                    socks.append(s)
                peak_peers = peak_channels = 0
                end = time.monotonic() + 3.0
                while time.monotonic() < end:
                    peak_peers = max(peak_peers, sum(p.accepted for p in list(n._peers.values())))
                    peak_channels = max(peak_channels, len(n.transport._receivers))  # type: ignore[attr-defined]
                    time.sleep(0.05)
                assert alive(n, TOKEN)
                assert peak_peers <= MAX_PEERS, peak_peers
                assert peak_channels <= MAX_PEERS, peak_channels
                run = FetchRun(n).start().wait(60)
                assert run.error is None, run.error
                assert wrong_bytes(dict(n.tensors)) == 0
            finally:
                for s in socks:
                    s.close(0)
                ctx.term()
                fake_data.close()


# --- 7. slow senders on the data port -----------------------------------------------------------------


def test_trickled_credentials_hold_no_thread() -> None:
    """A hundred data connections trickle their credentials one byte a second (today's main held one
    thread and socket each for as long as the trickle lasted). Handshakes take no thread of their own,
    at most MAX_HANDSHAKES are in progress, each is cut at its deadline, and an honest fetch completes
    meanwhile."""
    transport = TcpTransport(token=TOKEN, connect_timeout_s=2.0)
    with closing(seed_node(token=TOKEN, transport=transport)) as (seed,):
        port = int(seed.data_params["port"])
        threads = threading.active_count()
        socks = _connections(port, 100)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"\x28")  # a long peer id, one byte at a time
                stop.wait(1.0)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            time.sleep(1.0)
            extra = threading.active_count() - threads
            run = FetchRun(leecher_node(token=TOKEN, peers=peers_of(seed))).start()
            try:
                run.wait(60)
                assert run.error is None, run.error
                assert wrong_bytes(dict(run.node.tensors)) == 0
            finally:
                run.node.close()

            def cut(s: socket.socket) -> bool:
                s.settimeout(0.01)
                try:
                    while s.recv(4096):
                        pass
                    return True
                except TimeoutError:
                    return False
                except OSError:
                    return True

            wait_until(lambda: all(cut(s) for s in socks), 5.0, "the seed to cut every trickled handshake")
        finally:
            stop.set()
            t.join(3)
            for s in socks:
                s.close()
        assert extra <= 2, f"{extra} threads for 100 unauthenticated connections"
