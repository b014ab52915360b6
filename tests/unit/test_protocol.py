"""Protocol: round trips, bounded and validated decoding, versions, sessions (handshake, HMAC, replay)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import AuthError, ConfigError, ProtocolError, VersionMismatchError
from swarm.identity import Identity, peer_id_of
from swarm.manifest import Manifest, SwarmKey, TensorSpec
from swarm.protocol import (
    MAGIC,
    MAX_BATCH,
    MAX_FRAME,
    MESSAGES,
    VERSION,
    Batch,
    Bitfield,
    Cancel,
    Channel,
    Codec,
    Error,
    Goodbye,
    HandedOut,
    Have,
    Hello,
    ManifestQuery,
    ManifestReply,
    Ping,
    Reject,
    Request,
    Sent,
    Session,
    StatusQuery,
    StatusReply,
    connected_pair,
)

KEY = SwarmKey("tiny@1", "bfloat16", engine="vllm-0.32.0")
MANIFEST = Manifest([TensorSpec("w", "bfloat16", (4, 8), 64)], 16)

EXAMPLES = [
    Hello(
        "abc123",
        KEY.to_wire(),
        KEY.digest,
        MANIFEST.digest,
        "",
        "leecher",
        "tcp",
        {"host": "10.0.0.1", "port": 5},
    ),
    ManifestQuery(),
    ManifestReply(MANIFEST.to_wire(), ["0" * 32] * 4),
    Bitfield.of({0, 3}, 4),
    Have(2),
    HandedOut(3),
    Request(3),
    Cancel(0),
    Batch([0, 3], [1], [2], [3, 1], [0], [2], [1]),
    Reject(1, True, "busy"),
    Sent(1, True),
    Channel("nccl", {"uid": b"\x00" * 128, "rank": 0}),
    StatusQuery(),
    StatusReply({"role": "seed", "progress": 1.0, "peers": [{"id": "x", "bytes": 5}]}),
    Ping(),
    Goodbye("done"),
    Error("busy", "try later"),
]


def test_examples_cover_every_message_type() -> None:
    assert {m.TYPE for m in EXAMPLES} == set(MESSAGES)


def _through(sender: Session, receiver: Session, msg: object, pieces: int | None = None) -> object:
    got, answer = receiver.receive(sender.encode(msg), pieces)  # type: ignore[arg-type]
    assert answer is None
    return got


@pytest.mark.parametrize("token", [None, "secret"])
@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip_both_ways(msg: object, token: str | None) -> None:
    dialer, listener = connected_pair(token)
    assert _through(dialer, listener, msg, pieces=4) == msg
    assert _through(listener, dialer, msg, pieces=4) == msg


def test_piece_indices_are_checked_against_the_manifest() -> None:
    dialer, listener = connected_pair()
    _through(dialer, listener, Request(3), pieces=4)
    with pytest.raises(ProtocolError, match="piece index"):
        _through(dialer, listener, Request(4), pieces=4)
    with pytest.raises(ProtocolError, match="bitfield"):
        _through(dialer, listener, Bitfield.of({1}, 8), pieces=4)
    # A manifest reply may hold another count of checksums: the peer's manifest may differ (another
    # piece size), and the node reads the reply to name the difference before it counts anything.
    reply = ManifestReply(MANIFEST.to_wire(), ["0" * 32] * 3)
    assert _through(dialer, listener, reply, pieces=4) == reply


def test_bitfield_pieces() -> None:
    assert Bitfield.of({0, 7, 8, 12}, 13).pieces() == [0, 7, 8, 12]


def _frame(
    payload: bytes, version: object = VERSION, mac: object = None, magic: bytes = MAGIC, seq: object = 1
) -> bytes:
    return msgpack.packb([magic, version, seq, payload, mac], use_bin_type=True)


def _payload(kind: object, fields: object) -> bytes:
    return msgpack.packb([kind, fields], use_bin_type=True)


def test_other_version_gets_a_clear_error() -> None:
    with pytest.raises(VersionMismatchError, match=f"version 1, this node speaks {VERSION}"):
        connected_pair()[1].receive(_frame(_payload("have", {"piece": 1}), version=1))


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        _frame(_payload("have", {"piece": 1}), magic=b"XXX"),
        _frame(_payload("nope", {})),
        _frame(_payload("have", {"piece": -1})),
        _frame(_payload("have", {"piece": True})),
        _frame(_payload("have", {"piece": 1.0})),
        _frame(_payload("have", {"piece": 1, "extra": 2})),
        _frame(_payload("have", {})),
        _frame(_payload("reject", {"piece": 1, "busy": 1, "reason": "x"})),
        _frame(_payload("goodbye", {"reason": "x" * 201})),
        _frame(_payload("status", {"status": {1: 2}})),
        _frame(_payload("status", {"status": {"a": {"b": {"c": {"d": {"e": 1}}}}}})),
        _frame(b"\x93\x01"),
        _frame("text-not-bin"),  # type: ignore[arg-type]
        _frame(_payload("have", {"piece": 1}), seq=-1),
        _frame(_payload("have", {"piece": 1}), seq="1"),
        _frame(_payload("open", {"nonce": b"0" * 16, "public": b"0" * 32}), seq=0),
        msgpack.packb([MAGIC, VERSION]),
    ],
)
def test_malformed_input_raises_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        connected_pair()[1].receive(frame, pieces=4)


def test_oversized_frame_is_refused_before_decoding() -> None:
    dialer, listener = connected_pair()
    with pytest.raises(ProtocolError, match="exceeds"):
        listener.receive(b"\x00" * (MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        dialer.encode(StatusReply({"blob": b"\x00" * MAX_FRAME}))


def test_hmac_required_and_checked_when_a_token_is_set() -> None:
    dialer, listener = connected_pair("secret")
    other, _ = connected_pair("other")
    open_, _ = connected_pair()
    assert _through(dialer, listener, Have(1)) == Have(1)
    with pytest.raises(AuthError, match="signature"):
        listener.receive(other.encode(Have(1)))
    with pytest.raises(AuthError, match="unsigned"):
        listener.receive(open_.encode(Have(1)))
    with pytest.raises(AuthError, match="no cluster token"):
        connected_pair()[1].receive(dialer.encode(Have(1)))
    # A valid MAC over a different payload: tampering is caught.
    env = msgpack.unpackb(dialer.encode(Have(1)))
    with pytest.raises(AuthError):
        listener.receive(_frame(_payload("have", {"piece": 2}), mac=env[4], seq=env[2]))


@pytest.mark.parametrize("token", [None, "secret"])
def test_a_frame_is_worth_nothing_sent_again(token: str | None) -> None:
    """On its own link its sequence number is spent; on another link (same token) its keys are wrong
    (without a token, its sequence number is spent there too once that link has carried as many)."""
    dialer, listener = connected_pair(token)
    frame = dialer.encode(StatusQuery())
    listener.receive(frame)
    with pytest.raises(AuthError, match="replayed"):
        listener.receive(frame)
    later, earlier = dialer.encode(Ping()), dialer.encode(Ping())
    listener.receive(earlier)
    with pytest.raises(AuthError, match="replayed"):
        listener.receive(later)
    if token:
        with pytest.raises(AuthError, match="signature"):
            connected_pair(token)[1].receive(dialer.encode(Ping()))


def test_handshake_proves_both_ids_and_needs_the_same_token() -> None:
    dialer, listener = connected_pair("t")
    assert dialer.peer_id == peer_id_of(listener.identity.public) == listener.identity.id
    assert listener.peer_id == dialer.identity.id
    # Another token: the listener refuses the opening; a recorded acceptance does not fit a new opening.
    stranger = Session(Codec("u"), Identity(), dialer=True)
    fresh = Session(Codec("t"), Identity(), dialer=False)
    with pytest.raises(AuthError, match="signature"):
        fresh.receive(stranger.open())
    d1 = Session(Codec("t"), Identity(), dialer=True)
    _, accept = Session(Codec("t"), Identity(), dialer=False).receive(d1.open())
    d2 = Session(Codec("t"), Identity(), dialer=True)
    d2.open()
    assert accept is not None
    with pytest.raises(AuthError):
        d2.receive(accept)
    # Messages before the session is up are refused (a dialer takes an unsigned Error only, to log it).
    with pytest.raises(ProtocolError, match="no session"):
        Session(Codec(), Identity(), dialer=False).receive(connected_pair()[0].encode(StatusQuery()))
    got, _ = Session(Codec(), Identity(), dialer=True).receive(fresh.encode(Error("protocol", "x")))
    assert got == Error("protocol", "x")


def test_open_without_a_token_still_proves_ids() -> None:
    """A confirm signed by another key than the opening's is refused, token or not."""
    d = Session(Codec(), Identity(), dialer=True)
    listener = Session(Codec(), Identity(), dialer=False)
    _, accept = listener.receive(d.open())
    assert accept is not None
    impostor = Session(Codec(), Identity(), dialer=True)
    impostor._nonce, impostor.identity = d._nonce, Identity()
    env = msgpack.unpackb(accept)
    forged = msgpack.unpackb(env[3])
    forged[1]["public"] = d.identity.public  # pretend the acceptance was for the impostor
    with pytest.raises(AuthError):
        impostor.receive(msgpack.packb([env[0], env[1], 0, msgpack.packb(forged), None]))


