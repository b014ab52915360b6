"""The control messages of vllm-swarm: msgpack-encoded, versioned, bounded, validated, optionally signed.

Wire form of one message (one ZeroMQ frame):

    msgpack [b"VSW", VERSION, payload: bin, mac: bin | nil]
    payload = msgpack [type: str, fields: map]

Rules:

- Every decode is bounded before any work is done: the frame size (`MAX_FRAME`), and inside msgpack the
  lengths of strings, binaries, arrays and maps. Then every field is validated against its message's
  schema (type, range, length; piece indices against the manifest when the caller passes the piece
  count). Anything malformed raises `ProtocolError`; nothing else escapes `decode`.
- A peer of another version gets `VersionMismatchError` (a `ProtocolError`) naming both versions; the
  version is checked before the payload is looked at, so later versions may change the payload freely.
- With a cluster token (option, or the SWARM_TOKEN environment variable), every message carries
  HMAC-SHA256(key, payload) with key = SHA-256(token); a message without a valid MAC raises `AuthError`.
  Without a token the swarm is open on its LAN (the node logs so). A node without a token also refuses
  signed messages, so a misconfigured fleet fails loudly instead of half-working.
- Limits: the MAC authenticates the sender as a token holder; it does not stop a token holder from
  replaying an old message (harmless here: every message is idempotent or answered per request), and it
  does not encrypt.

Messages are frozen dataclasses; `SCHEMAS` maps each message type to its fields' validators. Adding a
message is adding a class and its schema; transitions of the node live in swarm/node.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

from swarm.errors import AuthError, ProtocolError, VersionMismatchError

VERSION = 1
MAGIC = b"VSW"
MAX_FRAME = 16 * 1024 * 1024
MAX_STR = 4096
MAX_LIST = 1 << 20
MAX_MAP = 256
#: Pieces one list of a `Batch` may name (distinct indices; a sender splits a longer turn's worth).
MAX_BATCH = 4096
MAC_SIZE = 32
ROLES = ("seed", "leecher")


# --- validators: each checks one decoded value and returns it, or raises ProtocolError -----------

Check = Callable[[Any, "int | None"], Any]


def _fail(what: str, value: Any) -> ProtocolError:
    return ProtocolError(f"bad {what}: {value!r:.80}")


def Int(lo: int = 0, hi: int = (1 << 63) - 1) -> Check:
    def check(v: Any, _: int | None) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _fail(f"integer in [{lo}, {hi}]", v)
        return v

    return check


def Float(lo: float = 0.0, hi: float = 1e18) -> Check:
    def check(v: Any, _: int | None) -> float:
        if type(v) not in (int, float) or not lo <= v <= hi:  # NaN fails the range test too
            raise _fail(f"number in [{lo}, {hi}]", v)
        return float(v)

    return check


def Str(max_len: int = 256, choices: tuple[str, ...] | None = None) -> Check:
    def check(v: Any, _: int | None) -> str:
        if type(v) is not str or len(v) > max_len or (choices is not None and v not in choices):
            raise _fail(f"string{' in ' + str(choices) if choices else ''} of <= {max_len} chars", v)
        return v

    return check


def Bin(max_len: int = MAX_FRAME) -> Check:
    def check(v: Any, _: int | None) -> bytes:
        if type(v) is not bytes or len(v) > max_len:
            raise _fail(f"binary of <= {max_len} bytes", v)
        return v

    return check


def Bool() -> Check:
    def check(v: Any, _: int | None) -> bool:
        if type(v) is not bool:
            raise _fail("boolean", v)
        return v

    return check


def PieceIndex() -> Check:
    """A piece index: a non-negative int, and below the piece count when the caller knows it."""

    def check(v: Any, pieces: int | None) -> int:
        if type(v) is not int or v < 0 or v >= (pieces if pieces is not None else MAX_LIST):
            raise _fail(f"piece index (of {pieces} pieces)", v)
        return v

    return check


def Pieces(max_len: int = MAX_BATCH) -> Check:
    """Distinct piece indices (below the piece count when the caller knows it), at most `max_len`.

    Distinct, so that a list costs its receiver at most one step per piece of the manifest: a hostile
    peer cannot make one frame name the same piece a million times."""

    def check(v: Any, pieces: int | None) -> list[int]:
        if type(v) is not list or len(v) > max_len:
            raise _fail(f"list of <= {max_len} piece indices", v)
        hi = pieces if pieces is not None else MAX_LIST
        for x in v:
            if type(x) is not int or not 0 <= x < hi:
                raise _fail(f"piece index (of {pieces} pieces)", x)
        if len(set(v)) != len(v):
            raise _fail("list of distinct piece indices", v)
        return v

    return check


def ListOf(item: Check, max_len: int = MAX_LIST) -> Check:
    def check(v: Any, pieces: int | None) -> list[Any]:
        if type(v) is not list or len(v) > max_len:
            raise _fail(f"list of <= {max_len} items", v)
        return [item(x, pieces) for x in v]

    return check


def Plain(max_depth: int = 4) -> Check:
    """A map/list/scalar tree (status reports, manifests, channel parameters), bounded in depth."""

    def walk(v: Any, depth: int) -> Any:
        if v is None or type(v) in (bool, int, float, str, bytes):
            return v
        if depth <= 0:
            raise _fail(f"value nested deeper than {max_depth}", v)
        if type(v) is list:
            return [walk(x, depth - 1) for x in v]
        if type(v) is dict:
            if len(v) > MAX_MAP:
                raise _fail(f"map of <= {MAX_MAP} keys", v)
            out = {}
            for k, x in v.items():
                if type(k) is not str:
                    raise _fail("map key (must be a string)", k)
                out[k] = walk(x, depth - 1)
            return out
        raise _fail("plain value", v)

    def check(v: Any, _: int | None) -> Any:
        if type(v) is not dict:
            raise _fail("map", v)
        return walk(v, max_depth)

    return check


def ManifestWire(max_pieces: int = MAX_LIST) -> Check:
    """A manifest in wire form (`Manifest.to_wire`) whose piece count is bounded before anyone cuts it.

    Cutting a manifest into pieces is linear in the piece count, so without this bound a few bytes that
    claim a 2^48-byte tensor in 1-byte pieces would hang the receiving node's control loop (and exhaust
    its memory). Each tensor of n bytes yields at most ceil(n / piece_size) spans and every piece holds
    at least one span, so the sum of those ceilings bounds the piece count. Other fields are checked by
    `Manifest.from_wire`.
    """
    plain = Plain(4)

    def check(v: Any, pieces: int | None) -> Any:
        v = plain(v, pieces)
        piece_size, rows = v.get("piece_size"), v.get("tensors")
        if type(piece_size) is int and piece_size > 0 and type(rows) is list:
            bound = 0
            for row in rows:
                if type(row) is list and len(row) == 4 and type(row[3]) is int and row[3] > 0:
                    bound += -(-row[3] // piece_size)
            if bound > max_pieces:
                raise _fail(f"manifest of <= {max_pieces} pieces", f"{bound} or fewer pieces")
        return v

    return check


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[Mapping[str, Check]] = {}


@dataclass(frozen=True)
class Hello(Message):
    """First message both ways: who I am, which swarm, what I hold, where my data plane listens."""

    TYPE: ClassVar[str] = "hello"
    SCHEMA: ClassVar[Mapping[str, Check]] = {
        "peer_id": Str(64),
        "key": Plain(2),
        "key_digest": Str(64),
        "manifest_digest": Str(64),
        "content_digest": Str(64),
        "role": Str(16, ROLES),
        "transport": Str(32),
        "data": Plain(3),
    }
    peer_id: str
    key: dict[str, Any]
    key_digest: str
    manifest_digest: str
    content_digest: str
    role: str
    transport: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ManifestQuery(Message):
    TYPE: ClassVar[str] = "manifest?"
    SCHEMA: ClassVar[Mapping[str, Check]] = {}


@dataclass(frozen=True)
class ManifestReply(Message):
    """The seed's manifest (Manifest.to_wire()) and the checksum of each piece."""

    TYPE: ClassVar[str] = "manifest"
    SCHEMA: ClassVar[Mapping[str, Check]] = {
        "manifest": ManifestWire(),
        "checksums": ListOf(Str(32)),
    }
    manifest: dict[str, Any]
    checksums: list[str]


