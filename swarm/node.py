"""One swarm member: the control loop that drives swarm.scheduler over ZeroMQ and a transport.

A `Node` owns the tensors of one rank. It binds a ZeroMQ ROUTER (peers reach it there) and a transport's
data port, advertises itself (mDNS, swarm.discovery), and runs one control-loop thread that owns every
ZeroMQ socket and the scheduler, so the scheduler needs no lock. Transport threads report piece events
through a queue and wake the loop through a pipe.

Links: a node that misses pieces dials every peer of its swarm it learns of (mDNS, the static list
SWARM_PEERS, or the peer lists that peers share in their Hello, unless `pex` is off) with a DEALER. Either
end of a link may request pieces over it: a ROUTER answers to the DEALER's identity, and data channels are
always dialed by the receiving side to the sending side's data port (the addresses travel in Hello), so one
link per pair suffices and duplicates are harmless. Seeds never dial. Bounded whatever peers send: at
most MAX_PEERS peers (more get Error("busy")), MAX_DIALS dials and MAX_CANDIDATES addresses to dial;
control sockets take frames up to `control_frame_limit` (from this node's own manifest) and queue
CONTROL_RCVHWM per connection; swarm.control_guard ends strangers' idle connections.

Handshake on a link: first a session (swarm/protocol.py `Session`: nonces, Ed25519 keys, with a token
MACs), so every frame is bound to its link and each end knows the other's id for certain; a Hello under
another id than the session's is refused. Then both sides send Hello (swarm key, manifest digest, content
digest, data-plane parameters). A different swarm key is refused with an `Error("wrong_key")`; a
different manifest is fetched (`ManifestQuery`) only to report a readable difference, then refused. A
`ManifestReply` is read only as the answer to our own query, and compared in wire form (never cut into
pieces). A leecher without piece checksums takes them, with a token, from the first peer whose content
digest matches its manifest; without one (an open swarm), only for the content digest a strict majority
of the members it met announce, and it fails the fetch with `ManifestMismatchError` when none has one
(docs/reliability.md, threat model). A peer is *accepted* (known to the scheduler) only after these
checks. Pieces are checked against the checksums before they are announced (Have) or served.

Control plane: piece events leave in batches. Within one turn of the loop (everything read from the
sockets and the transport's queue, then one scheduler tick), the haves of the pieces verified, the
hand-out hints, and each peer's requests, cancels, completion signals and refusals of its requests are
collected, and each peer gets one `Batch` frame at the end of the turn (`_flush`), so the cost per
piece of the control plane falls with the load (and a frame of requests is answered by one frame).
The loop sleeps until a socket, the transport or the scheduler's own next timeout
(`Scheduler.next_timeout`) needs it, and housekeeping (pings, dials, fetch supervision) every 0.25 s.

Liveness: any message proves a peer alive; idle links are pinged every `peer_timeout_s / 3`; a peer silent
for `peer_timeout_s`, or whose data channel broke, is dropped: its requests go elsewhere, its transport
resources are freed, and it may be dialed again if it is still advertised (after a back-off).

Failure, never a hang: `fetch()` raises `NoSeedError` when no usable peer is found within
`discovery_timeout_s` (`ManifestMismatchError` when every peer found holds another manifest),
`StallError` when no piece arrived for `stall_timeout_s`, when some missing pieces have been held by no
live peer for `discovery_timeout_s`, or past `deadline_s` (checked in the caller's thread too, so it holds
whatever the control loop is doing); the node stays up so the caller can load
elsewhere and call `mark_complete()`. `close()` withdraws the advert, says goodbye, and ends every
thread and socket within bounded time.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import zmq

from swarm import metrics as _metrics
from swarm import options as _opt
from swarm import protocol as P
from swarm.control_guard import ConnectionGuard
from swarm.errors import (
    AuthError,
    ConfigError,
    FetchError,
    ManifestError,
    ManifestMismatchError,
    NoSeedError,
    ProtocolError,
    StallError,
    SwarmError,
)
from swarm.identity import Identity
from swarm.manifest import Manifest, SwarmKey, content_digest, piece_checksums
from swarm.scheduler import Cancel, HandedOut, Refuse, Request, Scheduler, SchedulerConfig, Serve
from swarm.transport import make_transport
from swarm.transport.base import Events, Transport
from swarm.transport.paths import Offer

log = logging.getLogger("swarm.node")

Progress = Callable[[int, int], None]
_HOUSEKEEPING_S = 0.25
_DISCOVERY_POLL_S = 0.02
_DIAL_BACKOFF_S = 2.0
_MAX_PEX = 32
_MAX_PROTOCOL_ERRORS = 20
#: Error codes by which a member of another swarm (or layout) refuses our Hello.
_REFUSAL_CODES = ("wrong_key", "wrong_transport")
_MAX_MISMATCHES = 256
#: Peers (accepted or being checked) a node keeps at most; more are answered Error("busy"). Like
#: BitTorrent's peer limit: in a swarm of thousands every member talks to a bounded, random subset, and
#: pieces still reach everyone through the mesh. Bounds what insiders can make a node hold per peer
#: (link, data channel, scheduler state).
MAX_PEERS = 64
#: Outgoing control links (DEALER sockets, connecting or established) at most.
MAX_DIALS = 32
#: Addresses remembered to dial at most; peer exchange may fill half, so that what mDNS and the static
#: list find always has room. A peer-exchange address that never answered is forgotten.
MAX_CANDIDATES = 256
_MAX_PEX_CANDIDATES = MAX_CANDIDATES // 2
_BUSY_BACKOFF_S = 3.0
_ROTATE_S = 2.0
#: Control messages queued per connection before ZeroMQ stops reading it (TCP then pushes back).
CONTROL_RCVHWM = 8
#: A ZMTP handshake must finish within this; idle links are pinged by ZeroMQ itself every
#: _HEARTBEAT_IVL_MS and dropped when nothing came back within the node's peer timeout.
_HANDSHAKE_IVL_MS = 5000
_HEARTBEAT_IVL_MS = 2000
_MAX_BAD_IDENTS = 4096


def control_frame_limit(manifest: Manifest) -> int:
    """The largest control frame a node takes (ZeroMQ refuses a longer one before allocating it): room
    for a manifest reply four times the size of this node's own (a peer's manifest with smaller pieces
    or more tensors, still reported readably) plus 256 KiB for everything else, at most MAX_FRAME.
    Derived from what this node holds, never from what a peer declares."""
    reply = P.ManifestReply(manifest.to_wire(), ["0" * 32] * len(manifest.pieces))
    own = len(P.pack(reply)) + 128  # the envelope: magic, version, sequence number, MAC
    return min(P.MAX_FRAME, (256 << 10) + 4 * own)


def _limit_control_socket(sock: zmq.Socket[bytes], frame_limit: int, peer_timeout_s: float) -> None:
    """Bounds of every control socket (ROUTER and dials), set before it binds or connects: the memory a
    connection can pin is at most (CONTROL_RCVHWM + 1) x frame_limit (queued plus one being read)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, frame_limit)
    sock.setsockopt(zmq.RCVHWM, CONTROL_RCVHWM)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(peer_timeout_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(peer_timeout_s * 1000))


#: Sessions of the control port that belong to no accepted peer (handshakes in progress, `swarm status`
#: clients): the oldest are forgotten past this many, so a flood of handshakes costs bounded memory.
_MAX_LOOSE_SESSIONS = 1024
#: Open swarm (no token): how long a leecher collects the content digests of the members it meets before
#: it takes the checksums of a digest that only one member holds (two agreeing members need no wait).
_OPEN_QUORUM_S = 1.0
_MAX_VOTES = 1024
#: distinct checksum lists kept while undecided (each as long as the manifest's piece count)
_MAX_OFFERED = 16


TRANSPORTS = _opt.TRANSPORTS


