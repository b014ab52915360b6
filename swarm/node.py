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

Peers: what a frame on a link means is decided by swarm/session.py (`Members`, sans-IO): the session
handshake (nonces, Ed25519 keys, with a token MACs), the Hello checks (swarm key, manifest, content,
a data path in common chosen per pair, the peer cap), the checksums a leecher adopts (with a token from
the first matching peer; in an open swarm only by majority, failing the fetch with
`ManifestMismatchError` when none has one; docs/reliability.md, threat model), and each peer's state
(checking, accepted, refused). It returns actions; this module owns the sockets and carries them out
(`_execute`): frames onto sockets, dials closed, an accepted peer joined to the scheduler and its data
channel set up, an accepted peer's piece messages applied to the scheduler and the transport. Pieces
are checked against the checksums before they are announced (Have) or served.

Control plane: piece events leave in batches. Within one turn of the loop (everything read from the
sockets and the transport's queue, then one scheduler tick), the haves of the pieces verified, the
hand-out hints, and each peer's requests, cancels, completion signals and refusals of its requests are
collected (swarm/outbox.py), and each peer gets one `Batch` frame at the end of the turn, so the cost per
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import zmq

from swarm import metrics as _metrics
from swarm import options as _opt
from swarm import protocol as P
from swarm import session as S
from swarm.control_guard import ConnectionGuard
from swarm.errors import (
    ConfigError,
    FetchError,
    ManifestMismatchError,
    NoSeedError,
    StallError,
    SwarmError,
)
from swarm.identity import Identity
from swarm.manifest import Manifest, SwarmKey, piece_checksums
from swarm.outbox import Outbox
from swarm.scheduler import Cancel, HandedOut, Refuse, Request, Scheduler, SchedulerConfig, Serve
from swarm.transport import make_transport
from swarm.transport.base import Events, Transport

log = logging.getLogger("swarm.node")

Progress = Callable[[int, int], None]
_HOUSEKEEPING_S = 0.25
_DISCOVERY_POLL_S = 0.02
_DIAL_BACKOFF_S = 2.0
_MAX_PEX = S.MAX_PEX
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


#: Open swarm (no token): how long a leecher collects the content digests of the members it meets before
#: it takes the checksums of a digest that only one member holds (two agreeing members need no wait).
_OPEN_QUORUM_S = 1.0


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
        #: links and peers, the handshake and the checks that accept or refuse a peer (swarm/session.py)
        self.members = S.Members(
            identity=self.identity,
            codec=self.codec,
            key=key,
            manifest=self.manifest,
            checksums=piece_checksums(self.manifest, tensors) if complete else None,
            transport=self.transport.name,
            choose=self.transport.choose,
            max_peers=MAX_PEERS,
            quorum_s=min(_OPEN_QUORUM_S, c.discovery_timeout_s / 2),
        )
        self.complete = complete
        self._rng_seed = self.config.seed if self.config.seed is not None else random.randrange(1 << 30)
        self.scheduler = self._new_scheduler(complete)
        self.started_at = time.time()
        self._dials: dict[zmq.Socket[bytes], S.Link] = {}
        self._dial_after: dict[tuple[str, int], float] = {}
        self._candidates: dict[tuple[str, int], str] = {}
        self._pex_candidates: set[tuple[str, int]] = set()
        self._next_rotation = 0.0
        self.frame_limit = control_frame_limit(self.manifest)
        self._seen_generation = self._seen_candidates = 0
        self._events: queue.Queue[_Event] = queue.Queue()
        # this turn's outgoing piece events (see _flush)
        self._outbox = Outbox()
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

    @property
    def checksums(self) -> list[str] | None:
        """The checksum of every piece: known from the start (a seed), or adopted from peers."""
        return self.members.checksums

    @property
    def _peers(self) -> dict[str, S.Peer]:
        return self.members.peers

    @property
    def _mismatches(self) -> dict[str, str]:
        return self.members.mismatches

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
        self.members.offer = self.transport.offer()
        self.members.data = {**self.data_params, "addrs": self.addresses[:8], "ctl": self.control_port}
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
            link = self.members.listened(ident)
            if link is None:  # cut off after too many bad frames
                continue
            actions = self.members.receive(link, frame, now)
            if self._guard is not None and not any(isinstance(a, S.Rejected) for a in actions):
                self._guard.seen(fd, ident, now)
            self._execute(actions, now)

    def _read_dial(self, link: S.Link, now: float) -> None:
        for _ in range(1000):
            try:
                frame = link.handle.recv(zmq.NOBLOCK)  # type: ignore[attr-defined]
            except zmq.Again:
                return
            self._execute(self.members.receive(link, frame, now), now)
            if link.closed:
                return

    # --- carrying out what the session decided ------------------------------------------------------

    def _execute(self, actions: list[S.Action], now: float) -> None:
        """Carry out the session's actions (swarm/session.py), in order."""
        for a in actions:
            if isinstance(a, S.Send):
                self._put(a)
            elif isinstance(a, S.Close):
                self._close_dial(a.link, backoff=a.retry != "never", forever=a.retry == "never")
                if a.retry == "busy":
                    self._dial_after[a.link.addr] = now + _BUSY_BACKOFF_S
            elif isinstance(a, S.Deliver):
                self._on_peer_message(a.peer, a.msg, now)
            elif isinstance(a, S.ToTransport):
                self.transport.on_message(a.peer.id, a.msg)
            elif isinstance(a, S.StatusAsked):
                self._execute(self.members.reply(a.link, P.StatusReply(self.status())), now)
            elif isinstance(a, S.Met):
                if a.link.dialer:
                    self._candidates[a.link.addr] = a.peer.id
                    self._pex_candidates.discard(a.link.addr)
                self._learn_pex(a.peer.hello)
            elif isinstance(a, S.BitfieldWanted):
                bits = P.Bitfield.of(self.scheduler.have, len(self.manifest.pieces))
                self._execute(self.members.reply(a.link, bits), now)
            elif isinstance(a, S.Accepted):
                self.scheduler.peer_joined(a.peer.id, now)
                if a.early_have:
                    self.scheduler.peer_bitfield(a.peer.id, a.early_have, now)
                # Set the data channel up now, so that it is ready by the time the first request goes
                # out (NCCL communicators take a fraction of a second).
                self._maybe_connect_data(a.peer)
                self._send(a.peer, P.Bitfield.of(self.scheduler.have, len(self.manifest.pieces)), now)
            elif isinstance(a, S.Refused):
                log.warning("not using peer %s: %s", a.peer.name, a.why)
                if a.was_accepted:
                    self.transport.drop(a.peer.id)
                    self._apply(self.scheduler.peer_left(a.peer.id, now), now)
            elif isinstance(a, S.Adopted):
                self.transport.set_checksums(a.checksums)
            elif isinstance(a, S.Disagreement):
                if self._fetching and not self.complete:
                    self._fail_fetch(a.error)
            elif isinstance(a, S.Left):
                self._drop_peer(a.peer, a.why, now)

    def _put(self, send: S.Send) -> None:
        """One frame onto its link's socket; a full queue drops it (the peer's timeouts recover)."""
        link = send.link
        try:
            if link.dialer:
                if link.handle in self._dials:
                    link.handle.send(send.frame(), zmq.NOBLOCK)  # type: ignore[attr-defined]
            else:
                assert self._router is not None
                self._router.send_multipart([link.handle, send.frame()], zmq.NOBLOCK)  # type: ignore[list-item]
        except zmq.Again:
            log.warning("control queue to %s is full; dropping %s", link.peer or link.handle, send.what)
        except zmq.ZMQError as e:
            log.debug("%s not sent: %s", send.what, e)

    def _on_peer_message(self, peer: S.Peer, msg: P.Message, now: float) -> None:
        """A piece message of an accepted peer: to the scheduler and the transport."""
        if isinstance(msg, P.Batch):
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

    def _on_batch(self, peer: S.Peer, msg: P.Batch, now: float) -> None:
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
        return self.members.hello()

    def _learn_pex(self, msg: P.Hello) -> None:
        if not self.config.pex:
            return
        for entry in S.list_field(msg.data, "peers")[:_MAX_PEX]:
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

    def _maybe_connect_data(self, peer: S.Peer) -> None:
        if self.complete or peer.data_connected or not peer.accepted:
            return
        params = dict(peer.hello.data)
        params["host"] = peer.hosts[0] if peer.hosts else ""
        try:
            self.transport.connect(peer.id, params)
            peer.data_connected = True
        except SwarmError as e:
            self._execute(self.members.refuse(peer, str(e)), time.monotonic())

    # --- decisions --------------------------------------------------------------------------------

    def _apply(self, decisions: list[Any], now: float) -> None:
        for d in decisions:
            if isinstance(d, HandedOut):
                self._outbox.handed(d.piece)
                continue
            peer = self._peers.get(d.peer)
            if peer is None:
                continue
            if isinstance(d, Request):
                self._maybe_connect_data(peer)
                if not peer.accepted:  # its data channel could not be set up: refused, left
                    continue
                self.transport.expect(peer.id, d.piece)
                if not self.transport.one_sided(peer.id):  # a one-sided path reads without asking
                    self._outbox.request(peer.id, d.piece)
            elif isinstance(d, Cancel):
                self.transport.unexpect(peer.id, d.piece)
                if not self.transport.one_sided(peer.id):
                    self._outbox.cancel(peer.id, d.piece)
            elif isinstance(d, Serve):
                if self.transport.has_channel(peer.id):
                    self.transport.send(peer.id, d.piece)
                else:
                    self._outbox.refuse(peer.id, d.piece, busy=True)  # the data channel is not ready
                    self._apply(self.scheduler.upload_finished(peer.id, d.piece, now, False), now)
            elif isinstance(d, Refuse):
                self._outbox.refuse(peer.id, d.piece, busy=d.reason == "busy")

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
        self._outbox.have(piece)
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
        self.members.role = "seed"
        log.info("swarm node %s holds the whole model; serving as a seed", self.id)
        if self._advertiser is not None:
            self._advertiser.update(role="seed")

    def _become_seed(self, checksums: list[str], now: float) -> None:
        self._seeding_since = time.monotonic()
        self.transport.set_checksums(checksums)
        self.scheduler = self._new_scheduler(True)
        with self._cv:
            self._held_bytes = self.manifest.total_bytes
            self.complete = True
            self._cv.notify_all()
        if self._advertiser is not None:
            self._advertiser.update(role="seed")
        self._execute(self.members.become_seed(checksums, now), now)

    # --- sending ----------------------------------------------------------------------------------

    def _notify(self, peer_id: str, msg: P.Message, now: float) -> None:
        """A transport's control message: a completion joins the peer's next Batch, others leave now."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if isinstance(msg, P.Sent) and msg.ok:
            self._outbox.sent(peer_id, msg.piece)
        else:
            self._send(peer, msg, now)

    def _flush(self, now: float) -> None:
        """Send this turn's piece events: one Batch per peer (more only past `MAX_BATCH` a list)."""
        for peer_id, batch, payload in self._outbox.flush(
            (p.id, p.accepted) for p in list(self._peers.values())
        ):
            peer = self._peers.get(peer_id)
            if peer is not None:
                self._send(peer, batch, now, payload)

    def _send(self, peer: S.Peer, msg: P.Message, now: float, payload: bytes | None = None) -> None:
        """Send on the peer's first live link (`payload`: `msg` packed already, when one message goes to
        many peers)."""
        self._execute(self.members.send(peer, msg, now, payload), now)

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
            self._execute(self.members.decide(now), now)
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
        self.members.shun(victim.id, now + _BUSY_BACKOFF_S, now)  # its Hello meanwhile: "busy"

    def _is_member(self, ident: bytes) -> bool:
        """A ROUTER identity that belongs to a peer this node keeps (its connection is not a stranger's)."""
        return self.members.is_member(ident)

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
            link, opening = self.members.dial(sock, addr[0], addr[1], now)
            self._dials[sock] = link
            self._execute(opening, now)  # Hello follows once the session is up
            self._dial_after[addr] = now + _DIAL_BACKOFF_S

    def _close_dial(self, link: S.Link, *, backoff: bool, forever: bool = False) -> None:
        self.members.unlink(link)
        sock = self._dials.pop(link.handle, None)  # type: ignore[call-overload]
        if sock is not None:
            link.handle.close(0)  # type: ignore[attr-defined]
        if forever:
            self._dial_after[link.addr] = float("inf")
        elif backoff:
            self._dial_after[link.addr] = time.monotonic() + _DIAL_BACKOFF_S

    def _drop_peer(self, peer: S.Peer, why: str, now: float) -> None:
        if peer.state is S.PeerState.GONE:
            return
        log.info("peer %s gone: %s", peer.name, why)
        was_accepted = peer.accepted
        self._execute(self.members.forget(peer), now)
        self.transport.drop(peer.id)
        if peer.bytes_from:
            _, before = self._gone_from.get(peer.id, ("", 0))
            self._gone_from[peer.id] = (peer.name, before + peer.bytes_from)
        if was_accepted:
            self._apply(self.scheduler.peer_left(peer.id, now), now)

    # --- fetch supervision ------------------------------------------------------------------------

    def _check_fetch(self, now: float) -> None:
        cfg = self.config
        accepted = [p for p in self._peers.values() if p.accepted]
        elapsed = now - self._fetch_started
        if elapsed > cfg.deadline_s:
            self._fail_fetch(self._stall(f"the fetch passed its deadline of {cfg.deadline_s:.0f} s"))
        elif not accepted and self.scheduler.held_count == 0 and elapsed > cfg.discovery_timeout_s:
            votes = self.members.votes
            if votes and not any(self.members.majority(d) for d in set(votes.values())):
                self._fail_fetch(self.members.disagreement())
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
        for sock in list(self._dials):
            sock.close(0)
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


def _registered(poller: zmq.Poller) -> list[Any]:
    return [s for s, _ in poller.sockets]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


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