@dataclass(frozen=True)
class Bitfield(Message):
    TYPE: ClassVar[str] = "bitfield"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"count": Int(0, MAX_LIST), "bits": Bin(MAX_LIST // 8)}
    count: int
    bits: bytes

    @classmethod
    def of(cls, have: set[int] | frozenset[int], count: int) -> Bitfield:
        bits = bytearray((count + 7) // 8)
        for p in have:
            bits[p >> 3] |= 0x80 >> (p & 7)
        return cls(count, bytes(bits))

    def pieces(self) -> list[int]:
        return [p for p in range(self.count) if self.bits[p >> 3] & (0x80 >> (p & 7))]


@dataclass(frozen=True)
class Have(Message):
    TYPE: ClassVar[str] = "have"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"piece": PieceIndex()}
    piece: int


@dataclass(frozen=True)
class HandedOut(Message):
    """A full seed has started to send `piece` to some peer: ask it for other pieces first."""

    TYPE: ClassVar[str] = "handed_out"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"piece": PieceIndex()}
    piece: int


@dataclass(frozen=True)
class Request(Message):
    TYPE: ClassVar[str] = "request"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"piece": PieceIndex()}
    piece: int


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"piece": PieceIndex()}
    piece: int


@dataclass(frozen=True)
class Batch(Message):
    """Every piece event of one loop turn for one peer, in one frame (the control plane's hot path).

    The node sends at most one per peer per loop turn instead of one message per piece and event:
    `have` is the delta of its bitfield since the last one (pieces it verified this turn), `handed` the
    pieces it started to hand out as a full seed (scheduler rule 12), `cancel` and `request` its
    download decisions for that peer, `sent` the pieces it finished sending to that peer over the
    data plane (completion signals, for transports that need one), and its answers to that peer's
    requests that will not be served: `busy` (ask again later or elsewhere) and `refused` (not held).
    The receiver applies them in that order (a cancel and a later request of the same piece in one
    turn mean: withdraw, then ask again). Each list holds distinct indices, at most `MAX_BATCH`; a
    longer turn is split over several frames. So a frame of requests is answered by at most one frame
    of refusals, not one message a piece.
    """

    TYPE: ClassVar[str] = "batch"
    SCHEMA: ClassVar[Mapping[str, Check]] = {
        "have": Pieces(),
        "handed": Pieces(),
        "cancel": Pieces(),
        "request": Pieces(),
        "sent": Pieces(),
        "busy": Pieces(),
        "refused": Pieces(),
    }
    have: list[int]
    handed: list[int]
    cancel: list[int]
    request: list[int]
    sent: list[int]
    busy: list[int]
    refused: list[int]

    def __len__(self) -> int:
        return sum(len(getattr(self, name)) for name in self.SCHEMA)


