"""Hostile control traffic against a live node, as hypothesis strategies and a driver (used by
tests/faults/test_hostile.py and bench/faults.py).

Three kinds of client, each on its own ZeroMQ connection per example:

- *stranger*: knows no token. Sends random bytes, valid frames truncated or bit-flipped, envelopes of
  other versions, messages unsigned or signed with another token. Must get nothing but `Error` replies.
- *insider*: holds the cluster token (or there is none) but is buggy or malicious: a valid Hello with
  fuzzed data-plane parameters (addresses, peer lists, ports), then any message type with fuzzed
  fields (piece indices at and past the bounds, wrong types, huge manifests). The node may answer,
  refuse or drop it; it must not crash, hang, or stop serving honest peers.
- every example ends with a signed `StatusQuery` on the same connection; ZeroMQ keeps the order of one
  connection, so its answer proves the node has handled the whole example and is still alive.

Addresses in fuzzed messages are only 127.0.0.1 (or values that are not addresses at all), so a node that
dials what it is told dials only loopback.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import strategies as st

from swarm import protocol as P
from swarm.node import Node

LOOPBACK = "127.0.0.1"

ints = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 255, 65535, 65536, 1 << 31, 1 << 32, (1 << 63) - 1, -(1 << 63)]),
    st.integers(-(1 << 63), (1 << 64) - 1),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
plain = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _hosts() -> st.SearchStrategy[Any]:
    """Things a fuzzed message may name as an address: loopback, or values that are not addresses."""
    return st.one_of(st.just(LOOPBACK), st.sampled_from(["", " ", "[", "::::"]), ints, st.none(), plain)


def data_params(ports: list[int]) -> st.SearchStrategy[dict[str, Any]]:
    port = st.one_of(st.sampled_from(ports), ints, plain)
    pex_entry = st.one_of(
        st.tuples(st.text(max_size=12), st.just(LOOPBACK), st.sampled_from(ports) | ints).map(list),
        plain,
    )
    values = {
        "addrs": st.one_of(st.lists(_hosts(), max_size=3), plain, st.just([LOOPBACK])),
        "peers": st.one_of(st.lists(pex_entry, max_size=3), plain),
        "ctl": port,
        "port": port,
        "host": _hosts(),
    }
    return st.fixed_dictionaries({}, optional=values).map(dict)


def piece_values(pieces: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([0, pieces - 1, pieces, pieces + 1, -1, 1 << 20, 1 << 32]),
        st.integers(0, max(pieces - 1, 0)),
        plain,
    )


def manifest_values(real: dict[str, Any]) -> st.SearchStrategy[Any]:
    """The real manifest, slightly wrong ones, and ones whose piece count is absurd."""
    tensor = st.lists(st.one_of(st.text(max_size=8), ints, plain), min_size=4, max_size=4)
    return st.one_of(
        st.just(real),
        st.fixed_dictionaries(
            {"piece_size": st.one_of(ints, plain), "tensors": st.lists(tensor, max_size=3)}
        ),
        st.builds(
            lambda ps, nb: {"piece_size": ps, "tensors": [["w", "uint8", [nb], nb]]},
            st.sampled_from([1, 2, 7, 4096]),
            st.sampled_from([1 << 30, 1 << 40, 1 << 48]),
        ),
        plain,
    )


@dataclass
class Target:
    """What the strategies need to know about the node under attack."""

    hello: P.Hello  # a valid Hello for its swarm (peer_id and data are replaced per example)
    pieces: int
    manifest: dict[str, Any]
    checksums: list[str]
    ports: list[int]  # loopback ports that exist (the node's own), for plausible addresses


def insider_messages(t: Target) -> st.SearchStrategy[list[P.Message | tuple[str, dict[str, Any]]]]:
    """A Hello with fuzzed data, then up to 8 messages of any type with fuzzed or plausible fields."""
    piece = piece_values(t.pieces)
    by_type: dict[str, st.SearchStrategy[Any]] = {
        "have": st.fixed_dictionaries({"piece": piece}),
        "request": st.fixed_dictionaries({"piece": piece}),
        "cancel": st.fixed_dictionaries({"piece": piece}),
        "reject": st.fixed_dictionaries({"piece": piece, "busy": st.booleans() | plain, "reason": plain}),
        "sent": st.fixed_dictionaries({"piece": piece, "ok": st.booleans() | plain}),
        "batch": st.fixed_dictionaries(
            {name: st.lists(piece, max_size=8) | plain for name in P.Batch.SCHEMA}
        ),
        "bitfield": st.one_of(
            st.builds(
                lambda bits: {"count": t.pieces, "bits": bits},
                st.binary(min_size=(t.pieces + 7) // 8, max_size=(t.pieces + 7) // 8),
            ),
            st.fixed_dictionaries({"count": ints | plain, "bits": st.binary(max_size=64) | plain}),
        ),
        "manifest": st.fixed_dictionaries(
            {
                "manifest": manifest_values(t.manifest),
                "checksums": st.one_of(
                    st.just(t.checksums), st.lists(st.text(max_size=32), max_size=4), plain
                ),
            }
        ),
        "channel": st.fixed_dictionaries(
            {"transport": st.just("tcp") | plain, "params": data_params(t.ports)}
        ),
        "goodbye": st.fixed_dictionaries({"reason": st.text(max_size=20) | plain}),
        "error": st.fixed_dictionaries(
            {"code": st.sampled_from(["auth", "wrong_key", "x"]) | plain, "message": plain}
        ),
        "ping": st.just({}),
        "manifest?": st.just({}),
        "status?": st.just({}),
        "status": st.fixed_dictionaries({"status": plain}),
    }
    one = st.one_of(
        *[st.tuples(st.just(kind), fields) for kind, fields in by_type.items()],
        st.tuples(st.text(max_size=10), st.dictionaries(st.text(max_size=8), plain, max_size=3)),
    )
    hello = st.builds(
        lambda pid, data, role, cd: P.Hello(
            pid,
            t.hello.key,
            t.hello.key_digest,
            t.hello.manifest_digest,
            cd,
            role,
            t.hello.transport,
            data,
        ),
        st.text(min_size=1, max_size=16),
        data_params(t.ports),
        st.sampled_from(["seed", "leecher"]),
        st.sampled_from([t.hello.content_digest, ""]),
    )
    return st.tuples(hello, st.lists(one, max_size=8)).map(lambda x: [x[0], *x[1]])


def stranger_frames(token: str | None, valid: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    """Frames of a client without the token (sent before any session of its own): garbage, damaged valid
    frames, other versions, frames of other sessions (recorded ones among them, `valid`), bad MACs."""
    from tests.faults.attack import sealed_elsewhere

    other = sealed_elsewhere("not-the-token")
    unsigned = sealed_elsewhere(None)
    msgs = [P.StatusQuery(), P.Ping(), P.Request(0), P.ManifestQuery(), P.Have(1)]

    def damaged(frame: bytes, cut: int, flip: int) -> bytes:
        b = bytearray(frame[: max(1, cut % (len(frame) + 1))])
        if flip and b:
            b[flip % len(b)] ^= 1 << (flip % 8)
        return bytes(b)

    frame = st.one_of(
        st.binary(max_size=256),
        st.builds(damaged, st.sampled_from(valid), st.integers(0, 4096), st.integers(0, 4096)),
        st.builds(
            lambda v, s, p, m: msgpack.packb([P.MAGIC, v, s, p, m], use_bin_type=True),
            ints | plain,
            ints,
            st.binary(max_size=64),
            st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
        ),
        st.sampled_from(msgs).map(unsigned.encode if token else other.encode),
        st.sampled_from(msgs).map(other.encode),
    )
    return st.lists(frame, min_size=1, max_size=10)


def encode_any(session: P.Session, item: P.Message | tuple[str, dict[str, Any]]) -> bytes | None:
    """Seal a message, or a (type, fields) pair that bypasses the dataclasses (fields unchecked)."""
    if isinstance(item, P.Message):
        try:
            return session.encode(item)
        except (ValueError, TypeError, OverflowError, P.ProtocolError):
            return None
    kind, fields = item
    try:
        payload = msgpack.packb([kind, fields], use_bin_type=True)
        return session.seal(payload)
    except (ValueError, TypeError, OverflowError, P.ProtocolError):
        return None


@dataclass
class Driver:
    """Sends one example on a fresh connection and waits for the node to answer a status query."""

    node: Node
    token: str | None
    sent: int = 0
    examples: int = 0
    replies: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tests.faults.attack import Member

        self.member = Member(self.node.control_port, self.token, handshake=False)
        self.client = self.member.raw

    def target(self) -> Target:
        n = self.node
        hello = n._hello()
        return Target(
            hello=hello,
            pieces=len(n.manifest.pieces),
            manifest=n.manifest.to_wire(),
            checksums=list(n.checksums or []),
            ports=[n.control_port, int(n.data_params.get("port", 0))],
        )

    def as_member(self, items: list[Any]) -> list[Any]:
        """The example as the current member sends it: its Hello under the member's own id (any other
        id is refused before the node looks further, so fuzzing it would test nothing else)."""
        if items and isinstance(items[0], P.Hello):
            items = [dataclasses.replace(items[0], peer_id=self.member.id), *items[1:]]
        return items

    def session(self) -> P.Session:
        """A fresh connection under a fresh key (a new member per example); the handshake not yet run."""
        from tests.faults.attack import Member

        self.member.close()
        self.member = Member(self.node.control_port, self.token, handshake=False)
        self.client = self.member.raw
        return self.member.session

    def run(self, frames: list[bytes], timeout_s: float = 10.0, *, stranger: bool = False) -> list[P.Message]:
        """On the connection of the last `session()`: the handshake then `frames` (a `stranger` sends
        them before it, as it cannot complete one), then a StatusQuery; the decoded replies up to its
        answer (the strangers' answers first)."""
        member = self.member
        if stranger:
            for f in frames:
                self.client.send(f)
        member.handshake(timeout_s)
        got: list[P.Message] = list(member.early)
        if not stranger:
            for f in frames:
                self.client.send(f)
        member.send(P.StatusQuery())
        self.sent += len(frames)
        self.examples += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for raw in self.client.replies(wait_s=0.05, limit=1):
                try:
                    msg, _ = member.session.receive(raw)
                except P.ProtocolError as e:
                    raise AssertionError(f"the node sent an undecodable reply: {e}") from e
                if msg is None:
                    continue
                self.replies[msg.TYPE] = self.replies.get(msg.TYPE, 0) + 1
                got.append(msg)
                if isinstance(msg, P.StatusReply):
                    return got
            thread = self.node._thread
            if thread is None or not thread.is_alive():
                raise AssertionError("the node's control loop died")
        raise AssertionError(
            f"no status answer within {timeout_s:.0f} s after {len(frames)} frame(s): a hang"
        )

    def close(self) -> None:
        self.member.close()


#: A client that floods a node's control port with bad frames, reconnecting to dodge the per-
#: connection cut-off; prints how many frames it sent.
FLOOD = r"""
import os, random, sys, time, zmq, msgpack
port, seconds = int(sys.argv[1]), float(sys.argv[2])
ctx = zmq.Context(); sent = 0; end = time.monotonic() + seconds; rnd = random.Random(1)
while time.monotonic() < end:
    s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0); s.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(500):
        kind = rnd.randrange(3)
        if kind == 0: f = os.urandom(rnd.randrange(1, 300))
        elif kind == 1: f = msgpack.packb([b"VSW", 1, msgpack.packb(["request", {"piece": 0}]), None])
        else: f = msgpack.packb([b"VSW", 1, msgpack.packb(["hello", {}]), os.urandom(32)])
        try: s.send(f, zmq.NOBLOCK); sent += 1
        except zmq.Again: break
    time.sleep(0.002)
    for _ in range(2000):
        if not s.poll(0): break
        s.recv()
    s.close(0)
print(sent, flush=True)
"""


@contextmanager
def flooding(port: int | None, seconds: float = 6.0) -> Iterator[list[int]]:
    """Run FLOOD against `port` in a subprocess during the block (nothing when `port` is None); the
    yielded list holds the number of frames sent once the block has ended."""
    sent: list[int] = []
    if port is None:
        yield sent
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(port), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(0.5)
    try:
        yield sent
    finally:
        out, _ = proc.communicate(timeout=30)
        sent.append(int(out.strip() or 0))
