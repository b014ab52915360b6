"""Attacks of issue 13 on authentication, replay, manifests, the deadline and open mode, each written as
the attacker would run it (tools in attack.py) against live nodes on loopback.

Each test failed on the main branch of the day the issue was filed, and states what must hold instead:
- replay: no recorded frame is worth anything sent again (status, Hello + Goodbye, a departed member);
- the data channel of a member cannot be taken over under its id, even in an open swarm;
- manifest replies: unsolicited or repeated ones are not processed and none costs the loop more than
  the receiver's own manifest; `fetch()` returns by its deadline whatever the control loop is doing;
- open swarm: a member holding other bytes cannot make a leecher load them silently, nor get the
  honest seed blamed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from swarm import protocol as P
from swarm.errors import ManifestMismatchError, StallError
from swarm.manifest import content_digest
from swarm.node import Node
from swarm.synthetic import synthetic_key, synthetic_tensors
from swarm.transport.tcp import TcpTransport
from tests.faults.attack import Member, Sniffer, frame_type, read_nonce, replay
from tests.faults.harness import (
    HOST,
    SIZE,
    FetchRun,
    WatchedTcp,
    alive,
    closing,
    config,
    leecher_node,
    peers_of,
    progress,
    seed_node,
    status_of,
    tcp_of,
    try_data_port,
    wrong_bytes,
)
from tests.loopback import free_port, wait_until

TOKEN = "attack-cluster-token"
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@contextmanager
def sniffing(port: int) -> Iterator[Sniffer]:
    s = Sniffer(port)
    try:
        yield s
    finally:
        s.close()


def _answered(answers: list[bytes], *fields: bytes) -> list[str]:
    """The types of the answers other than errors that carry any of `fields` (msgpack keys, found as
    bytes)."""
    return [frame_type(a) for a in answers if any(t in a for t in fields) and frame_type(a) != "error"]


# --- replay ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_recorded_status_query_is_worthless_replayed() -> None:
    with closing(seed_node(token=TOKEN)) as (seed,), sniffing(seed.control_port) as sniff:
        assert status_of(sniff.port, TOKEN) is not None  # `swarm status` through the sniffer
        frames = sniff.sent()
        assert "status?" in [frame_type(f) for f in frames]
        answers = replay(seed.control_port, frames)
        assert not _answered(answers, b"uptime_s"), "a replayed status query was answered"
        assert alive(seed, TOKEN)


@pytest.mark.timeout(60)
def test_recorded_hello_and_goodbye_cannot_knock_a_member_off() -> None:
    """Record a member that came and went (its Goodbye) and the Hello of a member fetching now; replayed
    together on a new connection, they must not make the seed drop the fetching member."""
    with closing(seed_node(token=TOKEN, rate_cap=2e6)) as nodes, sniffing(nodes[0].control_port) as sniff:
        seed = nodes[0]
        gone = leecher_node(token=TOKEN, peers=peers_of(sniff.port))
        nodes.append(gone)
        wait_until(lambda: gone.id in seed._peers and seed._peers[gone.id].accepted, 10, "the first member")
        # ... and the member took the seed's Hello (the seed accepts it before its own Hello has left):
        # only a member that knows the seed says goodbye to it.
        wait_until(lambda: seed.id in gone._peers, 10, "the seed's Hello")
        gone.close()
        wait_until(lambda: gone.id not in seed._peers, 10, "its goodbye")
        goodbye = [f for f in sniff.sent(0) if frame_type(f) == "goodbye"]
        assert goodbye, [frame_type(f) for f in sniff.sent(0)]

        victim = leecher_node(token=TOKEN, peers=peers_of(sniff.port), stall_timeout_s=8.0)
        nodes.append(victim)
        run = FetchRun(victim).start()
        wait_until(lambda: progress(victim) > 0, 15, "the victim's first piece")
        held = seed._peers[victim.id]
        hello = [f for f in sniff.sent(1) if frame_type(f) in ("hello", "auth")]
        replay(seed.control_port, hello + goodbye, wait_s=0.5)
        assert seed._peers.get(victim.id) is held, "the seed dropped the victim on replayed frames"
        run.wait(40)
        assert run.error is None, run.error
        assert wrong_bytes(dict(victim.tensors)) == 0


@pytest.mark.timeout(60)
def test_departed_members_frames_replayed_get_nothing() -> None:
    """Every frame a member sent, replayed after it left: no Hello, no bitfield, no manifest, no
    checksums come back."""
    with closing(seed_node(token=TOKEN)) as nodes, sniffing(nodes[0].control_port) as sniff:
        seed = nodes[0]
        member = leecher_node(token=TOKEN, peers=peers_of(sniff.port))
        nodes.append(member)
        FetchRun(member).start().wait(30)
        member.close()
        frames = sniff.sent(0)
        assert {"hello", "manifest?"} <= {frame_type(f) for f in frames}, [frame_type(f) for f in frames]
        answers = replay(seed.control_port, frames)
        leaked = _answered(answers, b"checksums", b"bitfield", b"key_digest", b"uptime_s")
        assert not leaked, leaked
        assert alive(seed, TOKEN)


@pytest.mark.timeout(60)
def test_outsider_cannot_take_over_a_members_data_channel() -> None:
    """Open swarm: a client that opens a data connection to the seed under a fetching member's id (read
    from `swarm status`) gets no byte, and the member finishes byte-identical."""
    with closing(seed_node(rate_cap=2e6)) as nodes:
        seed = nodes[0]
        victim = leecher_node(peers=peers_of(seed), stall_timeout_s=8.0)
        nodes.append(victim)
        run = FetchRun(victim).start()
        wait_until(lambda: progress(victim) > 0, 15, "the victim's first piece")
        status = status_of(seed.control_port)
        assert status is not None and victim.id in status["to"]
        pid = victim.id.encode()
        got = try_data_port(seed, bytes([len(pid)]) + pid, wait_s=2.0)  # the id alone, as an outsider can
        assert got == 0, f"the outsider received {got} bytes meant for {victim.id}"
        run.wait(40)
        assert run.error is None, run.error
        assert wrong_bytes(dict(victim.tensors)) == 0


class RecordingTcp(TcpTransport):
    """A member's transport that keeps the data-channel credentials it sent (what a sniffer would see)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.sent_credentials: list[bytes] = []

    def _credentials(self, *args: str | bytes) -> bytes:
        out: bytes = super()._credentials(*args)  # type: ignore[arg-type]
        self.sent_credentials.append(out)
        return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("token", [TOKEN, None])