@dataclass(frozen=True)
class Reject(Message):
    """A request that will not be served: `busy` (ask again later or elsewhere) or not held."""

    TYPE: ClassVar[str] = "reject"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"piece": PieceIndex(), "busy": Bool(), "reason": Str(200)}
    piece: int
    busy: bool
    reason: str


@dataclass(frozen=True)
class Sent(Message):
    """The seed finished sending a piece over the data plane (transports that need the signal)."""

    TYPE: ClassVar[str] = "sent"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"piece": PieceIndex(), "ok": Bool()}
    piece: int
    ok: bool


@dataclass(frozen=True)
class Channel(Message):
    """Data-plane set-up parameters for a transport (a TCP address, an NCCL unique id, ...)."""

    TYPE: ClassVar[str] = "channel"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"transport": Str(32), "params": Plain(3)}
    transport: str
    params: dict[str, Any]


@dataclass(frozen=True)
class StatusQuery(Message):
    TYPE: ClassVar[str] = "status?"
    SCHEMA: ClassVar[Mapping[str, Check]] = {}


@dataclass(frozen=True)
class StatusReply(Message):
    TYPE: ClassVar[str] = "status"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"status": Plain(4)}
    status: dict[str, Any]


@dataclass(frozen=True)
class Ping(Message):
    """Liveness: sent on an idle link; any message from a peer proves it alive."""

    TYPE: ClassVar[str] = "ping"
    SCHEMA: ClassVar[Mapping[str, Check]] = {}


@dataclass(frozen=True)
class Goodbye(Message):
    TYPE: ClassVar[str] = "goodbye"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"reason": Str(200)}
    reason: str