def test_token_from_environment_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    from swarm.protocol import token_from_env

    monkeypatch.delenv("SWARM_TOKEN_FILE", raising=False)
    monkeypatch.setenv("SWARM_TOKEN", "t")
    assert token_from_env() == "t"
    monkeypatch.setenv("SWARM_TOKEN", "")
    assert token_from_env() is None
    path = Path(str(tmp_path)) / "token"
    path.write_text("  s3cret\n")
    monkeypatch.setenv("SWARM_TOKEN_FILE", str(path))
    assert token_from_env() == "s3cret"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        token_from_env()
    monkeypatch.setenv("SWARM_TOKEN_FILE", str(path) + ".missing")
    with pytest.raises(ConfigError, match="cannot read"):
        token_from_env()


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=512))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for token in (None, "k"):
        for session in (
            *connected_pair(token),
            Session(Codec(token), Identity(), dialer=False),
            Session(Codec(token), Identity(), dialer=True),
        ):
            try:
                msg, _ = session.receive(data, pieces=16)
            except ProtocolError:
                continue
            assert msg is None or type(msg) in MESSAGES.values()


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.binary(max_size=20)
)
trees = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1000, deadline=None)
@given(
    kind=st.sampled_from(sorted(MESSAGES)), fields=st.dictionaries(st.text(max_size=16), trees, max_size=6)
)
def test_structured_garbage_decodes_or_raises_protocol_error(kind: str, fields: dict[str, object]) -> None:
    try:
        msg, _ = connected_pair()[1].receive(_frame(_payload(kind, fields)), pieces=8)
    except ProtocolError:
        return
    assert _through(*connected_pair(), msg, pieces=8) == msg