@dataclass(frozen=True)
class NodeConfig:
    """Options of a node. Defaults, types and ranges of the user-facing ones come from swarm.options (one
    schema for the CLI, SWARM_* variables and the vLLM loader); `from_env` reads the environment."""

    token: str | None = field(default=_opt.default("token"), repr=False)
    token_file: str | None = _opt.default("token_file")
    allow_open: bool = _opt.default("allow_open")
    peers: str | None = _opt.default("peers")
    dns_interval_s: float = _opt.default("dns_interval_s")
    dns_server: str | None = _opt.default("dns_server")
    interface: str | None = _opt.default("interface")
    #: "auto": every path this member can use, the best chosen per pair (swarm.transport.auto); or one
    #: of "tcp", "ipc", "nccl" for that transport alone
    transport: str = _opt.default("transport")
    #: 0: the transport's default (64 MiB over TCP, 256 MiB between GPUs; see their docstrings)
    piece_size: int = 0
    discovery_timeout_s: float = _opt.default("discovery_timeout_s")
    stall_timeout_s: float = _opt.default("stall_timeout_s")
    deadline_s: float = _opt.default("deadline_s")
    peer_timeout_s: float = 6.0
    io_timeout_s: float = 30.0
    model_name: str = ""
    host: str | None = _opt.default("host")
    #: None: swarm.options.DEFAULT_CONTROL_PORT, or a random port when that is taken; 0: random
    control_port: int | None = _opt.default("control_port")
    metrics_port: int | None = _opt.default("metrics_port")
    #: added to the control and metrics ports (the vLLM loader passes the rank: one port per rank)
    port_offset: int = 0
    mdns: bool = _opt.default("mdns")
    #: Peer exchange: dial the peers that peers list in their Hello. Off, a node talks only to the peers
    #: it finds itself (mDNS, static list); with mdns off and a static list of seeds, a leecher then pulls
    #: from those seeds alone (the one-seed fan-out that bench/lan.py compares the swarm against).
    pex: bool = _opt.default("pex")
    rate_cap: float | None = _opt.default("rate_cap")
    seed: int | None = None
    scheduler: SchedulerConfig | None = None

    def __post_init__(self) -> None:
        if self.token_file is not None:
            object.__setattr__(self, "token", P.resolve_token(self.token, self.token_file))
        for name in _opt.NODE_OPTIONS:
            if name != "piece_size" or self.piece_size:
                _opt.check(name, getattr(self, name))
        for name in ("peer_timeout_s", "io_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.port_offset < 1024:
            raise ConfigError(f"port_offset must be in 0..1023, got {self.port_offset}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> NodeConfig:
        """Defaults < environment (SWARM_*) < explicit overrides (None: not given). Bad values raise
        ConfigError naming the variable; a token file is read here (SWARM_TOKEN_FILE)."""
        values = _opt.from_env(_opt.NODE_OPTIONS, env)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown swarm option(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class FetchReport:
    bytes_by_peer: dict[str, int]
    peer_names: dict[str, str]
    seconds: float
    total_bytes: int
    #: the path (ipc, nccl, tcp) of each peer still connected at the end; a departed peer's is not kept
    peer_paths: dict[str, str] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.total_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def describe(self) -> str:
        parts = ", ".join(
            f"{self.peer_label(p)}: {b / 1e6:.1f} MB" for p, b in sorted(self.bytes_by_peer.items())
        )
        return f"{self.total_bytes / 1e6:.1f} MB in {self.seconds:.2f} s ({self.gbps:.2f} GB/s) from {parts}"

    def peer_label(self, peer: str) -> str:
        """The peer's name, with its path when known: "host-a:47100 (ipc)"."""
        name = self.peer_names.get(peer, peer)
        path = self.peer_paths.get(peer)
        return f"{name} ({path})" if path else name


# --- what transport threads (and callers) tell the loop: typed events on one queue ---------------------


@dataclass(frozen=True, slots=True)
class _Received:
    peer: str
    piece: int


@dataclass(frozen=True, slots=True)
class _Failed:
    peer: str
    piece: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Sent:
    peer: str
    piece: int
    ok: bool


@dataclass(frozen=True, slots=True)
class _Closed:
    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Notify:
    peer: str
    msg: P.Message


@dataclass(frozen=True, slots=True)
class _Complete:
    checksums: list[str]


@dataclass(frozen=True, slots=True)
class _Dns:
    found: list[tuple[str, int]]


_Event = _Received | _Failed | _Sent | _Closed | _Notify | _Complete | _Dns


@dataclass
class _Outbox:
    """One peer's share of the next `Batch` (insertion-ordered: requests leave in the scheduler's order)."""

    cancel: dict[int, None] = field(default_factory=dict)
    request: dict[int, None] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)
    busy: dict[int, None] = field(default_factory=dict)  # answers to its requests: ask later/elsewhere
    refused: dict[int, None] = field(default_factory=dict)  # ... and: not held


@dataclass
class _Dial:
    host: str
    port: int
    sock: zmq.Socket[bytes]
    started: float
    session: P.Session
    peer: str | None = None


@dataclass
class _Peer:
    id: str
    hello: P.Hello
    dials: list[_Dial] = field(default_factory=list)
    idents: set[bytes] = field(default_factory=set)
    hosts: list[str] = field(default_factory=list)
    accepted: bool = False
    refused: str = ""
    data_connected: bool = False
    last_seen: float = 0.0
    last_sent: float = 0.0
    bytes_from: int = 0
    bytes_to: int = 0
    failures: int = 0
    #: pieces announced before the peer was accepted (a Bitfield can overtake our manifest check)
    early_have: set[int] = field(default_factory=set)
    #: a ManifestQuery to this peer awaits its answer: the only state in which a ManifestReply is read
    manifest_asked: bool = False

    @property
    def name(self) -> str:
        host = self.hosts[0] if self.hosts else "?"
        return f"{self.id}@{host}"


class Node:
    """A swarm member holding one rank's tensors. See the module docstring for the rules."""

    def __init__(
        self,
        key: SwarmKey,
        tensors: Mapping[str, torch.Tensor],
        config: NodeConfig | None = None,
        *,
        complete: bool,
        manifest: Manifest | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config or NodeConfig.from_env()
        on_gpu = any(t.is_cuda for t in tensors.values())
        self.key = key
        self.tensors = tensors
        c = self.config
        self.transport = transport or make_transport(
            c.transport, token=c.token, io_timeout_s=c.io_timeout_s, rate_cap=c.rate_cap
        )
        # The piece size and scheduler settings not configured are the transport's (measured per link).
        piece_size = c.piece_size or self.transport.default_piece_size(on_gpu)
        self.manifest = manifest or Manifest.from_tensors(tensors, piece_size)
        self.identity = Identity()
        self.id = self.identity.id
        self.codec = P.Codec(c.token)
        self._scheduler_config = (
            c.scheduler if c.scheduler is not None else self.transport.default_scheduler(on_gpu)
        )
        self.checksums: list[str] | None = piece_checksums(self.manifest, tensors) if complete else None
        self.complete = complete
        self._rng_seed = self.config.seed if self.config.seed is not None else random.randrange(1 << 30)
        self.scheduler = self._new_scheduler(complete)
        self.started_at = time.time()
        self._peers: dict[str, _Peer] = {}
        self._by_ident: dict[bytes, str] = {}
        self._sessions: OrderedDict[bytes, P.Session] = OrderedDict()
        self._dials: dict[zmq.Socket[bytes], _Dial] = {}
        self._dial_after: dict[tuple[str, int], float] = {}
        self._candidates: dict[tuple[str, int], str] = {}
        self._pex_candidates: set[tuple[str, int]] = set()
        self._next_rotation = 0.0
        self._shunned: dict[str, float] = {}
        self.frame_limit = control_frame_limit(self.manifest)
        self._seen_generation = self._seen_candidates = 0
        self._mismatches: dict[str, str] = {}
        #: open swarm: the content digest each member of our manifest announced (peer id -> digest), the
        #: checksums offered for each digest (from answers to our queries), when the first vote came
        self._votes: dict[str, str] = {}
        self._offered: dict[str, list[str]] = {}
        self._first_vote: float | None = None
        self._bad_idents: dict[bytes, int] = {}
        self._events: queue.Queue[_Event] = queue.Queue()
        # this turn's outgoing piece events (see _flush)
        self._out_have: list[int] = []
        self._out_handed: list[int] = []
        self._out: dict[str, _Outbox] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._guard: ConnectionGuard | None = None  # set here too, so a node never started can close
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._advertiser: Any = None
        self._browser: Any = None
        self._dns: Any = None
        self._dns_endpoints: set[tuple[str, int]] = set()
        self.host = ""
        self.addresses: list[str] = []
        self.control_port = 0
        self.data_params: dict[str, Any] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self._rate_samples: list[tuple[float, int, int]] = []
        # fetch state, shared with the caller's thread under _cv
        self._cv = threading.Condition()
        self._fetching = False
        self._fetch_error: SwarmError | None = None
        self._fetch_started = 0.0
        self._last_progress = 0.0
        self._unavailable_since: float | None = None
        self._held_bytes = self.manifest.total_bytes if complete else 0
        #: bytes received from peers that have left (id -> (name, bytes)), so the report counts them
        self._gone_from: dict[str, tuple[str, int]] = {}
        self.metrics = _metrics.NodeMetrics(self.config.model_name or key.model_id, key.rank)
        self._seeding_since: float | None = time.monotonic() if complete else None
        self._metrics_server: Any = None

    # --- public API -------------------------------------------------------------------------------

    @property
    def role(self) -> str:
        return "seed" if self.complete else "leecher"

    def start(self) -> Node:
        """Bind the control and data ports, advertise, and start serving in the background."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, progress: Progress | None = None) -> FetchReport:
        """Pull every missing piece into the tensors; blocks until done or a FetchError."""
        if self._thread is None:
            raise FetchError("start() the node before fetch()")
        total = self.manifest.total_bytes
        if self.complete:
            return FetchReport({}, {}, 0.0, total)
        with self._cv:
            self._fetch_started = self._last_progress = time.monotonic()
            self._fetch_error = None
            self._fetching = True
        self._wake()
        shown = -1
        deadline = self._fetch_started + self.config.deadline_s
        try:
            with self._cv:
                while not self.complete and self._fetch_error is None:
                    if not self._thread.is_alive():
                        raise FetchError("the node's control loop stopped")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        # Here, not in the control loop: the deadline holds whatever the loop is doing.
                        self._fetch_error = self._past_deadline()
                        break
                    self._cv.wait(min(0.1, left))
                    if progress is not None and self._held_bytes != shown:
                        shown = self._held_bytes
                        self._cv.release()
                        try:
                            progress(shown, total)
                        finally:
                            self._cv.acquire()
                if self._fetch_error is not None:
                    raise self._fetch_error
        finally:
            with self._cv:
                self._fetching = False
        if progress is not None and shown != total:
            progress(total, total)
        gone = dict(self._gone_from)
        live = list(self._peers.values())
        peers = {pid: b for pid, (_, b) in gone.items()}
        for p in live:
            if p.bytes_from:
                peers[p.id] = peers.get(p.id, 0) + p.bytes_from
        names = {pid: name for pid, (name, _) in gone.items()} | {p.id: p.name for p in live}
        paths = {p.id: self._path(p.id) for p in live if p.id in peers}
        return FetchReport(peers, names, time.monotonic() - self._fetch_started, sum(peers.values()), paths)

    def _past_deadline(self) -> StallError:
        """The deadline's error, built in the caller's thread from what it may read without the loop."""
        return StallError(
            f"the fetch passed its deadline of {self.config.deadline_s:.0f} s "
            f"({self._held_bytes} of {self.manifest.total_bytes} bytes held)",
            missing=[],
            hint="the loader falls back to disk",
        )

    def mark_complete(self) -> None:
        """The tensors now hold the full model (loaded elsewhere): checksum it and serve as a seed."""
        checksums = piece_checksums(self.manifest, self.tensors)
        self._post(_Complete(checksums))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        up, down = self._rates(now)
        held = self.scheduler.held_count
        return {
            "instance": self.id,
            "host": self.host or socket.gethostname(),
            "port": self.control_port,
            "model": self.config.model_name or self.key.model_id,
            "key": self.key.digest,
            "rank": self.key.rank,
            "role": self.role,
            "transport": self.transport.name,
            "progress": round(self._held_bytes / self.manifest.total_bytes, 4)
            if self.manifest.total_bytes
            else 1.0,
            "pieces": held,
            "pieces_total": len(self.manifest.pieces),
            "bytes": self.manifest.total_bytes,
            "up_Bps": up,
            "down_Bps": down,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "peers": len([p for p in self._peers.values() if p.accepted]),
            "uptime_s": round(time.time() - self.started_at, 1),
            "authenticated": self.codec.authenticated,
            "from": {p.id: p.bytes_from for p in list(self._peers.values()) if p.bytes_from},
            "to": {p.id: p.bytes_to for p in list(self._peers.values()) if p.bytes_to},
            "paths": {p.id: self.transport.path(p.id) for p in list(self._peers.values()) if p.accepted},
        }

    def close(self) -> None:
        """Withdraw the advert, say goodbye, end every thread, socket and channel (bounded time)."""
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10.0)
        if self._thread is None or not self._thread.is_alive():
            self._teardown()

    # --- start-up ---------------------------------------------------------------------------------

    def _new_scheduler(self, complete: bool) -> Scheduler:
        sizes = [p.length for p in self.manifest.pieces]
        have = range(len(sizes)) if complete else ()
        return Scheduler(sizes, have, seed=self._rng_seed, config=self._scheduler_config)

    def _start(self) -> None:
        from swarm import discovery

        if not self.codec.authenticated:
            log.warning("no cluster token (SWARM_TOKEN): this swarm is open to anyone on the LAN")
        bind = self.config.host or "0.0.0.0"
        if self.config.interface and not self.config.host:
            bind = _interface_address(self.config.interface)
        self.addresses = _own_addresses(bind)
        self.host = self.addresses[0]
        self.transport.bind(self.manifest, self.tensors, self._transport_events())
        self.transport.peer_id = self.id
        self.transport.identity = self.identity
        if self.checksums is not None:
            self.transport.set_checksums(self.checksums)
        self.data_params = self.transport.open(bind)
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        _limit_control_socket(router, self.frame_limit, self.config.peer_timeout_s)
        self._router = router  # closed by _teardown even when binding fails
        self._guard = None
        addr = f"[{bind}]" if ":" in bind else bind
        if ":" in bind:
            router.setsockopt(zmq.IPV6, 1)
        port = self.config.control_port
        try:
            if port is None:
                # The default port, so that a Service can name it; several members on one host: random.
                try:
                    wanted = _opt.DEFAULT_CONTROL_PORT + self.config.port_offset
                    router.bind(f"tcp://{addr}:{wanted}")
                    self.control_port = wanted
                except zmq.ZMQError:
                    self.control_port = router.bind_to_random_port(f"tcp://{addr}")
            elif port:
                router.bind(f"tcp://{addr}:{port + self.config.port_offset}")
                self.control_port = port + self.config.port_offset
            else:
                self.control_port = router.bind_to_random_port(f"tcp://{addr}")
        except zmq.ZMQError as e:
            raise ConfigError(
                f"cannot listen on {bind}:{port or 'a random port'}: {e}",
                hint="choose another SWARM_PORT, or leave it unset",
            ) from e
        self._guard = ConnectionGuard(router, self._ctx, self.control_port)
        for host, port in discovery.static_peers(self.config.peers) if self.config.peers else []:
            self._candidates[(host, port)] = ""
        self._start_dns()
        self.metrics.update(self._peer_states(), self._seeding_since)  # right from the first scrape
        if self.config.metrics_port:
            self._metrics_server = _metrics.serve(bind, self.config.metrics_port + self.config.port_offset)
        if self.config.mdns:
            # No name probe: the instance id is 64 bits of a fresh key's digest, and probing costs 0.75 s
            # of start-up.
            self._advertiser = discovery.Advertiser(
                self._advert(), interface=self.config.interface, probe=False, watch_exit=True
            )
            self._advertiser.start()
            self._browser = discovery.Browser(
                key_digest=self.key.digest, interface=self.config.interface, ignore=self.id
            )
        self._thread = threading.Thread(target=self._loop, name=f"swarm-node-{self.id}", daemon=True)
        self._thread.start()
        log.info(
            "swarm node %s (%s, %s) listening on %s:%d, %s",
            self.id,
            self.key.describe(),
            self.role,
            self.host,
            self.control_port,
            self.manifest,
        )

    def _start_dns(self) -> None:
        """dns:/dns-srv: peers: resolved now and periodically in a thread of their own (swarm.dnspeers)."""
        from swarm import dnspeers

        own_default = _opt.DEFAULT_CONTROL_PORT + self.config.port_offset
        names = dnspeers.parse_dns_peers(self.config.peers or "", default_port=own_default)
        if names:
            self._dns = dnspeers.DnsPeers(
                names,
                lambda found: self._post(_Dns(found)),
                interval_s=self.config.dns_interval_s,
                server=self.config.dns_server,
            ).start()

    def _on_dns(self, found: list[tuple[str, int]]) -> None:
        """New DNS answers: dial the new endpoints; forget those gone that never answered."""
        new = set(found)
        for addr in found:
            self._candidates.setdefault(addr, "")
        for addr in self._dns_endpoints - new:
            if self._candidates.get(addr) == "":
                del self._candidates[addr]
        self._dns_endpoints = new

    def _advert(self) -> Any:
        from swarm import discovery

        return discovery.Advert(
            instance_id=self.id,
            key_digest=self.key.digest,
            model=self.config.model_name or self.key.model_id,
            rank=self.key.rank,
            role=self.role,
            control_port=self.control_port,
        )

    def _transport_events(self) -> Events:
        def notify(peer_id: str, msg: P.Message) -> None:
            if threading.current_thread() is self._thread:
                self._notify(peer_id, msg, time.monotonic())  # on the loop thread already: no queue hop
            else:
                self._post(_Notify(peer_id, msg))

        return Events(
            received=lambda peer, piece: self._post(_Received(peer, piece)),
            failed=lambda peer, piece, reason: self._post(_Failed(peer, piece, reason)),
            sent=lambda peer, piece, ok: self._post(_Sent(peer, piece, ok)),
            closed=lambda peer, reason: self._post(_Closed(peer, reason)),
            notify=notify,
        )

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _post(self, event: _Event) -> None:
        self._events.put(event)
        if threading.current_thread() is not self._thread:
            self._wake()  # the loop drains the queue before it sleeps again: no wake-up from itself

    # --- the control loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._router is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        own: list[zmq.Socket[bytes]] = [self._router]
        if self._guard is not None:
            poller.register(self._guard.socket, zmq.POLLIN)
            own.append(self._guard.socket)
        next_housekeeping = 0.0
        try:
            while not self._stop.is_set():
                for sock in self._dials:
                    if sock not in _registered(poller):
                        poller.register(sock, zmq.POLLIN)
                ready = dict(poller.poll(self._sleep_ms(time.monotonic(), next_housekeeping)))
                now = time.monotonic()
                if self._wake_r in ready:
                    _drain(self._wake_r)
                if self._guard is not None and self._guard.socket in ready:
                    self._guard.read_events(now, self._is_member)
                if self._router in ready:
                    self._read_router(now)
                for sock in list(self._dials):
                    dial = self._dials.get(sock)  # handling one link may close another (a refusal)
                    if dial is not None and sock in ready:
                        self._read_dial(dial, now)
                for sock in list(_registered(poller)):
                    closed_dial = sock not in self._dials and not any(sock is o for o in own)
                    if isinstance(sock, zmq.Socket) and closed_dial:
                        poller.unregister(sock)
                self._drain_events(now)
                self._tick(now)
                self._flush(now)
                self._dial_news(now)
                if now >= next_housekeeping:
                    next_housekeeping = now + _HOUSEKEEPING_S
                    self._housekeeping(now)
                    self._flush(now)
        except Exception as e:  # the loop must never die silently: fail the fetch with the cause
            log.exception("swarm node %s control loop failed", self.id)
            self._fail_fetch(FetchError(f"control loop failed: {type(e).__name__}: {e}"))
        finally:
            self._say_goodbye()
            self._teardown()

    def _sleep_ms(self, now: float, next_housekeeping: float) -> int:
        """How long the loop may sleep when nothing arrives: until the scheduler's next timeout or the
        next housekeeping, whichever is first (0 when a tick has work now)."""
        s = self.scheduler
        if s.wants_tick or not self._events.empty():
            return 0
        until = next_housekeeping
        due = s.next_timeout()
        if due is not None and due < until:
            until = due
        if self._browser is not None and not self.complete:
            # mDNS has no wake-up hook into this loop: a leecher looks at the browser's view this often,
            # so that a seed found is dialed at once (_dial_news), not at the next housekeeping.
            until = min(until, now + _DISCOVERY_POLL_S)
        return max(0, math.ceil((until - now) * 1000))

    def _tick(self, now: float) -> None:
        s = self.scheduler
        due = s.next_timeout()
        if s.wants_tick or (due is not None and due <= now):
            self._apply(s.tick(now), now)

    # --- reading ----------------------------------------------------------------------------------

    def _read_router(self, now: float) -> None:
        assert self._router is not None
        for _ in range(1000):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) != 2:
                continue
            ident, frame = parts[0].bytes, parts[1].bytes
            fd = parts[1].get(zmq.SRCFD)
            if self._bad_idents.get(ident, 0) >= _MAX_PROTOCOL_ERRORS:
                continue
            peer_id = self._by_ident.get(ident)
            session = self._session_of(ident)
            try:
                msg, answer = session.receive(frame, len(self.manifest.pieces))
            except ProtocolError as e:
                if len(self._bad_idents) >= _MAX_BAD_IDENTS:
                    self._bad_idents.clear()  # bounded; a client cut off long ago may talk again
                self._bad_idents[ident] = self._bad_idents.get(ident, 0) + 1
                self._router.send_multipart([ident, session.encode(P.Error("protocol", str(e)[:500]))])
                continue
            if self._guard is not None:
                self._guard.seen(fd, ident, now)
            if answer is not None:
                self._router.send_multipart([ident, answer], zmq.NOBLOCK)
            if msg is not None:
                self._handle(msg, now, ident=ident, peer_id=peer_id, session=session)

    def _session_of(self, ident: bytes) -> P.Session:
        session = self._sessions.get(ident)
        if session is None:
            session = self._sessions[ident] = P.Session(self.codec, self.identity, dialer=False)
            loose = [i for i in self._sessions if i not in self._by_ident]
            for old in loose[: max(0, len(loose) - _MAX_LOOSE_SESSIONS)]:
                del self._sessions[old]
        return session

    def _read_dial(self, dial: _Dial, now: float) -> None:
        for _ in range(1000):
            try:
                frame = dial.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            session = dial.session
            try:
                msg, answer = session.receive(frame, len(self.manifest.pieces))
            except ProtocolError as e:
                log.warning("dropping link to %s:%d: %s", dial.host, dial.port, e)
                if isinstance(e, AuthError):
                    self._note_mismatch(f"{dial.host}:{dial.port}", str(e))
                self._close_dial(dial, backoff=True)
                return
            if answer is not None:  # the handshake is done: say who we are
                dial.sock.send(answer, zmq.NOBLOCK)
                dial.sock.send(session.encode(self._hello()), zmq.NOBLOCK)
            if msg is None:
                continue
            if not session.established:  # an unauthenticated refusal of our handshake
                log.warning(
                    "%s:%d refused the session: %s", dial.host, dial.port, getattr(msg, "message", msg)
                )
                self._note_mismatch(
                    f"{dial.host}:{dial.port}", f"refused the session: {getattr(msg, 'message', '')}"
                )
                self._close_dial(dial, backoff=True)
                return
            self._handle(msg, now, dial=dial, peer_id=dial.peer, session=session)
            if dial.sock not in self._dials:
                return

    # --- handling ---------------------------------------------------------------------------------

    def _handle(
        self,
        msg: P.Message,
        now: float,
        *,
        ident: bytes | None = None,
        dial: _Dial | None = None,
        peer_id: str | None = None,
        session: P.Session | None = None,
    ) -> None:
        if isinstance(msg, P.StatusQuery):
            self._reply(ident, dial, P.StatusReply(self.status()))
            return
        if isinstance(msg, P.Hello):
            if session is None or msg.peer_id != session.peer_id:
                # Ids are proven by the session's handshake: nobody speaks for another member.
                self._reply(
                    ident, dial, P.Error("protocol", "Hello's peer id is not the one of the session's key")
                )
                return
            self._on_hello(msg, now, ident, dial)
            return
        peer = self._peers.get(peer_id) if peer_id else None
        if peer is None:
            if isinstance(msg, P.Ping):
                self._reply(ident, dial, P.Ping())
            elif isinstance(msg, P.Error) and dial is not None and msg.code == "busy":
                self._close_dial(dial, backoff=True)
                self._dial_after[(dial.host, dial.port)] = now + _BUSY_BACKOFF_S
            elif isinstance(msg, P.Error) and dial is not None and msg.code in _REFUSAL_CODES:
                # A member of another swarm answered our Hello: remember why, for the fetch's error.
                self._note_mismatch(f"{dial.host}:{dial.port}", msg.message)
                log.warning("not using %s:%d: %s", dial.host, dial.port, msg.message)
                self._close_dial(dial, backoff=False, forever=True)
            elif not isinstance(msg, (P.Error, P.Goodbye)):
                self._reply(ident, dial, P.Error("hello_first", "send Hello before anything else"))
            return
        peer.last_seen = now
        if isinstance(msg, P.Ping):
            if ident is not None:
                self._reply(ident, None, P.Ping())
        elif isinstance(msg, P.ManifestQuery):
            if self.checksums is None:
                self._send(peer, P.Error("no_manifest", "this node has no checksums yet"), now)
            else:
                self._send(peer, P.ManifestReply(self.manifest.to_wire(), self.checksums), now)
        elif isinstance(msg, P.ManifestReply):
            if not peer.manifest_asked:  # unsolicited or repeated: not worth a look
                log.debug("ignoring a manifest from %s that was not asked for", peer.name)
                return
            peer.manifest_asked = False
            self._on_manifest(peer, msg, now)
        elif not peer.accepted:
            if isinstance(msg, P.Error):
                self._on_error(peer, msg, now)
            elif isinstance(msg, (P.Channel, P.Sent)) and not peer.refused:
                # A transport may set its channel up while the manifest check is still running.
                self.transport.on_message(peer.id, msg)
            elif isinstance(msg, P.Bitfield):
                peer.early_have = set(msg.pieces())
            elif isinstance(msg, P.Have):
                peer.early_have.add(msg.piece)
            elif isinstance(msg, P.Batch) and not peer.refused:
                peer.early_have.update(msg.have)
                for piece in msg.sent:
                    self.transport.on_message(peer.id, P.Sent(piece, True))
            return
        elif isinstance(msg, P.Batch):
            self._on_batch(peer, msg, now)
        elif isinstance(msg, P.Bitfield):
            self.scheduler.peer_bitfield(peer.id, msg.pieces(), now)
            self._maybe_connect_data(peer)
        elif isinstance(msg, P.Have):
            self.scheduler.peer_have(peer.id, msg.piece, now)
            self._maybe_connect_data(peer)
        elif isinstance(msg, P.HandedOut):
            self.scheduler.peer_handed_out(peer.id, msg.piece, now)
        elif isinstance(msg, P.Request):
            self._apply(self.scheduler.upload_requested(peer.id, msg.piece, now), now)
        elif isinstance(msg, P.Cancel):
            self.scheduler.upload_cancelled(peer.id, msg.piece, now)
            self.transport.cancel(peer.id, msg.piece)
        elif isinstance(msg, P.Reject):
            self.transport.unexpect(peer.id, msg.piece)
            self.scheduler.piece_failed(peer.id, msg.piece, now, "refused" if msg.busy else "error")
        elif isinstance(msg, (P.Channel, P.Sent)):
            self.transport.on_message(peer.id, msg)
        elif isinstance(msg, P.Goodbye):
            self._drop_peer(peer, f"said goodbye ({msg.reason})", now)
        elif isinstance(msg, P.Error):
            self._on_error(peer, msg, now)

    def _on_batch(self, peer: _Peer, msg: P.Batch, now: float) -> None:
        s = self.scheduler
        if msg.have:
            mask = 0
            for piece in msg.have:
                mask |= 1 << piece
            s.peer_have_mask(peer.id, mask, now)
            self._maybe_connect_data(peer)
        for piece in msg.handed:
            s.peer_handed_out(peer.id, piece, now)
        for piece in msg.cancel:
            s.upload_cancelled(peer.id, piece, now)
            self.transport.cancel(peer.id, piece)
        for piece in msg.request:
            self._apply(s.upload_requested(peer.id, piece, now), now)
        for piece in msg.sent:
            self.transport.on_message(peer.id, P.Sent(piece, True))
        for pieces, reason in ((msg.busy, "refused"), (msg.refused, "error")):
            for piece in pieces:
                self.transport.unexpect(peer.id, piece)
                s.piece_failed(peer.id, piece, now, reason)

    def _hello(self) -> P.Hello:
        data = dict(self.data_params)
        data["addrs"] = self.addresses[:8]
        data["ctl"] = self.control_port
        data["paths"] = self.transport.offer().to_wire()
        data["peers"] = [
            [p.id, p.hosts[0], int(p.hello.data.get("ctl", 0))]
            for p in list(self._peers.values())[:_MAX_PEX]
            if p.accepted and p.hosts and isinstance(p.hello.data.get("ctl"), int)
        ]
        return P.Hello(
            peer_id=self.id,
            key=self.key.to_wire(),
            key_digest=self.key.digest,
            manifest_digest=self.manifest.digest,
            content_digest=content_digest(self.checksums) if self.checksums is not None else "",
            role=self.role,
            transport=self.transport.name,
            data=data,
        )

    def _on_hello(self, msg: P.Hello, now: float, ident: bytes | None, dial: _Dial | None) -> None:
        if msg.peer_id == self.id:
            if dial is not None:
                self._close_dial(dial, backoff=False, forever=True)
            return
        if msg.key_digest != self.key.digest:
            try:
                theirs = SwarmKey.from_wire(msg.key).describe()
            except ManifestError:
                theirs = msg.key_digest
            self._note_mismatch(msg.peer_id, f"other swarm key: {theirs}")
            if dial is not None:
                self._close_dial(dial, backoff=True)
            else:
                self._reply(ident, None, P.Error("wrong_key", f"other swarm key: {self.key.describe()}"))
            return
        theirs_offer = Offer.from_wire(msg.data.get("paths"), fallback=msg.transport)
        if self.transport.choose(msg.peer_id, theirs_offer) is None:
            mine = ", ".join(sorted(self.transport.offer().transports))
            offered = ", ".join(sorted(theirs_offer.transports)) or "none"
            self._note_mismatch(msg.peer_id, f"no data path in common: it offers {offered}, this node {mine}")
            self._reply(
                ident, dial, P.Error("wrong_transport", f"no data path in common: this node offers {mine}")
            )
            return
        peer = self._peers.get(msg.peer_id)
        if peer is None and (len(self._peers) >= MAX_PEERS or self._shunned.get(msg.peer_id, 0.0) > now):
            if dial is not None:
                self._close_dial(dial, backoff=True)
                self._dial_after[(dial.host, dial.port)] = now + _BUSY_BACKOFF_S
            else:
                self._reply(ident, None, P.Error("busy", f"this node has {MAX_PEERS} peers; try others"))
            return
        if peer is None:
            peer = _Peer(msg.peer_id, msg, last_seen=now)
            self._peers[msg.peer_id] = peer
        peer.hello = msg
        peer.last_seen = now
        hosts = [h for h in _list_field(msg.data, "addrs") if isinstance(h, str)]
        if dial is not None:
            dial.peer = msg.peer_id
            if dial not in peer.dials:
                peer.dials.append(dial)
            self._candidates[(dial.host, dial.port)] = msg.peer_id
            self._pex_candidates.discard((dial.host, dial.port))
            hosts = [dial.host, *[h for h in hosts if h != dial.host]]
        if ident is not None:
            peer.idents.add(ident)
            self._by_ident[ident] = msg.peer_id
            self._reply(ident, None, self._hello())
        if hosts:
            peer.hosts = hosts
        self._learn_pex(msg)
        if not peer.accepted:
            self._check_peer(peer, now)
        elif ident is not None:
            self._reply(ident, None, P.Bitfield.of(self.scheduler.have, len(self.manifest.pieces)))

    def _learn_pex(self, msg: P.Hello) -> None:
        if not self.config.pex:
            return
        for entry in _list_field(msg.data, "peers")[:_MAX_PEX]:
            if (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[1], str)
                and isinstance(entry[2], int)
                and 0 < entry[2] < 65536
                and entry[0] != self.id
                and entry[0] not in self._peers
                and (entry[1], entry[2]) not in self._candidates
                and len(self._pex_candidates) < _MAX_PEX_CANDIDATES
                and len(self._candidates) < MAX_CANDIDATES
            ):
                self._candidates[(entry[1], entry[2])] = ""
                self._pex_candidates.add((entry[1], entry[2]))

    def _ask_manifest(self, peer: _Peer, now: float) -> None:
        if not peer.manifest_asked:
            peer.manifest_asked = True
            self._send(peer, P.ManifestQuery(), now)

    def _check_peer(self, peer: _Peer, now: float) -> None:
        """Accept the peer once its manifest (and, for a leecher, the checksums) are known to match."""
        h = peer.hello
        if h.manifest_digest != self.manifest.digest:
            self._ask_manifest(peer, now)  # only to report a readable difference
            return
        if h.content_digest and not self.codec.authenticated:
            self._vote(peer.id, h.content_digest, now)
        if (
            h.content_digest
            and self.checksums is not None
            and h.content_digest != content_digest(self.checksums)
        ):
            self._refuse(peer, "holds different bytes for the same manifest (another checkpoint?)")
            return
        if self.checksums is None:
            if h.content_digest:
                self._ask_manifest(peer, now)
            return  # a leecher without checksums: wait for one that has them
        self._accept(peer, now)

    def _on_manifest(self, peer: _Peer, msg: P.ManifestReply, now: float) -> None:
        try:
            # Compared in wire form: a peer's manifest is never cut into pieces here, so an answer costs
            # at most the size of our own manifest, whatever piece count it claims.
            difference = self.manifest.diff_wire(msg.manifest)
        except ManifestError as e:
            self._refuse(peer, f"sent a malformed manifest: {e}")
            return
        if difference is not None:
            self._note_mismatch(peer.id, difference)
            self._refuse(peer, f"holds a different manifest: {difference}")
            return
        if len(msg.checksums) != len(self.manifest.pieces) or (
            peer.hello.content_digest and content_digest(msg.checksums) != peer.hello.content_digest
        ):
            self._refuse(peer, "sent checksums that do not match its content digest")
            return
        if self.checksums is None:
            if self.codec.authenticated:
                self._adopt(list(msg.checksums), now)  # a token holder is trusted with the checksums
            elif peer.hello.content_digest and (
                peer.hello.content_digest in self._offered or len(self._offered) < _MAX_OFFERED
            ):
                self._offered.setdefault(peer.hello.content_digest, list(msg.checksums))
                self._decide(now)
            return
        if msg.checksums != self.checksums:
            self._refuse(peer, "holds different bytes for the same manifest (another checkpoint?)")
            return
        if not peer.accepted and not peer.refused:
            self._accept(peer, now)

    def _adopt(self, checksums: list[str], now: float) -> None:
        """Take these piece checksums as the truth, then accept (or refuse) every peer waiting for them."""
        self.checksums = checksums
        self.transport.set_checksums(checksums)
        for other in list(self._peers.values()):
            if not other.accepted and not other.refused:
                self._check_peer(other, now)
        # Leechers that met this node before it had checksums are waiting for a peer that has them:
        # a new Hello (with the content digest, and this node's peers, the seed among them) lets
        # them take the checksums from here and dial the seed even if they missed its mDNS answer
        # (a responder multicasts a record at most once a second, RFC 6762 section 6).
        hello = self._hello()
        for other in list(self._peers.values()):
            if not other.refused and not other.hello.content_digest:
                self._send(other, hello, now)

    # --- open swarm: which checksums to believe ---------------------------------------------------

    def _vote(self, peer_id: str, digest: str, now: float) -> None:
        if peer_id not in self._votes and len(self._votes) >= _MAX_VOTES:
            return
        self._votes[peer_id] = digest
        if self._first_vote is None:
            self._first_vote = now
        if self.checksums is not None and self._fetching and not self.complete:
            ours = content_digest(self.checksums)
            if not self._majority(ours):
                self._fail_fetch(self._disagreement())

    def _majority(self, digest: str) -> bool:
        held = sum(1 for d in self._votes.values() if d == digest)
        return held > len(self._votes) - held

    def _decide(self, now: float) -> None:
        """Open swarm, no checksums yet: take those of the digest a strict majority of the members met
        announce, once two of them agree or after `_OPEN_QUORUM_S` (see docs/reliability.md)."""
        if self.checksums is not None or self.codec.authenticated or self._first_vote is None:
            return
        for digest, checksums in self._offered.items():
            agree = sum(1 for d in self._votes.values() if d == digest)
            waited = now - self._first_vote >= min(_OPEN_QUORUM_S, self.config.discovery_timeout_s / 2)
            if self._majority(digest) and (agree >= 2 or waited):
                log.warning(
                    "open swarm (no SWARM_TOKEN): using the checksums %d of the %d members met agree on",
                    agree,
                    len(self._votes),
                )
                self._adopt(checksums, now)
                return

    def _disagreement(self) -> ManifestMismatchError:
        counts: dict[str, int] = {}
        for d in self._votes.values():
            counts[d] = counts.get(d, 0) + 1
        shown = ", ".join(f"{n} member(s) hold content {d[:12]}" for d, n in sorted(counts.items()))
        return ManifestMismatchError(
            f"the members of {self.key.describe()} disagree on its bytes, and no content has a majority",
            difference=shown,
            hint="this swarm is open (no SWARM_TOKEN), so anyone on the LAN can join it; set SWARM_TOKEN "
            "(or SWARM_TOKEN_FILE) on every instance; the loader falls back to disk",
        )

    def _accept(self, peer: _Peer, now: float) -> None:
        peer.accepted = True
        self.scheduler.peer_joined(peer.id, now)
        if peer.early_have:
            self.scheduler.peer_bitfield(peer.id, peer.early_have, now)
            peer.early_have = set()
        # Set the data channel up now, so that it is ready by the time the first request goes out
        # (NCCL communicators take a fraction of a second).
        self._maybe_connect_data(peer)
        self._send(peer, P.Bitfield.of(self.scheduler.have, len(self.manifest.pieces)), now)
        log.debug("accepted peer %s (%s)", peer.name, peer.hello.role)

    def _note_mismatch(self, who: str, why: str) -> None:
        """Remember why a member is unusable (for the fetch's error); bounded against floods."""
        if who in self._mismatches or len(self._mismatches) < _MAX_MISMATCHES:
            self._mismatches[who] = why

    def _refuse(self, peer: _Peer, why: str) -> None:
        log.warning("not using peer %s: %s", peer.name, why)
        peer.refused = why
        if peer.id not in self._mismatches:
            self._note_mismatch(peer.id, why)
        for dial in list(peer.dials):
            self._close_dial(dial, backoff=False, forever=True)

    def _on_error(self, peer: _Peer, msg: P.Error, now: float) -> None:
        log.warning("peer %s answered %s: %s", peer.name, msg.code, msg.message)
        if msg.code in ("wrong_key", "wrong_transport", "auth"):
            self._refuse(peer, msg.message)

    def _maybe_connect_data(self, peer: _Peer) -> None:
        if self.complete or peer.data_connected or not peer.accepted:
            return
        params = dict(peer.hello.data)
        params["host"] = peer.hosts[0] if peer.hosts else ""
        try:
            self.transport.connect(peer.id, params)
            peer.data_connected = True
        except SwarmError as e:
            self._refuse(peer, str(e))

    # --- decisions --------------------------------------------------------------------------------

    def _apply(self, decisions: list[Any], now: float) -> None:
        for d in decisions:
            if isinstance(d, HandedOut):
                self._out_handed.append(d.piece)
                continue
            peer = self._peers.get(d.peer)
            if peer is None:
                continue
            if isinstance(d, Request):
                self._maybe_connect_data(peer)
                self.transport.expect(peer.id, d.piece)
                if not self.transport.one_sided(peer.id):  # a one-sided path reads without asking
                    self._outbox(peer.id).request[d.piece] = None
            elif isinstance(d, Cancel):
                self.transport.unexpect(peer.id, d.piece)
                if not self.transport.one_sided(peer.id):
                    box = self._outbox(peer.id)
                    if d.piece in box.request:
                        del box.request[d.piece]  # withdrawn before it left: the peer never hears of it
                    else:
                        box.cancel[d.piece] = None
            elif isinstance(d, Serve):
                if self.transport.has_channel(peer.id):
                    self.transport.send(peer.id, d.piece)
                else:
                    self._outbox(peer.id).busy[d.piece] = None  # the data channel is not ready
                    self._apply(self.scheduler.upload_finished(peer.id, d.piece, now, False), now)
            elif isinstance(d, Refuse):
                box = self._outbox(peer.id)
                (box.busy if d.reason == "busy" else box.refused)[d.piece] = None

    def _drain_events(self, now: float) -> None:
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(ev, _Received):
                self._on_received(ev.peer, ev.piece, now)
            elif isinstance(ev, _Failed):
                self.metrics.failed(ev.reason)
                failed = self._peers.get(ev.peer)
                if failed is not None:
                    self.scheduler.piece_failed(ev.peer, ev.piece, now, ev.reason)
                    if ev.reason == "bad_checksum":
                        failed.failures += 1
                        log.warning("piece %d from %s failed its checksum", ev.piece, failed.name)
            elif isinstance(ev, _Sent):
                to = self._peers.get(ev.peer)
                if ev.ok:
                    n = self.manifest.pieces[ev.piece].length
                    self.bytes_out += n
                    if to is not None:
                        to.bytes_to += n
                        self.metrics.sent(self._path(ev.peer), to.hello.role, n)
                if to is not None:
                    self._apply(self.scheduler.upload_finished(ev.peer, ev.piece, now, ev.ok), now)
            elif isinstance(ev, _Closed):
                peer = self._peers.get(ev.peer)
                if peer is not None:
                    self._drop_peer(peer, ev.reason, now)
            elif isinstance(ev, _Notify):
                self._notify(ev.peer, ev.msg, now)
            elif isinstance(ev, _Dns):
                self._on_dns(ev.found)
            else:
                self._become_seed(ev.checksums, now)

    def _on_received(self, peer_id: str, piece: int, now: float) -> None:
        if self.scheduler.has(piece):
            return  # an endgame duplicate: same verified bytes
        n = self.manifest.pieces[piece].length
        peer = self._peers.get(peer_id)
        if peer is None:
            return  # the peer was dropped meanwhile: the piece is fetched again (same verified bytes)
        peer.bytes_from += n
        self.bytes_in += n
        self.metrics.received(self._path(peer_id), peer.hello.role, n)
        decisions = self.scheduler.piece_received(peer_id, piece, now)
        with self._cv:
            self._held_bytes += n
            self._last_progress = now
            self._cv.notify_all()
        self._apply(decisions, now)
        self._out_have.append(piece)
        if self.scheduler.complete:
            self._finish_fetch(now)

    def _path(self, peer_id: str) -> str:
        """How bytes move to and from this peer (tcp, ipc, nccl), for the metrics."""
        return self.transport.path(peer_id) or self.transport.name

    def _peer_states(self) -> dict[str, int]:
        peers = list(self._peers.values())
        return {
            "dialing": len([d for d in self._dials.values() if d.peer is None]),
            "handshaking": len([p for p in peers if not p.accepted and not p.refused]),
            "accepted": len([p for p in peers if p.accepted]),
            "refused": len([p for p in peers if p.refused]),
        }

    def _finish_fetch(self, now: float) -> None:
        self._seeding_since = time.monotonic()
        with self._cv:
            self.complete = True
            self._cv.notify_all()
        log.info("swarm node %s holds the whole model; serving as a seed", self.id)
        if self._advertiser is not None:
            self._advertiser.update(role="seed")

    def _become_seed(self, checksums: list[str], now: float) -> None:
        self._seeding_since = time.monotonic()
        self.checksums = checksums
        self.transport.set_checksums(checksums)
        self.scheduler = self._new_scheduler(True)
        with self._cv:
            self._held_bytes = self.manifest.total_bytes
            self.complete = True
            self._cv.notify_all()
        if self._advertiser is not None:
            self._advertiser.update(role="seed")
        for peer in list(self._peers.values()):
            if peer.refused:
                continue
            peer.accepted = False
            self._check_peer(peer, now)
            self._send(peer, self._hello(), now)

    # --- sending ----------------------------------------------------------------------------------

    def _outbox(self, peer_id: str) -> _Outbox:
        box = self._out.get(peer_id)
        if box is None:
            box = self._out[peer_id] = _Outbox()
        return box

    def _notify(self, peer_id: str, msg: P.Message, now: float) -> None:
        """A transport's control message: a completion joins the peer's next Batch, others leave now."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if isinstance(msg, P.Sent) and msg.ok:
            self._outbox(peer_id).sent.append(msg.piece)
        else:
            self._send(peer, msg, now)

    def _flush(self, now: float) -> None:
        """Send this turn's piece events: one Batch per peer (more only past `MAX_BATCH` a list)."""
        have, handed, out = self._out_have, self._out_handed, self._out
        if not (have or handed or out):
            return
        self._out_have, self._out_handed, self._out = [], [], {}
        shared: list[tuple[P.Batch, bytes]] | None = None  # for peers that get only the broadcast part
        for peer in list(self._peers.values()):
            box = out.get(peer.id)
            news = peer.accepted and bool(have or handed)
            if box is None:
                if news:
                    if shared is None:
                        shared = [(b, P.pack(b)) for b in _batches(have, handed)]
                    for b, payload in shared:
                        self._send(peer, b, now, payload)
            else:
                h, ho = (have, handed) if news else ([], [])
                lists = (box.cancel, box.request, box.sent, box.busy, box.refused)
                for b in _batches(h, ho, *map(list, lists)):
                    self._send(peer, b, now)

    def _send(self, peer: _Peer, msg: P.Message, now: float, payload: bytes | None = None) -> None:
        """Send on the peer's first live link, sealed by that link's session (`payload`: `msg` packed
        already, when one message goes to many peers)."""
        payload = P.pack(msg) if payload is None else payload
        peer.last_sent = now
        for dial in peer.dials:
            if dial.sock in self._dials:
                try:
                    dial.sock.send(dial.session.seal(payload), zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("control queue to %s is full; dropping %s", peer.name, msg.TYPE)
                return
        for ident in peer.idents:
            session = self._sessions.get(ident)
            if session is None or not session.established:
                continue
            assert self._router is not None
            try:
                self._router.send_multipart([ident, session.seal(payload)], zmq.NOBLOCK)
            except zmq.Again:
                log.warning("control queue to %s is full; dropping %s", peer.name, msg.TYPE)
            return

    def _reply(self, ident: bytes | None, dial: _Dial | None, msg: P.Message) -> None:
        try:
            if ident is not None:
                assert self._router is not None
                self._router.send_multipart([ident, self._session_of(ident).encode(msg)], zmq.NOBLOCK)
            elif dial is not None:
                dial.sock.send(dial.session.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("reply %s not sent: %s", msg.TYPE, e)

    def _say_goodbye(self) -> None:
        now = time.monotonic()
        for peer in list(self._peers.values()):
            try:
                self._send(peer, P.Goodbye("closing"), now)
            except zmq.ZMQError:
                pass

    # --- peers and dials --------------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        self._discover()
        if not self.complete:
            self._dial_candidates(now)
        for dial in list(self._dials.values()):
            if dial.peer is None and now - dial.started > self.config.peer_timeout_s:
                self._close_dial(dial, backoff=True)
                addr = (dial.host, dial.port)
                if addr in self._pex_candidates:  # learnt from a peer and never answered: forget it
                    self._pex_candidates.discard(addr)
                    self._candidates.pop(addr, None)
        if len(self._dial_after) > 4 * MAX_CANDIDATES:
            self._dial_after = {a: t for a, t in self._dial_after.items() if t > now or a in self._candidates}
        for peer in list(self._peers.values()):
            if now - peer.last_seen > self.config.peer_timeout_s:
                self._drop_peer(peer, f"silent for {self.config.peer_timeout_s:.0f} s", now)
            elif now - peer.last_sent > self.config.peer_timeout_s / 3:
                self._send(peer, P.Ping(), now)
        if self._guard is not None:
            self._guard.sweep(now, self._is_member)
        if len(self._peers) >= MAX_PEERS:
            self._make_room(now)
        self._sample_rates(now)
        self.metrics.update(self._peer_states(), self._seeding_since)
        if self.checksums is None:
            self._decide(now)
        if self._fetching and not self.complete:
            self._check_fetch(now)

    def _make_room(self, now: float) -> None:
        """At the peer cap, free a slot that does nobody any good, at most one per _ROTATE_S: a refused
        peer; for a complete node, a complete peer (neither needs the other, and the slot lets a leecher
        in); for a fetching node whose missing pieces no peer holds, the peer that gave it least, so it
        can dial others (without this, a member whose peer set lacks a piece would stall with the cap
        full: found with 7 members under a cap of 3)."""
        if now < self._next_rotation:
            return
        victim = next((p for p in self._peers.values() if p.refused), None)
        accepted = [p for p in self._peers.values() if p.accepted]
        total = len(self.manifest.pieces)
        if victim is None and self.complete:
            victim = next((p for p in accepted if self.scheduler.peer_stats(p.id).held == total), None)
        starved = self._unavailable_since is not None and (
            now - self._unavailable_since > self.config.discovery_timeout_s / 2
        )
        if victim is None and not self.complete and starved and accepted:
            victim = min(accepted, key=lambda p: p.bytes_from)
        if victim is None:
            return
        self._next_rotation = now + _ROTATE_S
        self._send(victim, P.Goodbye("making room for other peers"), now)
        addrs = [(d.host, d.port) for d in victim.dials]
        self._drop_peer(victim, "dropped to make room for other peers", now)
        for addr in addrs:
            self._dial_after[addr] = now + _BUSY_BACKOFF_S
        if len(self._shunned) > 4 * MAX_PEERS:
            self._shunned = {k: t for k, t in self._shunned.items() if t > now}
        self._shunned[victim.id] = now + _BUSY_BACKOFF_S  # its Hello meanwhile is answered "busy"

    def _is_member(self, ident: bytes) -> bool:
        """A ROUTER identity that belongs to a peer this node keeps (its connection is not a stranger's)."""
        return ident in self._by_ident

    def _dial_news(self, now: float) -> None:
        """Dial peers found since the last look (mDNS or peer exchange) now, not at the next housekeeping."""
        generation = self._browser.generation if self._browser is not None else 0
        if generation == self._seen_generation and len(self._candidates) == self._seen_candidates:
            return
        self._seen_generation = generation
        self._discover()
        self._seen_candidates = len(self._candidates)
        if not self.complete:
            self._dial_candidates(now)

    def _discover(self) -> None:
        if self._browser is None:
            return
        from swarm import discovery

        for ad in self._browser.peers():
            if ad.instance_id == self.id or ad.instance_id in self._peers:
                continue
            host = ad.host or discovery.pick_host(list(ad.addresses))
            addr = (host, ad.control_port)
            if host and (addr in self._candidates or len(self._candidates) < MAX_CANDIDATES):
                self._candidates.setdefault(addr, ad.instance_id)

    def _dial_candidates(self, now: float) -> None:
        assert self._ctx is not None
        dialing = {(d.host, d.port) for d in self._dials.values()}
        for addr, known_id in list(self._candidates.items()):
            if addr in dialing or self._dial_after.get(addr, 0.0) > now:
                continue
            if (
                known_id
                and known_id in self._peers
                and (self._peers[known_id].dials or self._peers[known_id].refused)
            ):
                continue
            if known_id == self.id or (addr[0] in self.addresses and addr[1] == self.control_port):
                continue
            if len(self._dials) >= MAX_DIALS or len(self._peers) >= MAX_PEERS:
                return
            sock = self._ctx.socket(zmq.DEALER)
            _limit_control_socket(sock, self.frame_limit, self.config.peer_timeout_s)
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            if ":" in addr[0]:
                sock.setsockopt(zmq.IPV6, 1)
            try:
                sock.connect(f"tcp://{host}:{addr[1]}")
            except zmq.ZMQError as e:  # an address a peer made up (" ", "[") : never dial it again
                sock.close(0)
                log.debug("not dialling %s:%d: %s", addr[0], addr[1], e)
                self._candidates.pop(addr, None)
                self._pex_candidates.discard(addr)
                continue
            dial = _Dial(addr[0], addr[1], sock, now, P.Session(self.codec, self.identity, dialer=True))
            self._dials[sock] = dial
            sock.send(dial.session.open(), zmq.NOBLOCK)  # Hello follows once the session is up
            self._dial_after[addr] = now + _DIAL_BACKOFF_S

    def _close_dial(self, dial: _Dial, *, backoff: bool, forever: bool = False) -> None:
        self._dials.pop(dial.sock, None)
        dial.sock.close(0)
        addr = (dial.host, dial.port)
        if forever:
            self._dial_after[addr] = float("inf")
        elif backoff:
            self._dial_after[addr] = time.monotonic() + _DIAL_BACKOFF_S
        if dial.peer and dial.peer in self._peers:
            peer = self._peers[dial.peer]
            if dial in peer.dials:
                peer.dials.remove(dial)

    def _drop_peer(self, peer: _Peer, why: str, now: float) -> None:
        log.info("peer %s gone: %s", peer.name, why)
        self._peers.pop(peer.id, None)
        for ident in peer.idents:
            self._by_ident.pop(ident, None)
            self._sessions.pop(ident, None)
        for dial in list(peer.dials):
            self._close_dial(dial, backoff=True)
        self.transport.drop(peer.id)
        if peer.bytes_from:
            _, before = self._gone_from.get(peer.id, ("", 0))
            self._gone_from[peer.id] = (peer.name, before + peer.bytes_from)
        if peer.accepted:
            self._apply(self.scheduler.peer_left(peer.id, now), now)

    # --- fetch supervision ------------------------------------------------------------------------

    def _check_fetch(self, now: float) -> None:
        cfg = self.config
        accepted = [p for p in self._peers.values() if p.accepted]
        elapsed = now - self._fetch_started
        if elapsed > cfg.deadline_s:
            self._fail_fetch(self._stall(f"the fetch passed its deadline of {cfg.deadline_s:.0f} s"))
        elif not accepted and self.scheduler.held_count == 0 and elapsed > cfg.discovery_timeout_s:
            if self._votes and not any(self._majority(d) for d in set(self._votes.values())):
                self._fail_fetch(self._disagreement())
            elif self._mismatches:
                # Members were found, but every one holds something else (another key, manifest,
                # content or transport): say what, rather than "no seed".
                first = next(iter(self._mismatches.items()))
                self._fail_fetch(
                    ManifestMismatchError(
                        f"no usable peer of {self.key.describe()}: "
                        f"{len(self._mismatches)} found, all refused",
                        difference=f"{first[0]}: {first[1]}",
                    )
                )
            else:
                self._fail_fetch(
                    NoSeedError(
                        f"no seed of {self.key.describe()} found within {cfg.discovery_timeout_s:.0f} s",
                        hint="check that a seed runs with the same model and layout, that multicast reaches "
                        "this host (or set SWARM_PEERS=host:port), and SWARM_INTERFACE",
                    )
                )
        elif now - self._last_progress > cfg.stall_timeout_s:
            self._fail_fetch(self._stall(f"no piece arrived for {cfg.stall_timeout_s:.0f} s"))
        else:
            unavailable = self.scheduler.unavailable()
            if not unavailable:
                self._unavailable_since = None
            elif self._unavailable_since is None:
                self._unavailable_since = now
            elif now - self._unavailable_since > cfg.discovery_timeout_s and not self.scheduler.in_flight():
                self._fail_fetch(self._stall(f"no live peer holds {len(unavailable)} missing piece(s)"))

    def _stall(self, why: str) -> StallError:
        missing = self.scheduler.missing()
        tried = {
            p.name: sorted(self.scheduler.in_flight().get(p.id, set()))
            for p in self._peers.values()
            if p.accepted
        }
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        peers = ", ".join(tried) or "none"
        return StallError(
            f"{why}: {len(missing)} piece(s) missing ({shown}); peers: {peers}",
            missing=missing,
            tried=tried,
            hint="the loader falls back to disk",
        )

    def _fail_fetch(self, error: SwarmError) -> None:
        with self._cv:
            if self._fetching and self._fetch_error is None:
                self._fetch_error = error
            self._cv.notify_all()

    # --- rates and teardown -----------------------------------------------------------------------

    def _sample_rates(self, now: float) -> None:
        self._rate_samples.append((now, self.bytes_in, self.bytes_out))
        while len(self._rate_samples) > 2 and now - self._rate_samples[0][0] > 3.0:
            self._rate_samples.pop(0)

    def _rates(self, now: float) -> tuple[float, float]:
        samples = list(self._rate_samples)
        if len(samples) < 2:
            return 0.0, 0.0
        (t0, i0, o0), (t1, i1, o1) = samples[0], samples[-1]
        dt = max(t1 - t0, 1e-3)
        return round((o1 - o0) / dt), round((i1 - i0) / dt)

    def _teardown(self) -> None:
        if getattr(self, "_torn_down", False):
            return
        self._torn_down = True
        if self._dns is not None:
            self._dns.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.metrics.close()
        for closer in (self._advertiser, self._browser):
            if closer is not None:
                try:
                    closer.close()
                except SwarmError as e:
                    log.warning("discovery close: %s", e)
        self.transport.close()
        for dial in list(self._dials.values()):
            dial.sock.close(0)
        self._dials.clear()
        if self._guard is not None:
            self._guard.close()
        if self._router is not None:
            self._router.close(0)
        if self._ctx is not None:
            self._ctx.term()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fail_fetch(FetchError("the node was closed"))


def _batches(have: list[int], handed: list[int], *others: list[int]) -> list[P.Batch]:
    """One Batch of these lists (have, handed, then the per-peer ones in `Batch`'s order; missing ones
    empty), or several when a list is longer than the protocol's bound."""
    lists = (have, handed, *others, *([] for _ in range(len(P.Batch.SCHEMA) - 2 - len(others))))
    n = max(map(len, lists))
    step = P.MAX_BATCH
    if n <= step:
        return [P.Batch(*lists)]
    return [P.Batch(*(x[i : i + step] for x in lists)) for i in range(0, n, step)]


def _registered(poller: zmq.Poller) -> list[Any]:
    return [s for s, _ in poller.sockets]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _list_field(data: Mapping[str, Any], name: str) -> list[Any]:
    """A list field of a peer's Hello.data; [] when missing or not a list (the protocol only checks that
    `data` is a bounded plain map, so its fields are as the peer sent them)."""
    value = data.get(name)
    return value if isinstance(value, list) else []


def _own_addresses(bind: str) -> list[str]:
    """Addresses peers can reach this node at: the bind address, or every usable local IPv4 address."""
    if bind not in ("0.0.0.0", "::"):
        return [bind]
    from swarm import discovery

    addrs = [str(a.ip) for i in discovery.local_interfaces() if i.up for a in i.addresses if a.version == 4]
    ordered = [a for a in addrs if not a.startswith(("127.", "169.254."))] + ["127.0.0.1"]
    return list(dict.fromkeys(ordered))


def _interface_address(interface: str) -> str:
    """The IPv4 address to bind for SWARM_INTERFACE (a name such as eth0, or an address)."""
    from swarm import discovery

    interfaces = discovery.local_interfaces()
    for iface in interfaces:
        for a in iface.addresses:
            if str(a.ip) == interface or (iface.name == interface and a.version == 4):
                return str(a.ip)
    names = ", ".join(f"{i.name} ({', '.join(str(a.ip) for a in i.addresses)})" for i in interfaces)
    raise ConfigError(f"no IPv4 address on interface {interface!r}", hint=f"available: {names or 'none'}")