def test_recorded_data_credentials_are_worth_nothing(token: str | None) -> None:
    """A member's data-channel credentials, recorded and sent again on a new connection while it
    fetches: the seed keeps the member's channel and gives the replayer nothing."""
    with closing(seed_node(token=token, rate_cap=2e6)) as nodes:
        seed = nodes[0]
        recording = RecordingTcp(token=token)
        victim = leecher_node(token=token, transport=recording, peers=peers_of(seed), stall_timeout_s=8.0)
        nodes.append(victim)
        run = FetchRun(victim).start()
        wait_until(lambda: progress(victim) > 0, 15, "the victim's first piece")
        channel = tcp_of(seed)._senders[victim.id]  # type: ignore[attr-defined]
        with socket.create_connection((HOST, int(seed.data_params["port"])), timeout=3) as s:
            read_nonce(s)
            s.sendall(recording.sent_credentials[0])
            s.settimeout(2.0)
            try:
                got = s.recv(1 << 16)
            except (TimeoutError, OSError):
                got = b""
        assert got == b"", f"the replayer received {len(got)} bytes"
        assert tcp_of(seed)._senders.get(victim.id) is channel  # type: ignore[attr-defined]
        run.wait(40)
        assert run.error is None, run.error
        assert wrong_bytes(dict(victim.tensors)) == 0


# --- manifests and the deadline -------------------------------------------------------------------


def _absurd_manifest(node: Node) -> dict[str, object]:
    """About 100 bytes that claim 2^20 pieces (the most the codec allows): seconds to cut."""
    return {
        "manifest": {
            "piece_size": 1,
            "checksum": node.manifest.checksum,
            "tensors": [["w", "uint8", [1 << 20], 1 << 20]],
        },
        "checksums": [],
    }


def _hello_as(node: Node, member: Member, **changes: object) -> P.Hello:
    """A Hello of `member` into `node`'s swarm."""
    h = node._hello()
    data = {**h.data, "ctl": 1, "port": 1, "addrs": [HOST]}
    values = {**h.__dict__, "peer_id": member.id, "data": data, **changes}
    return P.Hello(**values)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_manifest_replies_cannot_hold_a_fetch_past_its_deadline() -> None:
    deadline = 3.0
    with closing(leecher_node(token=TOKEN, deadline_s=deadline, discovery_timeout_s=30.0)) as (leecher,):
        run = FetchRun(leecher).start()
        member = Member(leecher.control_port, TOKEN)
        try:
            member.send(_hello_as(leecher, member, manifest_digest="0" * 16, role="seed"))
            assert any(isinstance(m, P.ManifestQuery) for m in member.received(1.0))
            for _ in range(3):  # one answer, then two more nobody asked for
                member.send_fields("manifest", _absurd_manifest(leecher))
            run.wait(deadline + 3)
        finally:
            member.close()
        assert isinstance(run.error, StallError) and "deadline" in str(run.error), run.error
        assert run.seconds < deadline + 1.5, run.seconds
        assert alive(leecher, TOKEN)


