"""The peer session (swarm/session.py) through an in-memory pair of `Members`: no sockets, no threads.

One member dials the other; every frame one side's actions put on the link is handed to the other's
`receive`, in order (or, in the property test, in any order an attacker on the path likes)."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from swarm import protocol as P
from swarm import session as S
from swarm.errors import AuthError, SwarmError, VersionMismatchError
from swarm.identity import Identity
from swarm.manifest import Manifest, SwarmKey, TensorSpec, content_digest
from swarm.transport.paths import Offer

KEY = SwarmKey("tiny@1", "bfloat16", engine="vllm-0.32.0")
MANIFEST = Manifest([TensorSpec("w", "bfloat16", (4, 8), 64)], 16)  # 4 pieces
CHECKSUMS = [f"{i:032x}" for i in range(4)]
TCP = Offer(transports=frozenset({"tcp"}))


def member(
    token: str | None = None,
    *,
    seed: bool = False,
    checksums: list[str] = CHECKSUMS,
    manifest: Manifest = MANIFEST,
    key: SwarmKey = KEY,
    offer: Offer = TCP,
    max_peers: int = 64,
) -> S.Members:
    return S.Members(
        identity=Identity(),
        codec=P.Codec(token),
        key=key,
        manifest=manifest,
        checksums=list(checksums) if seed else None,
        offer=offer,
        max_peers=max_peers,
        quorum_s=1.0,
    )


class Pair:
    """`dialer` dials `listener` over one link; frames travel in order until nothing is left to send.
    Actions other than `Send` are kept per side (`events`), the way the node would carry them out."""

    def __init__(self, listener: S.Members, dialer: S.Members, ident: bytes = b"ident", now: float = 0.0):
        self.listener, self.dialer, self.ident = listener, dialer, ident
        self.dial, opening = dialer.dial("sock", "10.0.0.1", 7, now)
        self.wire: deque[tuple[S.Members, bytes]] = deque()
        self.events: dict[int, list[S.Action]] = {id(listener): [], id(dialer): []}
        self.take(dialer, opening)

    def link_of(self, side: S.Members) -> S.Link | None:
        return self.dial if side is self.dialer else self.listener.listened(self.ident)

    def take(self, side: S.Members, actions: list[S.Action]) -> None:
        other = self.listener if side is self.dialer else self.dialer
        for a in actions:
            if isinstance(a, S.Send):
                self.wire.append((other, a.frame()))
            else:
                self.events[id(side)].append(a)
                if isinstance(a, S.StatusAsked):
                    self.take(side, side.reply(a.link, P.StatusReply({"role": side.role})))
                elif isinstance(a, S.Accepted):  # as the node does: our bitfield to the new peer
                    held = range(4) if side.role == "seed" else ()
                    self.take(side, side.send(a.peer, P.Bitfield.of(set(held), 4), 0.0))

    def deliver(self, to: S.Members, frame: bytes, now: float = 0.0) -> list[S.Action]:
        link = self.link_of(to)
        if link is None or link.closed:
            return []
        actions = to.receive(link, frame, now)
        self.take(to, actions)
        return actions

    def run(self, now: float = 0.0) -> None:
        for _ in range(100):
            if not self.wire:
                return
            to, frame = self.wire.popleft()
            self.deliver(to, frame, now)
        raise AssertionError("the pair never went quiet")

    def until_hello(self, to: S.Members) -> None:
        """Deliver frames up to the first Hello for `to`, which is taken off the wire, not delivered."""
        while self.wire:
            side, frame = self.wire.popleft()
            if side is to and _type_of(frame) == "hello":
                return
            self.deliver(side, frame)

    def of(self, side: S.Members, kind: type) -> list[S.Action]:
        return [a for a in self.events[id(side)] if isinstance(a, kind)]


def test_state_table_is_closed_and_complete() -> None:
    """Every state has its message table; every transition leads to a state; a missing one is a bug."""
    assert set(S.ON_MESSAGE) == set(S.PeerState)
    assert {to for to in S.TRANSITIONS.values()} <= set(S.PeerState)
    peer = S.Peer("x", P.Hello("x", {}, "", "", "", "seed", "tcp", {}), state=S.PeerState.GONE)
    with pytest.raises(SwarmError, match="no transition from gone on 'accept'"):
        peer.fire("accept")


@pytest.mark.parametrize("token", [None, "secret"])
def test_seed_and_leecher_accept_each_other(token: str | None) -> None:
    seed, leecher = member(token, seed=True), member(token)
    pair = Pair(seed, leecher)
    pair.run()
    assert set(seed.peers) == {leecher.id} and seed.peers[leecher.id].accepted  # ids proven by the keys
    if token is None:
        # Open swarm: one member's word is taken only after the quorum wait (rule 5).
        assert not leecher.peers[seed.id].accepted and leecher.checksums is None
        pair.take(leecher, leecher.decide(0.5))
        assert leecher.checksums is None
        pair.take(leecher, leecher.decide(1.0))
        pair.run()
    assert leecher.checksums == CHECKSUMS
    assert set(leecher.peers) == {seed.id} and leecher.peers[seed.id].accepted
    assert [a.checksums for a in pair.of(leecher, S.Adopted)] == [CHECKSUMS]  # type: ignore[attr-defined]
    assert leecher.peers[seed.id].path == seed.peers[leecher.id].path == "tcp"
    assert not pair.of(seed, S.Rejected) and not pair.of(leecher, S.Rejected)


def test_two_seeds_accept_each_other_and_share_no_manifest() -> None:
    a, b = member("t", seed=True), member("t", seed=True)
    pair = Pair(a, b)
    pair.run()
    assert a.peers[b.id].accepted and b.peers[a.id].accepted
    assert not any(p.manifest_asked for p in (a.peers[b.id], b.peers[a.id]))


def test_an_accepted_peer_s_messages_are_delivered() -> None:
    seed, leecher = member("t", seed=True), member("t")
    pair = Pair(seed, leecher)
    pair.run()
    assert len(pair.of(leecher, S.Accepted)) == len(pair.of(seed, S.Accepted)) == 1
    seed_peer = seed.peers[leecher.id]
    pair.take(seed, seed.send(seed_peer, P.Have(2), 0.0))
    pair.take(seed, seed.send(seed_peer, P.Request(1), 0.0))
    pair.run()
    assert [a.msg for a in pair.of(leecher, S.Deliver)] == [P.Have(2), P.Request(1)]  # type: ignore[attr-defined]


def test_haves_before_acceptance_wait_for_it_and_nothing_else_passes() -> None:
    seed, leecher = member("t", seed=True), member("t")
    pair = Pair(seed, leecher)
    # Up to the seed taking the leecher's Hello: the seed accepts it at once and sends its Hello and
    # Bitfield; the leecher, without checksums, still has to ask for the manifest.
    while pair.wire:
        to, frame = pair.wire.popleft()
        pair.deliver(to, frame)
        if to is seed and _type_of(frame) == "hello":
            break
    assert seed.peers[leecher.id].accepted
    for msg in (P.Request(0), P.Have(3)):
        pair.take(seed, seed.send(seed.peers[leecher.id], msg, 0.0))
    pair.run()
    assert not pair.of(leecher, S.Deliver), "a message of a peer under check reached the scheduler"
    (accepted,) = pair.of(leecher, S.Accepted)
    assert accepted.early_have == {0, 1, 2, 3}  # type: ignore[attr-defined]
    assert leecher.peers[seed.id].early_have == set()


def frame_of(actions: list[S.Action]) -> bytes:
    """The one frame these actions send."""
    (send,) = [a for a in actions if isinstance(a, S.Send)]
    return send.frame()


def _type_of(frame: bytes) -> str:
    payload = msgpack.unpackb(frame, raw=False)[3]
    return str(msgpack.unpackb(payload, raw=False)[0])


# --- refusals ---------------------------------------------------------------------------------------


def test_wrong_version_is_refused_on_both_kinds_of_link() -> None:
    seed, leecher = member(seed=True), member()
    pair = Pair(seed, leecher)
    pair.wire.clear()
    old = msgpack.packb([P.MAGIC, 1, 0, P.pack(P.Ping()), None], use_bin_type=True)
    actions = pair.deliver(seed, old)
    assert isinstance(actions[0], S.Rejected) and isinstance(actions[0].error, VersionMismatchError)
    assert _type_of(pair.wire[0][1]) == "error"  # answered, so the other side can say why
    actions = pair.deliver(leecher, old)
    assert isinstance(actions[0], S.Rejected) and isinstance(actions[1], S.Close)
    assert pair.dial.closed


def test_another_token_fails_the_handshake_and_ends_the_dial() -> None:
    seed, leecher = member("one", seed=True), member("two")
    pair = Pair(seed, leecher)
    pair.run()
    rejected = pair.of(seed, S.Rejected)
    assert rejected and isinstance(rejected[0].error, AuthError)  # type: ignore[attr-defined]
    assert pair.of(leecher, S.Close) and pair.dial.closed
    assert "refused the session" in leecher.mismatches["10.0.0.1:7"]
    assert not seed.peers and not leecher.peers


def test_a_bad_mac_after_the_handshake_is_refused() -> None:
    seed, leecher = member("t", seed=True), member("t")
    pair = Pair(seed, leecher)
    pair.run()
    frame = pair.dial.session.encode(P.Ping())
    seq, _, mac = msgpack.unpackb(frame, raw=False)[2:]
    forged = msgpack.packb([P.MAGIC, P.VERSION, seq, P.pack(P.Have(1)), mac], use_bin_type=True)
    actions = pair.deliver(seed, forged)
    assert isinstance(actions[0], S.Rejected) and "signature" in str(actions[0].error)


def test_replayed_and_reordered_frames_are_refused() -> None:
    seed, leecher = member("t", seed=True), member("t")
    pair = Pair(seed, leecher)
    pair.run()
    peer = leecher.peers[seed.id]
    first = frame_of(leecher.send(peer, P.Have(1), 0.0))
    second = frame_of(leecher.send(peer, P.Have(2), 0.0))
    assert not any(isinstance(a, S.Rejected) for a in pair.deliver(seed, second))
    for again in (first, second):  # out of order, then replayed
        actions = pair.deliver(seed, again)
        assert isinstance(actions[0], S.Rejected) and "replayed or reordered" in str(actions[0].error)


def test_a_listened_identity_is_cut_off_after_too_many_bad_frames() -> None:
    seed = member(seed=True)
    link = seed.listened(b"x")
    assert link is not None
    for _ in range(S.MAX_PROTOCOL_ERRORS):
        assert isinstance(seed.receive(link, b"junk", 0.0)[0], S.Rejected)
    assert seed.listened(b"x") is None


def test_a_different_manifest_is_fetched_named_and_refused() -> None:
    other = Manifest([TensorSpec("w", "bfloat16", (4, 8), 64)], 32)
    a, b = member("t", seed=True), member("t", seed=True, manifest=other, checksums=CHECKSUMS[:2])
    pair = Pair(a, b)
    pair.run()
    for side, them in ((a, b), (b, a)):
        peer = side.peers[them.id]
        assert peer.state is S.PeerState.REFUSED and "holds a different manifest" in peer.refused
        assert them.id in side.mismatches
    assert [c.retry for c in pair.of(b, S.Close)] == ["never"]  # type: ignore[attr-defined]
    assert not pair.of(a, S.Accepted) and not pair.of(b, S.Accepted)


def test_other_bytes_for_the_same_manifest_are_refused() -> None:
    a, b = member("t", seed=True), member("t", seed=True, checksums=[c[::-1] for c in CHECKSUMS])
    pair = Pair(a, b)
    pair.run()
    assert "different bytes" in a.peers[b.id].refused and "different bytes" in b.peers[a.id].refused


def test_another_swarm_key_is_refused() -> None:
    a, b = member(seed=True), member(key=SwarmKey("other@1", "bfloat16", engine="vllm-0.32.0"))
    pair = Pair(a, b)
    pair.run()
    assert not a.peers and not b.peers
    assert "other swarm key" in a.mismatches[b.id] and "other swarm key" in b.mismatches["10.0.0.1:7"]
    assert [c.retry for c in pair.of(b, S.Close)] == ["never"]  # type: ignore[attr-defined]


def test_no_common_path_is_refused() -> None:
    gpu = Offer(host="h", gpu="GPU-1", transports=frozenset({"nccl"}))
    a, b = member(seed=True), member(offer=gpu)
    pair = Pair(a, b)
    pair.run()
    assert not a.peers and not b.peers
    assert "no data path in common" in a.mismatches[b.id]
    assert "no data path in common" in b.mismatches["10.0.0.1:7"]
    assert [c.retry for c in pair.of(b, S.Close)] == ["never"]  # type: ignore[attr-defined]


def test_the_path_is_chosen_per_pair() -> None:
    gpu = Offer(host="h", gpu="GPU-1", transports=frozenset({"tcp", "ipc", "nccl"}))
    same_host = Offer(host="h", gpu="GPU-1", transports=frozenset({"tcp", "ipc"}))
    a, b, c = member(seed=True, offer=gpu), member(offer=same_host), member()
    Pair(a, b).run()
    Pair(a, c, ident=b"c").run()
    assert a.peers[b.id].path == "ipc" and a.peers[c.id].path == "tcp"


def test_a_full_node_answers_busy_and_the_dialer_backs_off() -> None:
    seed = member(seed=True, max_peers=1)
    first, second = member(), member()
    Pair(seed, first).run()
    pair = Pair(seed, second, ident=b"second")
    pair.run()
    assert set(seed.peers) == {first.id}
    assert [c.retry for c in pair.of(second, S.Close)] == ["busy"]  # type: ignore[attr-defined]
    # A peer dropped to make room is turned away for a while even once there is room.
    pair.take(seed, seed.forget(seed.peers[first.id]))
    seed.shun(first.id, 5.0, 0.0)
    again = Pair(seed, first, ident=b"again")
    again.run()
    assert not seed.peers and [c.retry for c in again.of(first, S.Close)] == ["busy"]  # type: ignore[attr-defined]


def test_a_hello_under_another_id_is_refused() -> None:
    seed, leecher = member(seed=True), member()
    pair = Pair(seed, leecher)
    # Let the handshake finish, then replace the leecher's Hello by one that claims the seed's id.
    pair.until_hello(seed)
    lie = dataclasses.replace(leecher.hello(), peer_id="0123456789abcdef")
    pair.take(leecher, leecher.reply(pair.dial, lie))
    pair.run()
    assert not seed.peers
    assert not leecher.peers  # the seed sent no Hello, only an Error


def test_before_its_hello_a_link_gets_only_status_and_pings() -> None:
    seed, leecher = member(seed=True), member()
    pair = Pair(seed, leecher)
    pair.until_hello(seed)
    pair.wire.clear()  # the Hello never arrives
    for msg in (P.Request(0), P.StatusQuery(), P.Ping(), P.Goodbye("bye")):
        pair.deliver(seed, frame_of(leecher.reply(pair.dial, msg)))
    assert [_type_of(f) for _, f in pair.wire] == ["error", "status", "ping"]
    assert b"hello_first" in pair.wire[0][1]
    assert pair.of(seed, S.StatusAsked) and not seed.peers


def test_an_open_swarm_takes_no_checksums_without_a_majority() -> None:
    honest, liar, leecher = member(seed=True), member(seed=True, checksums=["f" * 32] * 4), member()
    Pair(honest, leecher).run()
    Pair(liar, leecher).run()
    assert leecher.votes == {honest.id: content_digest(CHECKSUMS), liar.id: content_digest(["f" * 32] * 4)}
    assert leecher.decide(10.0) == [] and leecher.checksums is None  # one against one: nobody's word


# --- the property: an attacker on the path gains nothing --------------------------------------------


@st.composite
def schedules(draw: Callable[..., object]) -> list[tuple[str, int, int, int]]:
    op = st.tuples(
        st.sampled_from(["next", "next", "next", "replay", "flip", "foreign", "talk"]),
        st.integers(0, 1),  # direction: 0 to the listener, 1 to the dialer
        st.integers(0, 1 << 16),  # which frame
        st.integers(0, 1 << 16),  # where and what to flip
    )
    return draw(st.lists(op, min_size=10, max_size=80))  # type: ignore[return-value]


def _foreign_frames(token: str | None) -> list[bytes]:
    """Frames of another pair of the same swarm (same token, other keys): handshake and messages."""
    a, b = member(token, seed=True), member(token)
    pair = Pair(a, b)
    frames: list[bytes] = []
    while pair.wire:
        to, frame = pair.wire.popleft()
        frames.append(frame)
        pair.deliver(to, frame)
    return frames


FOREIGN = {t: _foreign_frames(t) for t in (None, "t")}


@pytest.mark.parametrize("token", [None, "t"])
@settings(max_examples=150, deadline=None)
@given(schedule=schedules())
def test_no_interleaving_gets_a_forged_or_replayed_frame_accepted(
    token: str | None, schedule: list[tuple[str, int, int, int]]
) -> None:
    seed, leecher = member(token, seed=True), member(token)
    pair = Pair(seed, leecher)
    sides = (seed, leecher)
    sent: list[list[bytes]] = [[], []]  # every frame ever sent towards each side (the attacker sees all)
    honest: list[set[tuple[int, bytes]]] = [set(), set()]  # (seq, payload) sent honestly on this link
    last = [0, 0]
    cursor = [0, 0]  # the next frame of each direction in the honest order

    def record() -> None:
        while pair.wire:
            to, frame = pair.wire.popleft()
            d = sides.index(to)
            sent[d].append(frame)
            seq, payload = msgpack.unpackb(frame, raw=False)[2:4]
            honest[d].add((seq, payload))

    record()
    for kind, d, which, flip in schedule:
        to = sides[d]
        if kind == "talk":
            sender = sides[1 - d]
            peer = sender.peers.get(to.id)
            if peer is not None:
                pair.take(sender, sender.send(peer, P.Have(which % 4), 0.0))
                record()
            continue
        if kind == "next":
            if cursor[d] >= len(sent[d]):
                d = 1 - d  # the honest conversation goes on in the other direction
                to = sides[d]
            if cursor[d] >= len(sent[d]):
                continue
            frame = sent[d][cursor[d]]
            cursor[d] += 1
        else:
            pool = FOREIGN[token] if kind == "foreign" else sent[d]
            if not pool:
                continue
            frame = pool[which % len(pool)]
        if kind == "flip":
            i = flip % len(frame)
            frame = frame[:i] + bytes([frame[i] ^ (1 + (flip >> 8) % 255)]) + frame[i + 1 :]
        try:
            actions = pair.deliver(to, frame)
        except SwarmError:
            continue
        record()
        if not actions or any(isinstance(a, S.Rejected) for a in actions):
            continue
        seq, payload = msgpack.unpackb(frame, raw=False)[2:4]
        if seq == 0:
            continue  # a handshake frame (or an unsigned Error, which can only end our own dial)
        event("a message was accepted")  # the schedules do reach the post-handshake traffic
        assert seq > last[d], "a replayed or reordered frame was accepted"
        last[d] = seq
        if token is not None:
            assert (seq, payload) in honest[d], "a forged frame was accepted"
    if seed.peers.get(leecher.id) is not None and seed.peers[leecher.id].accepted:
        event("the seed accepted the leecher")
    # Whatever happened, nobody but the two honest members became a peer of either.
    assert set(seed.peers) <= {leecher.id} and set(leecher.peers) <= {seed.id}


def test_an_open_swarm_leecher_hears_when_its_content_loses_the_majority() -> None:
    honest, leecher = member(seed=True), member()
    pair = Pair(honest, leecher)
    pair.run()
    pair.take(leecher, leecher.decide(1.0))
    pair.run()
    assert leecher.checksums == CHECKSUMS and not pair.of(leecher, S.Disagreement)
    liar = member(seed=True, checksums=["f" * 32] * 4)
    p2 = Pair(liar, leecher)
    p2.run()
    (lost,) = p2.of(leecher, S.Disagreement)  # one against one: its content has no strict majority
    assert "disagree on its bytes" in str(lost.error)  # type: ignore[attr-defined]
    assert leecher.peers[liar.id].state is S.PeerState.REFUSED


def test_becoming_a_seed_checks_every_peer_again() -> None:
    seed, leecher, other = (
        member("t", seed=True),
        member("t"),
        member("t", seed=True, checksums=["e" * 32] * 4),
    )
    Pair(seed, leecher).run()
    Pair(other, leecher, ident=b"other").run()  # its content differs: the leecher took the seed's first
    assert leecher.peers[seed.id].accepted
    assert leecher.peers[other.id].state is S.PeerState.REFUSED
    actions = leecher.become_seed(CHECKSUMS, 0.0)
    assert [a.peer.id for a in actions if isinstance(a, S.Accepted)] == [seed.id]
    assert leecher.role == "seed" and leecher.hello().role == "seed"
    assert leecher.peers[other.id].state is S.PeerState.REFUSED  # a refusal stands
