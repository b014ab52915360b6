"""The control messages of vllm-swarm: msgpack-encoded, versioned, bounded, validated, bound to a session.

Wire form of one message (one ZeroMQ frame):

    msgpack [b"VSW", VERSION, seq: int, payload: bin, mac: bin | nil]
    payload = msgpack [type: str, fields: map]

Rules:

- Every decode is bounded before any work is done: the frame size (`MAX_FRAME`), and inside msgpack the
  lengths of strings, binaries, arrays and maps. Then every field is validated against its message's
  schema (type, range, length; piece indices, bitfields and checksum lists against the manifest when the
  caller passes the piece count). Anything malformed raises `ProtocolError`; nothing else escapes.
- A peer of another version gets `VersionMismatchError` (a `ProtocolError`) naming both versions; the
  version is checked before anything else, so later versions may change the rest freely.
- Every link runs a `Session`: a handshake that binds fresh nonces of both ends and their Ed25519 public
  keys (so each end knows the other's peer id for certain, swarm/identity.py), then sequence numbers per
  direction and, with a cluster token (SWARM_TOKEN, or the file SWARM_TOKEN_FILE names), an HMAC-SHA256
  under keys derived from the token and the handshake. A frame recorded anywhere is worth nothing sent
  again: on another link the keys differ, on its own link its sequence number is spent. Without a
  token the swarm is open on its LAN (the node logs so); a node without a token refuses signed frames,
  and one with a token refuses unsigned ones, so a misconfigured fleet fails loudly.
- Limits: nothing is encrypted; without a token, an attacker on the path of a TCP connection can change
  what it carries (ids are still proven at the handshake).

Messages are frozen dataclasses; `SCHEMAS` maps each message type to its fields' validators. Adding a
message is adding a class and its schema; what a message does to a peer lives in swarm/session.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

from swarm.errors import AuthError, ConfigError, ProtocolError, VersionMismatchError
from swarm.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, peer_id_of, verify

VERSION = 2
MAGIC = b"VSW"
MAX_FRAME = 16 * 1024 * 1024
MAX_STR = 4096
MAX_LIST = 1 << 20
MAX_MAP = 256
#: Pieces one list of a `Batch` may name (distinct indices; a sender splits a longer turn's worth).
MAX_BATCH = 4096
MAC_SIZE = 32
NONCE_SIZE = 16
_MAX_HANDSHAKE = 1024  # handshake frames are < 200 bytes; pre-session errors up to ~600
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


def Bin(max_len: int = MAX_FRAME, min_len: int = 0) -> Check:
    def check(v: Any, _: int | None) -> bytes:
        if type(v) is not bytes or not min_len <= len(v) <= max_len:
            raise _fail(f"binary of {min_len} to {max_len} bytes", v)
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
    """First message both ways once the session is up: who I am (the session's proven id), which swarm,
    what I hold, where my data plane listens."""

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


# --- session handshake ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionOpen(Message):
    """First frame of a link, dialer to listener: a fresh nonce and the dialer's public key."""

    TYPE: ClassVar[str] = "open"
    SCHEMA: ClassVar[Mapping[str, Check]] = {
        "nonce": Bin(NONCE_SIZE, NONCE_SIZE),
        "public": Bin(PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE),
    }
    nonce: bytes
    public: bytes


@dataclass(frozen=True)
class SessionAccept(Message):
    """Listener to dialer: its nonce and public key, and its signature over the transcript."""

    TYPE: ClassVar[str] = "accept"
    SCHEMA: ClassVar[Mapping[str, Check]] = {
        "nonce": Bin(NONCE_SIZE, NONCE_SIZE),
        "public": Bin(PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE),
        "sig": Bin(SIGNATURE_SIZE, SIGNATURE_SIZE),
    }
    nonce: bytes
    public: bytes
    sig: bytes


@dataclass(frozen=True)
class SessionConfirm(Message):
    """Dialer to listener: the dialer's signature over the transcript. The session is then up."""

    TYPE: ClassVar[str] = "confirm"
    SCHEMA: ClassVar[Mapping[str, Check]] = {"sig": Bin(SIGNATURE_SIZE, SIGNATURE_SIZE)}
    sig: bytes


HANDSHAKE: dict[str, type[Message]] = {c.TYPE: c for c in (SessionOpen, SessionAccept, SessionConfirm)}


# --- codec --------------------------------------------------------------------------------------


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The cluster token: SWARM_TOKEN, or the content of the file SWARM_TOKEN_FILE names (so the secret
    need not appear on a command line or in vLLM's printed arguments); both, different: ConfigError."""
    env = os.environ if env is None else env
    return resolve_token(env.get("SWARM_TOKEN") or None, env.get("SWARM_TOKEN_FILE") or None)


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """The token given, or the one in `token_file`; both, different: ConfigError (two secrets, pick
    neither). Equal is fine: a config copied with dataclasses.replace carries both."""
    from_file = read_token_file(token_file)
    if token and from_file and token != from_file:
        raise ConfigError(
            "both a token and a token file are set", hint="set SWARM_TOKEN or SWARM_TOKEN_FILE, not both"
        )
    return token or from_file


def read_token_file(path: str | None) -> str | None:
    """The token in `path` (surrounding whitespace stripped); None for no path. A missing, unreadable or
    empty file raises ConfigError: a member that meant to use a token must not start open."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(MAX_STR + 1).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the token file {path!r}: {e}", hint="check SWARM_TOKEN_FILE") from e
    if not token or len(token) > MAX_STR:
        raise ConfigError(f"the token file {path!r} is empty or longer than {MAX_STR} characters")
    return token


class Codec:
    """The cluster token's key, and the message layer shared by every session: packing a message into a
    payload, and validating a payload against its schema."""

    def __init__(self, token: str | None = None) -> None:
        self._key = hashlib.sha256(token.encode()).digest() if token else None

    @property
    def authenticated(self) -> bool:
        return self._key is not None

    def mac(self, label: bytes, data: bytes) -> bytes | None:
        return hmac.new(self._key, label + data, hashlib.sha256).digest() if self._key else None

    def derive(self, label: bytes, data: bytes) -> bytes | None:
        return self.mac(b"vsw-key-" + label, data)


def pack(msg: Message) -> bytes:
    """The payload of a message: msgpack [type, {field: value}]."""
    body = {f.name: getattr(msg, f.name) for f in fields(msg)}
    payload: bytes = msgpack.packb([msg.TYPE, body], use_bin_type=True)
    return payload


def decode_payload(
    payload: bytes, pieces: int | None = None, table: Mapping[str, type[Message]] = MESSAGES
) -> Message:
    """Validate a payload against the schema of its type (one of `table`). `pieces` (the manifest's piece
    count) bounds piece indices, bitfields and checksum lists when known."""
    body = _unpack(payload)
    if type(body) is not list or len(body) != 2 or type(body[0]) is not str or type(body[1]) is not dict:
        raise ProtocolError("payload must be [type, fields]")
    kind, values = body
    cls = table.get(kind)
    if cls is None:
        raise ProtocolError(f"unexpected message type {kind!r:.40}")
    if set(values) != set(cls.SCHEMA):
        raise ProtocolError(f"{kind}: fields {sorted(map(str, values))!r:.200} != {sorted(cls.SCHEMA)}")
    checked = {name: check(values[name], pieces) for name, check in cls.SCHEMA.items()}
    if cls is Bitfield and (
        len(checked["bits"]) != (checked["count"] + 7) // 8
        or (pieces is not None and checked["count"] != pieces)
    ):
        raise ProtocolError(f"bitfield of {checked['count']} pieces does not fit {pieces} pieces")
    # A ManifestReply's checksums are counted by the node after it compared the manifests: a peer with
    # another manifest (another piece size) legitimately sends another count, and its reply is read to
    # name the difference (Node._on_manifest).
    return cls(**checked)


def _envelope(frame: bytes | bytearray | memoryview) -> tuple[int, bytes, Any]:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, not {type(frame).__name__}")
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME}-byte limit")
    envelope = _unpack(frame)
    if type(envelope) is not list or len(envelope) < 2 or envelope[0] != MAGIC:
        raise ProtocolError("not a vllm-swarm message (bad envelope)")
    if envelope[1] != VERSION:
        raise VersionMismatchError(envelope[1], VERSION)
    if len(envelope) != 5:
        raise ProtocolError("not a vllm-swarm message (bad envelope)")
    _, _, seq, payload, mac = envelope
    if type(seq) is not int or not 0 <= seq < 1 << 63:
        raise ProtocolError(f"bad sequence number {seq!r:.40}")
    if type(payload) is not bytes:
        raise ProtocolError("payload must be binary")
    return seq, payload, mac


def _frame(seq: int, payload: bytes, mac: bytes | None) -> bytes:
    frame: bytes = msgpack.packb([MAGIC, VERSION, seq, payload, mac], use_bin_type=True)
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds {MAX_FRAME}")
    return frame


class Session:
    """One link's authentication: a handshake that binds both ends' fresh nonces and public keys, then
    per-direction sequence numbers and (with a token) MACs under keys derived from that handshake.

    Handshake (the dialer speaks first; every later frame needs it done):

        dialer -> listener   open    {nonce_d, public_d}            mac = HMAC(K, "open" + payload)
        listener -> dialer   accept  {nonce_l, public_l, sig_l}     mac = HMAC(K, "accept" + transcript)
        dialer -> listener   confirm {sig_d}                        mac = HMAC(K, "confirm" + transcript)

    with transcript = nonce_d + public_d + nonce_l + public_l and sig_x = Ed25519 signature by x over a
    role label + transcript. Each end then knows the other's peer id (`swarm.identity.peer_id_of` of its
    public key) for certain. Messages carry seq (1, 2, ... per direction; each must exceed the last one
    received) and, with a token, HMAC(k_dir, seq + payload) with k_dir = HMAC(K, direction + transcript).
    K = SHA-256(token). A frame recorded on one link is refused on any other (other keys) and on its own
    (its seq is spent), so nothing recorded is worth anything replayed. Without a token there are no MACs:
    ids are still proven, but the stream is as safe as the TCP connection it rides on.
    """

    def __init__(self, codec: Codec, identity: Identity, *, dialer: bool) -> None:
        self.codec = codec
        self.identity = identity
        self.dialer = dialer
        self.peer_id: str | None = None
        self.peer_public = b""
        self.established = False
        self._nonce = os.urandom(NONCE_SIZE)
        self._transcript = b""
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._sent = 0
        self._received = 0

    # -- sending

    def open(self) -> bytes:
        """The dialer's first frame."""
        assert self.dialer and not self._transcript
        payload = pack(SessionOpen(self._nonce, self.identity.public))
        return _frame(0, payload, self.codec.mac(b"open", payload))

    def encode(self, msg: Message) -> bytes:
        return self.seal(pack(msg))

    def seal(self, payload: bytes) -> bytes:
        """Frame a payload for this link. Before the handshake is done only an unsigned frame can be
        made (an Error to a stranger; the receiver treats it as unauthenticated)."""
        if not self.established:
            return _frame(0, payload, None)
        self._sent += 1
        seq = self._sent.to_bytes(8, "big")
        mac = hmac.new(self._send_key, seq + payload, hashlib.sha256).digest() if self._send_key else None
        return _frame(self._sent, payload, mac)

    # -- receiving

    def receive(self, frame: bytes, pieces: int | None = None) -> tuple[Message | None, bytes | None]:
        """Check and decode one frame: (the message for the node, or None for a handshake frame; a frame
        to send back, or None). Raises ProtocolError (AuthError for authentication) and changes nothing
        then, except that a broken handshake must start again."""
        seq, payload, mac = _envelope(frame)
        if self.established:
            self._verify(seq, payload, mac)
            return decode_payload(payload, pieces), None
        if len(payload) > _MAX_HANDSHAKE:
            raise ProtocolError("no session: open one first")
        try:
            msg = decode_payload(payload, None, {**HANDSHAKE, Error.TYPE: Error})
        except ProtocolError as e:
            raise ProtocolError(f"no session: open one first ({e})") from None
        if isinstance(msg, Error):
            if self.dialer and seq == 0 and mac is None:
                return msg, None  # unauthenticated: the node only logs it and drops the link
            raise ProtocolError("no session: open one first")
        if seq != 0:
            raise ProtocolError("handshake frames carry no sequence number")
        if not self.dialer and isinstance(msg, SessionOpen):
            self._check_mac(mac, b"open", payload)
            self._transcript = msg.nonce + msg.public + self._nonce + self.identity.public
            self.peer_public = msg.public
            sig = self.identity.sign(b"vsw-accept" + self._transcript)
            answer = pack(SessionAccept(self._nonce, self.identity.public, sig))
            return None, _frame(0, answer, self.codec.mac(b"accept", self._transcript))
        if self.dialer and isinstance(msg, SessionAccept) and not self.established:
            transcript = self._nonce + self.identity.public + msg.nonce + msg.public
            self._check_mac(mac, b"accept", transcript)
            if not verify(msg.public, msg.sig, b"vsw-accept" + transcript):
                raise AuthError("the listener's signature does not match its key")
            self._transcript, self.peer_public = transcript, msg.public
            sig = self.identity.sign(b"vsw-confirm" + transcript)
            confirm = pack(SessionConfirm(sig))
            self._establish()
            return None, _frame(0, confirm, self.codec.mac(b"confirm", transcript))
        if not self.dialer and isinstance(msg, SessionConfirm) and self._transcript:
            self._check_mac(mac, b"confirm", self._transcript)
            if not verify(self.peer_public, msg.sig, b"vsw-confirm" + self._transcript):
                raise AuthError("the dialer's signature does not match its key")
            self._establish()
            return None, None
        raise ProtocolError(f"unexpected {msg.TYPE} in the session handshake")

    def _establish(self) -> None:
        here, there = (b"d2l", b"l2d") if self.dialer else (b"l2d", b"d2l")
        self._send_key = self.codec.derive(here, self._transcript)
        self._recv_key = self.codec.derive(there, self._transcript)
        self.peer_id = peer_id_of(self.peer_public)
        self.established = True

    def _check_mac(self, mac: Any, label: bytes, data: bytes) -> None:
        expected = self.codec.mac(label, data)
        _compare(mac, expected)

    def _verify(self, seq: int, payload: bytes, mac: Any) -> None:
        if self._recv_key is None:
            _compare(mac, None)
        else:
            _compare(mac, hmac.new(self._recv_key, seq.to_bytes(8, "big") + payload, hashlib.sha256).digest())
        if seq <= self._received:
            raise AuthError(
                f"message {seq} after {self._received}: replayed or reordered", hint="a recorded frame?"
            )
        self._received = seq


def connected_pair(token: str | None = None) -> tuple[Session, Session]:
    """Two ends of one link, handshake done in memory: (dialer, listener). For code that passes messages
    without sockets (tests, in-process benchmarks)."""
    codec = Codec(token)
    dialer = Session(codec, Identity(), dialer=True)
    listener = Session(codec, Identity(), dialer=False)
    _, accept = listener.receive(dialer.open())
    assert accept is not None
    _, confirm = dialer.receive(accept)
    assert confirm is not None
    listener.receive(confirm)
    return dialer, listener


def _compare(mac: Any, expected: bytes | None) -> None:
    if expected is None:
        if mac is not None:
            raise AuthError(
                "peer signs its messages but this node has no cluster token",
                hint="set the same SWARM_TOKEN (or SWARM_TOKEN_FILE) on every instance",
            )
        return
    if type(mac) is not bytes or len(mac) != MAC_SIZE:
        raise AuthError("unsigned message while a cluster token is set", hint="check SWARM_TOKEN on the peer")
    if not hmac.compare_digest(mac, expected):
        raise AuthError("bad message signature", hint="the peer uses another SWARM_TOKEN, or replays frames")


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