@pytest.mark.timeout(60)
def test_manifest_replies_do_not_freeze_a_seed() -> None:
    with closing(seed_node(token=TOKEN)) as (seed,):
        member = Member(seed.control_port, TOKEN)
        try:
            member.send(_hello_as(seed, member, manifest_digest="0" * 16, role="leecher"))
            for _ in range(3):
                member.send_fields("manifest", _absurd_manifest(seed))
            time.sleep(0.2)
            t0 = time.monotonic()
            assert status_of(seed.control_port, TOKEN, timeout_s=3.0) is not None, "the seed froze"
            print(f"\nstatus answered {time.monotonic() - t0:.3f} s after the replies")
        finally:
            member.close()


@pytest.mark.timeout(60)
def test_fetch_returns_by_its_deadline_whatever_the_loop_does() -> None:
    """The control loop is stuck (housekeeping that sleeps 8 s, standing in for any long piece of work;
    not a scheduler tick, which the loop runs only when the scheduler has work): fetch() still returns
    by its deadline, in the caller's thread."""
    deadline = 2.0
    with closing(leecher_node(token=TOKEN, deadline_s=deadline, discovery_timeout_s=30.0)) as (leecher,):
        stuck = threading.Event()
        housekeeping = leecher._housekeeping

        def stuck_housekeeping(now: float) -> None:
            if not stuck.is_set():
                stuck.set()
                time.sleep(8)
            housekeeping(now)

        leecher._housekeeping = stuck_housekeeping  # type: ignore[method-assign]
        run = FetchRun(leecher).start()
        run.wait(deadline + 1.5)
        assert stuck.is_set()
        assert isinstance(run.error, StallError) and "deadline" in str(run.error), run.error


# --- open swarm -----------------------------------------------------------------------------------


def _zero_seed(**cfg: object) -> Node:
    """A member of the same swarm and manifest holding other bytes (zeros): an outsider in an open swarm."""
    tensors = synthetic_tensors(SIZE, fill=False)
    return Node(synthetic_key(SIZE), tensors, config(**cfg), complete=True).start()


def _quiet_outcome(run: FetchRun, leecher: Node) -> None:
    """Either the leecher loaded the true bytes, or it failed loudly, naming the disagreement."""
    if run.error is None:
        assert wrong_bytes(dict(leecher.tensors)) == 0, "the leecher reported success with wrong bytes"
    else:
        assert isinstance(run.error, ManifestMismatchError), run.error
        assert "disagree" in str(run.error), run.error


@pytest.mark.timeout(60)
def test_open_swarm_member_with_other_bytes_cannot_poison_a_leecher_silently() -> None:
    """The outsider's seed answers first; the honest one comes up 0.3 s later."""
    port = free_port()
    with closing(_zero_seed()) as nodes:
        watch = WatchedTcp()
        leecher = leecher_node(transport=watch, peers=peers_of(nodes[0], port), discovery_timeout_s=3.0)
        nodes.append(leecher)
        run = FetchRun(leecher).start()
        time.sleep(0.3)
        nodes.append(seed_node(control_port=port))
        run.wait(30)
        _quiet_outcome(run, leecher)


@pytest.mark.timeout(60)
def test_open_swarm_unsolicited_checksums_do_not_get_the_honest_seed_blamed() -> None:
    """An outsider's Hello and unsolicited ManifestReply with the checksums of zeros reach the leecher
    before the honest seed does."""
    port = free_port()
    with closing(leecher_node(peers=peers_of(port), discovery_timeout_s=3.0)) as nodes:
        leecher = nodes[0]
        run = FetchRun(leecher).start()
        member = Member(leecher.control_port, None)
        try:
            zeros = _zero_checksums(leecher)
            member.send(_hello_as(leecher, member, role="seed", content_digest=content_digest(zeros)))
            member.send(P.ManifestReply(leecher.manifest.to_wire(), zeros))
            time.sleep(0.3)
            honest = seed_node(control_port=port)
            nodes.append(honest)
            run.wait(30)
        finally:
            member.close()
        _quiet_outcome(run, leecher)
        if run.error is not None:
            assert f"{honest.id}: holds different bytes" not in str(run.error), run.error


def _zero_checksums(node: Node) -> list[str]:
    from swarm.manifest import piece_checksums

    return piece_checksums(node.manifest, synthetic_tensors(SIZE, fill=False))


@pytest.mark.timeout(60)
def test_open_swarm_majority_wins_and_is_never_blamed() -> None:
    """Two honest seeds and one holding zeros: the leecher loads the honest bytes, never refuses an
    honest seed, and refuses the outsider."""
    with closing(seed_node(), seed_node(), _zero_seed()) as nodes:
        leecher = leecher_node(peers=peers_of(*nodes), discovery_timeout_s=3.0)
        nodes.append(leecher)
        run = FetchRun(leecher).start().wait(30)
        assert run.error is None, run.error
        assert wrong_bytes(dict(leecher.tensors)) == 0
        for honest in nodes[:2]:
            assert honest.id not in leecher._mismatches, leecher._mismatches