@settings(max_examples=300, deadline=None)
@given(
    piece=st.integers(0, 99),
    have=st.sets(st.integers(0, 99)),
    reason=st.text(max_size=200),
    status=st.dictionaries(st.text(max_size=10), scalars, max_size=10),
)
def test_generated_messages_round_trip(
    piece: int, have: set[int], reason: str, status: dict[str, object]
) -> None:
    dialer, listener = connected_pair("tok")
    for msg in (
        Have(piece),
        Request(piece),
        Reject(piece, False, reason),
        Bitfield.of(have, 100),
        StatusReply(status),
    ):
        assert _through(dialer, listener, msg, pieces=100) == msg


# --- Batch: many piece events in one frame ------------------------------------------------------------


def test_batch_keeps_the_order_of_each_list() -> None:
    dialer, listener = connected_pair("tok")
    msg = Batch(have=[5, 1, 3], handed=[], cancel=[0], request=[9, 2, 7], sent=[4], busy=[8], refused=[])
    assert _through(dialer, listener, msg, pieces=10) == msg
    assert len(msg) == 9


def _batch(**lists: object) -> bytes:
    fields = {name: [] for name in Batch.SCHEMA} | lists
    return _frame(_payload("batch", fields))


@pytest.mark.parametrize(
    "lists",
    [
        {"request": [4]},  # past the manifest (4 pieces)
        {"have": [-1]},
        {"cancel": [True]},
        {"sent": [1.0]},
        {"handed": ["1"]},
        {"busy": [0, 0]},
        {"refused": [9]},
        {"request": [1, 2, 1]},  # the same piece twice: refused, so a frame costs <= one step a piece
        {"have": 3},
        {"request": None},
        {"request": list(range(MAX_BATCH + 1))},
        {"have": [0], "extra": []},
    ],
    ids=repr,
)
def test_hostile_batches_raise_protocol_error(lists: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        connected_pair()[1].receive(_batch(**lists), pieces=4)


def test_batch_bounds_hold_without_a_manifest() -> None:
    with pytest.raises(ProtocolError, match="list of <= 4096"):
        connected_pair()[1].receive(_batch(have=list(range(MAX_BATCH + 1))), pieces=None)


def test_batch_missing_a_list_is_refused() -> None:
    with pytest.raises(ProtocolError, match="fields"):
        connected_pair()[1].receive(_frame(_payload("batch", {"have": [1]})), pieces=4)


def test_a_full_batch_fits_a_frame() -> None:
    top = list(range((1 << 20) - 1, (1 << 20) - 1 - MAX_BATCH, -1))  # the largest indices allowed
    msg = Batch(top, top, top, top, top, top, top)
    dialer, listener = connected_pair("tok")
    assert _through(dialer, listener, msg) == msg


@settings(max_examples=200, deadline=None)
@given(
    lists=st.lists(st.lists(st.integers(0, 99), unique=True, max_size=40), min_size=7, max_size=7),
)
def test_generated_batches_round_trip(lists: list[list[int]]) -> None:
    dialer, listener = connected_pair("tok")
    msg = Batch(*lists)
    assert _through(dialer, listener, msg, pieces=100) == msg
