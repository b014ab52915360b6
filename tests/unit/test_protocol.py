"""Protocol: round trips, bounded and validated decoding, versions, HMAC."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import AuthError, ProtocolError, VersionMismatchError
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
    StatusQuery,
    StatusReply,
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


@pytest.mark.parametrize("token", [None, "secret"])
@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: object, token: str | None) -> None:
    codec = Codec(token)
    assert codec.decode(codec.encode(msg), pieces=4) == msg  # type: ignore[arg-type]


def test_piece_indices_are_checked_against_the_manifest() -> None:
    codec = Codec()
    codec.decode(codec.encode(Request(3)), pieces=4)
    with pytest.raises(ProtocolError, match="piece index"):
        codec.decode(codec.encode(Request(4)), pieces=4)
    with pytest.raises(ProtocolError, match="bitfield"):
        codec.decode(codec.encode(Bitfield.of({1}, 8)), pieces=4)


def test_bitfield_pieces() -> None:
    assert Bitfield.of({0, 7, 8, 12}, 13).pieces() == [0, 7, 8, 12]


def _frame(payload: bytes, version: object = VERSION, mac: object = None, magic: bytes = MAGIC) -> bytes:
    return msgpack.packb([magic, version, payload, mac], use_bin_type=True)


def _payload(kind: object, fields: object) -> bytes:
    return msgpack.packb([kind, fields], use_bin_type=True)


def test_other_version_gets_a_clear_error() -> None:
    with pytest.raises(VersionMismatchError, match="version 2, this node speaks 1"):
        Codec().decode(_frame(_payload("have", {"piece": 1}), version=2))


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
        msgpack.packb([MAGIC, VERSION]),
    ],
)
def test_malformed_input_raises_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        Codec().decode(frame, pieces=4)


def test_oversized_frame_is_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        Codec().decode(b"\x00" * (MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        Codec().encode(StatusReply({"blob": b"\x00" * MAX_FRAME}))


def test_hmac_required_and_checked_when_a_token_is_set() -> None:
    signed, other, open_ = Codec("secret"), Codec("other"), Codec()
    frame = signed.encode(Have(1))
    assert signed.decode(frame) == Have(1)
    with pytest.raises(AuthError, match="signature"):
        other.decode(frame)
    with pytest.raises(AuthError, match="unsigned"):
        signed.decode(open_.encode(Have(1)))
    with pytest.raises(AuthError, match="no cluster token"):
        open_.decode(frame)
    # A valid MAC over a different payload: tampering is caught.
    env = msgpack.unpackb(frame)
    tampered = _frame(_payload("have", {"piece": 2}), mac=env[3])
    with pytest.raises(AuthError):
        signed.decode(tampered)


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from swarm.protocol import token_from_env

    monkeypatch.setenv("SWARM_TOKEN", "t")
    assert token_from_env() == "t"
    monkeypatch.setenv("SWARM_TOKEN", "")
    assert token_from_env() is None


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=512))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for codec in (Codec(), Codec("k")):
        try:
            msg = codec.decode(data, pieces=16)
        except ProtocolError:
            continue
        assert type(msg) in MESSAGES.values()


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
    codec = Codec()
    try:
        msg = codec.decode(_frame(_payload(kind, fields)), pieces=8)
    except ProtocolError:
        return
    assert codec.decode(codec.encode(msg), pieces=8) == msg


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
    codec = Codec("tok")
    for msg in (
        Have(piece),
        Request(piece),
        Reject(piece, False, reason),
        Bitfield.of(have, 100),
        StatusReply(status),
    ):
        assert codec.decode(codec.encode(msg), pieces=100) == msg


# --- Batch: many piece events in one frame ------------------------------------------------------------


def test_batch_keeps_the_order_of_each_list() -> None:
    codec = Codec("tok")
    msg = Batch(have=[5, 1, 3], handed=[], cancel=[0], request=[9, 2, 7], sent=[4], busy=[8], refused=[])
    assert codec.decode(codec.encode(msg), pieces=10) == msg
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
        Codec().decode(_batch(**lists), pieces=4)


def test_batch_bounds_hold_without_a_manifest() -> None:
    with pytest.raises(ProtocolError, match="list of <= 4096"):
        Codec().decode(_batch(have=list(range(MAX_BATCH + 1))), pieces=None)


def test_batch_missing_a_list_is_refused() -> None:
    with pytest.raises(ProtocolError, match="fields"):
        Codec().decode(_frame(_payload("batch", {"have": [1]})), pieces=4)


def test_a_full_batch_fits_a_frame() -> None:
    top = list(range(1 << 20 - 1, (1 << 20) - 1 - MAX_BATCH, -1))  # the largest indices msgpack holds
    msg = Batch(top, top, top, top, top, top, top)
    assert Codec("tok").decode(Codec("tok").encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(
    lists=st.lists(st.lists(st.integers(0, 99), unique=True, max_size=40), min_size=7, max_size=7),
)
def test_generated_batches_round_trip(lists: list[list[int]]) -> None:
    codec = Codec("tok")
    msg = Batch(*lists)
    assert codec.decode(codec.encode(msg), pieces=100) == msg