@dataclass(frozen=True)
class Error(Message):
    """Sent instead of an answer to a message that could not be accepted; `code` is machine-readable."""

    TYPE: ClassVar[str] = "error"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"code": Str(32), "message": Str(MAX_STR)}
    code: str
    message: str


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        ManifestQuery,
        ManifestReply,
        Bitfield,
        Have,
        HandedOut,
        Request,
        Cancel,
        Batch,
        Reject,
        Sent,
        Channel,
        StatusQuery,
        StatusReply,
        Ping,
        Goodbye,
        Error,
    )
}


# --- codec --------------------------------------------------------------------------------------


def token_from_env() -> str | None:
    return os.environ.get("SWARM_TOKEN") or None


class Codec:
    """Encodes and decodes messages; signs and verifies them when a cluster token is set."""

    def __init__(self, token: str | None = None) -> None:
        self._key = hashlib.sha256(token.encode()).digest() if token else None

    @property
    def authenticated(self) -> bool:
        return self._key is not None

    def encode(self, msg: Message) -> bytes:
        body = {f.name: getattr(msg, f.name) for f in fields(msg)}
        payload = msgpack.packb([msg.TYPE, body], use_bin_type=True)
        mac = hmac.new(self._key, payload, hashlib.sha256).digest() if self._key else None
        frame: bytes = msgpack.packb([MAGIC, VERSION, payload, mac], use_bin_type=True)
        if len(frame) > MAX_FRAME:
            raise ProtocolError(f"{msg.TYPE} message of {len(frame)} bytes exceeds {MAX_FRAME}")
        return frame

    def decode(self, frame: bytes, pieces: int | None = None) -> Message:
        """Decode one frame. `pieces` (the manifest's piece count) bounds piece indices when known."""
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"frame must be bytes, not {type(frame).__name__}")
        if len(frame) > MAX_FRAME:
            raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte limit")
        envelope = _unpack(frame)
        if type(envelope) is not list or len(envelope) != 4 or envelope[0] != MAGIC:
            raise ProtocolError("not a vllm-swarm message (bad envelope)")
        _, version, payload, mac = envelope
        if version != VERSION:
            raise VersionMismatchError(version, VERSION)
        if type(payload) is not bytes:
            raise ProtocolError("payload must be binary")
        self._verify(payload, mac)
        body = _unpack(payload)
        if type(body) is not list or len(body) != 2 or type(body[0]) is not str or type(body[1]) is not dict:
            raise ProtocolError("payload must be [type, fields]")
        kind, values = body
        cls = MESSAGES.get(kind)
        if cls is None:
            raise ProtocolError(f"unknown message type {kind!r:.40}")
        if set(values) != set(cls.SCHEMA):
            raise ProtocolError(f"{kind}: fields {sorted(map(str, values))!r:.200} != {sorted(cls.SCHEMA)}")
        checked = {name: check(values[name], pieces) for name, check in cls.SCHEMA.items()}
        if cls is Bitfield and (
            len(checked["bits"]) != (checked["count"] + 7) // 8
            or (pieces is not None and checked["count"] != pieces)
        ):
            raise ProtocolError(f"bitfield of {checked['count']} pieces does not fit {pieces} pieces")
        return cls(**checked)

    def _verify(self, payload: bytes, mac: Any) -> None:
        if self._key is None:
            if mac is not None:
                raise AuthError(
                    "peer signs its messages but this node has no cluster token",
                    hint="set the same SWARM_TOKEN on every instance",
                )
            return
        if type(mac) is not bytes or len(mac) != MAC_SIZE:
            raise AuthError(
                "unsigned message while a cluster token is set", hint="check SWARM_TOKEN on the peer"
            )
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise AuthError("bad message signature", hint="the peer uses another SWARM_TOKEN")


def _unpack(data: bytes | bytearray | memoryview) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_FRAME,
            max_bin_len=MAX_FRAME,
            max_array_len=MAX_LIST,
            max_map_len=MAX_LIST,
            max_ext_len=0,
        )
    # ExtraData, FormatError, StackError, UnicodeDecodeError and the length limits are all ValueErrors.
    except (ValueError, msgpack.UnpackException) as e:
        raise ProtocolError(f"undecodable frame: {type(e).__name__}: {e}"[:200]) from e
