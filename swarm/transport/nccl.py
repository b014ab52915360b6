"""GPU transport: pieces move between GPUs over NCCL point-to-point, one 2-rank communicator a direction.

Shape
-----
- A *channel* is one direction between two nodes: a 2-rank NCCL communicator in which rank 0 only sends
  and rank 1 only receives, with its own CUDA stream on each side. A pair that downloads both ways has
  two channels. One direction a communicator keeps the order of operations defined by one side (the
  sender), so two peers that serve each other at the same time cannot deadlock on crossed send/recv
  order, and no global process group exists (nothing else in the process is touched; vLLM's own NCCL
  groups are independent).
- Set-up runs through the control plane: the receiver (`connect`) creates the NCCL unique id, starts its
  rank in non-blocking mode and sends the id to the seed in a `Channel` message (op "open"); the seed
  starts rank 0 on receipt (the receiver repeats "open" every second until the channel is up, since the
  control plane may drop a message, and the seed ignores copies). Both ranks then post a 4-byte warm-up
  transfer so that NCCL's lazy connection set-up is paid before the first piece, not during it. All of
  this overlaps with the control handshake (manifest, bitfields), and with transfers from peers already
  connected.
- "Sending piece p now": NCCL needs the receiver to post the matching receive. The seed decides the
  order: when it issues piece p on a channel it sends `Channel(op="piece", cid, seq, piece)` and
  enqueues `ncclSend` at once; the receiver enqueues `ncclRecv` in `seq` order when the message arrives.
  Requests are pipelined by the scheduler, so the signal for piece n+1 travels while piece n moves and
  the link never waits for the control plane. Receiver-driven ordering (post a receive per request)
  was rejected: a seed that rejects, reorders or cancels would leave a receive posted that never
  matches, which can only be cleared by aborting the communicator.
- Memory: a piece that is one contiguous byte range (most bytes of a model) is sent straight from the
  seed's parameter memory and received straight into the leecher's; a piece of packed small tensors is
  gathered into a staging buffer on the sender's stream and received into a staging buffer. Every piece
  is verified on the GPU (swarm.manifest checksum, on a side stream so that the next receive is not held
  up) before it is reported; a staging buffer is scattered into the parameters only after it verified.
  Bytes of a piece that already verified are never written by a receive: a second copy of a piece in
  flight (endgame duplicates, unsolicited or repeated pieces) always lands in a staging buffer.
- Several transfers run at once: each channel has its own stream, and `pipeline` operations may be
  queued on one channel's stream (the GPU runs them back to back).
- Failure: every wait is bounded (`init_timeout`, `op_timeout`); a channel that fails or times out is
  aborted with `ncclCommAbort` (never a blocking destroy), its outstanding pieces are reported failed,
  the peer is reported `closed`, and the abort plus the wait for the streams run on a background thread.
- Serving politely: `rate_limit` (bytes/s over all sending channels, paced per piece) and `max_ctas`
  (NCCL's cap on the thread blocks, hence SMs, one communicator's kernels take) bound what serving takes
  from the inference that runs on the same GPU. Both also read SWARM_NCCL_RATE_GBPS and
  SWARM_NCCL_MAX_CTAS.

Binding
-------
A thin ctypes binding of libnccl (the very library torch loaded, found through /proc/self/maps, else
the nvidia-nccl package) rather than one c10d ProcessGroupNCCL per pair. Reasons:
- the NCCL unique id is 128 bytes that travel in our own authenticated `Channel` message; c10d needs a
  Store, i.e. a TCPStore server and port per pair (or a Python Store shim), beside the ZMQ control plane;
- non-blocking initialisation (ncclConfig_t.blocking = 0) lets a set-up whose peer vanished be aborted
  at any moment; c10d's eager init blocks its caller;
- we choose the CUDA stream of every transfer and order the checksum after it with events; c10d runs
  point-to-point on its internal streams and adds a watchdog thread per group;
- abort is one call on one communicator, with no process-wide side effects;
- both drive the same libnccl kernels, so the bandwidth cannot differ by design. bench/gpu.py's
  `binding` case measures set-up, 64 MiB-piece bandwidth and abort of both side by side; its figures
  go to docs/benchmarks.md once a machine of two GPUs or more has run it (none was lent so far).
The binding was checked against the real libnccl 2.28.9 (torch 2.11) on an H200: non-blocking init of
a one-rank communicator, a send to itself and a receive in one group, abort (tests/gpu).

Verification uses `fused_checksum_async` (swarm.transport.gpu_checksum): swarm.manifest's `wsum32`
values from one pass over the bytes (measured figures there).

Threads: one engine thread owns every communicator and stream (NCCL calls for a communicator are never
issued concurrently); the node's calls only enqueue commands; callbacks to the node come from the
engine thread; aborts run on short-lived background threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from swarm import capture
from swarm.errors import ConfigError, TransportError
from swarm.manifest import Manifest, checksum, checksum_async
from swarm.protocol import Channel, Message
from swarm.transport.base import Events, Transport
from swarm.transport.gpu_checksum import fused_checksum_async, fused_checksum_works

log = logging.getLogger("swarm.transport.nccl")

# --- settings the node should use with this transport (measured, see docs/benchmarks.md) ------------

#: Piece size for NCCL swarms. The control plane costs ~0.2-0.4 ms of CPU a piece on its busiest thread
#: while NVLink moves 64 MiB in ~0.18 ms, so 64 MiB pieces cap a leecher far below the link; with 256
#: MiB pieces the control plane's ceiling (no bytes moved) measured 269-563 GB/s per leecher on an H200.
RECOMMENDED_PIECE_SIZE = 256 << 20


def recommended_scheduler() -> Any:
    """swarm.scheduler settings for NVLink-class links: several pieces requested and uploading per peer,
    so the ~1 ms control round trip is hidden. With the general defaults (tuned on the simulator for
    slow links) the control plane's ceiling measured 52-65 GB/s per leecher at 64 MiB pieces and
    163-223 GB/s at 256 MiB; with these, 116-197 and 269-563 GB/s (1-3 leechers, H200)."""
    from swarm.scheduler import SchedulerConfig

    return SchedulerConfig(
        max_uploads=16,
        seed_max_uploads=16,
        max_upload_queue=64,
        seed_max_upload_queue=64,
        min_pipeline=4,
        max_pipeline=16,
        max_requests=32,
        pipeline_window_s=0.004,
    )


# --- a thin binding of libnccl ---------------------------------------------------------------------

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
NCCL_INT8 = 0
NCCL_UINT8 = 1
NCCL_UNIQUE_ID_BYTES = 128
_CONFIG_UNDEF_INT = -2147483648
_API_MAGIC = 0xCAFEBEEF


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


class NcclConfig(ctypes.Structure):
    """ncclConfig_t as of NCCL 2.18. Newer libraries copy `size` bytes over their own defaults and
    keep the defaults of fields added later, so this layout works with every NCCL >= 2.18."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
        ("splitShare", ctypes.c_int),
    ]


class NcclError(TransportError):
    """An NCCL call failed; `code` is the ncclResult_t."""

    def __init__(self, message: str, code: int) -> None:
        self.code = code
        super().__init__(message)


def find_libnccl() -> str:
    """The libnccl to load: $SWARM_NCCL_LIBRARY, else the one this process already loaded (torch's),
    else the nvidia-nccl package's, else the system's."""
    env = os.environ.get("SWARM_NCCL_LIBRARY")
    if env:
        return env
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if line.strip() else ""
            if "/libnccl.so" in path:
                return path
    try:
        import nvidia.nccl  # type: ignore[import-not-found]

        for base in list(nvidia.nccl.__path__):
            candidate = os.path.join(base, "lib", "libnccl.so.2")
            if os.path.exists(candidate):
                return candidate
    except ImportError:
        pass
    return ctypes.util.find_library("nccl") or "libnccl.so.2"


class Nccl:
    """The few libnccl entry points vllm-swarm uses, with checked return codes.

    ctypes releases the GIL during each call. Calls on one communicator must not run concurrently.
    """

    _instances: ClassVar[dict[str, Nccl]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise ConfigError(
                f"cannot load libnccl from {path}: {e}",
                hint="install the nvidia-nccl package matching your CUDA, or set SWARM_NCCL_LIBRARY",
            ) from e
        self.path = path
        lib = self.lib
        c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [c_int]
        lib.ncclGetVersion.argtypes = [ctypes.POINTER(c_int)]
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(NcclUniqueId)]
        lib.ncclCommInitRankConfig.argtypes = [
            ctypes.POINTER(c_void_p),
            c_int,
            NcclUniqueId,
            c_int,
            ctypes.POINTER(NcclConfig),
        ]
        lib.ncclCommGetAsyncError.argtypes = [c_void_p, ctypes.POINTER(c_int)]
        lib.ncclCommAbort.argtypes = [c_void_p]
        lib.ncclCommDestroy.argtypes = [c_void_p]
        for fn in (lib.ncclSend, lib.ncclRecv):
            fn.argtypes = [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]
        lib.ncclBroadcast.argtypes = [c_void_p, c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]
        lib.ncclGroupStart.argtypes = []
        lib.ncclGroupEnd.argtypes = []
        for fn in (
            lib.ncclGetVersion,
            lib.ncclGetUniqueId,
            lib.ncclCommInitRankConfig,
            lib.ncclCommGetAsyncError,
            lib.ncclCommAbort,
            lib.ncclCommDestroy,
            lib.ncclSend,
            lib.ncclRecv,
            lib.ncclBroadcast,
            lib.ncclGroupStart,
            lib.ncclGroupEnd,
        ):
            fn.restype = c_int
        v = ctypes.c_int()
        self._check(lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        self.version = v.value
        if self.version < 21800:
            raise ConfigError(f"libnccl {self.version} at {path} is too old", hint="NCCL >= 2.18 is needed")

    @classmethod
    def load(cls, path: str | None = None) -> Nccl:
        path = path or find_libnccl()
        with cls._lock:
            inst = cls._instances.get(path)
            if inst is None:
                inst = cls._instances[path] = cls(path)
            return inst

    def error_string(self, code: int) -> str:
        s = self.lib.ncclGetErrorString(code)
        return s.decode(errors="replace") if s else f"ncclResult {code}"

    def _check(self, rc: int, what: str) -> int:
        if rc not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            raise NcclError(f"{what} failed: {self.error_string(rc)} ({rc})", rc)
        return rc

    def unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)

    def init_rank(
        self, nranks: int, uid: bytes, rank: int, *, blocking: bool, max_ctas: int | None = None
    ) -> tuple[int, int]:
        """Start (blocking=False) or run a communicator's initialisation on the current CUDA device.
        Returns (comm handle, rc); with rc == NCCL_IN_PROGRESS poll `async_error` until it is done."""
        if len(uid) != NCCL_UNIQUE_ID_BYTES:
            raise NcclError(f"NCCL unique id of {len(uid)} bytes, expected {NCCL_UNIQUE_ID_BYTES}", 4)
        cid = NcclUniqueId()
        ctypes.memmove(ctypes.addressof(cid), uid, NCCL_UNIQUE_ID_BYTES)
        config = NcclConfig(
            ctypes.sizeof(NcclConfig),
            _API_MAGIC,
            21800,
            1 if blocking else 0,
            _CONFIG_UNDEF_INT,
            _CONFIG_UNDEF_INT,
            max_ctas if max_ctas else _CONFIG_UNDEF_INT,
            None,
            _CONFIG_UNDEF_INT,
        )
        comm = ctypes.c_void_p()
        rc = self.lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, cid, rank, ctypes.byref(config))
        if rc not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            if comm.value:
                self.lib.ncclCommAbort(comm)
            raise NcclError(f"ncclCommInitRankConfig failed: {self.error_string(rc)} ({rc})", rc)
        return int(comm.value or 0), rc

    def async_error(self, comm: int) -> int:
        state = ctypes.c_int()
        rc = self.lib.ncclCommGetAsyncError(ctypes.c_void_p(comm), ctypes.byref(state))
        self._check(rc, "ncclCommGetAsyncError")
        return state.value

    def send(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        rc = self.lib.ncclSend(
            ctypes.c_void_p(ptr), nbytes, NCCL_UINT8, peer, ctypes.c_void_p(comm), ctypes.c_void_p(stream)
        )
        return self._check(rc, "ncclSend")

    def recv(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        rc = self.lib.ncclRecv(
            ctypes.c_void_p(ptr), nbytes, NCCL_UINT8, peer, ctypes.c_void_p(comm), ctypes.c_void_p(stream)
        )
        return self._check(rc, "ncclRecv")

    def broadcast(self, comm: int, ptr: int, nbytes: int, root: int, stream: int) -> int:
        rc = self.lib.ncclBroadcast(
            ctypes.c_void_p(ptr),
            ctypes.c_void_p(ptr),
            nbytes,
            NCCL_UINT8,
            root,
            ctypes.c_void_p(comm),
            ctypes.c_void_p(stream),
        )
        return self._check(rc, "ncclBroadcast")

    def group_start(self) -> None:
        self._check(self.lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> int:
        return self._check(self.lib.ncclGroupEnd(), "ncclGroupEnd")

    def abort(self, comm: int) -> int:
        return int(self.lib.ncclCommAbort(ctypes.c_void_p(comm)))

    def destroy(self, comm: int) -> int:
        return int(self.lib.ncclCommDestroy(ctypes.c_void_p(comm)))


# --- the transport ---------------------------------------------------------------------------------

WARMUP_BYTES = 4
#: A receiver repeats its "open" this often until its channel is up (control messages can be dropped).
OPEN_RESEND_S = 1.0


@dataclass(eq=False)
class _Op:
    """One piece (or the warm-up) on a channel."""

    piece: int
    seq: int = -1
    nbytes: int = 0
    buf: torch.Tensor | None = None  # what NCCL reads or writes; holds a staging buffer alive
    direct: bool = False  # receiver: written straight into the parameters
    issued: float = 0.0
    done: torch.cuda.Event | None = None  # after the NCCL operation, on the channel stream
    checked: torch.cuda.Event | None = None  # receiver: after checksum (and copy to host)
    sums: torch.Tensor | None = None  # receiver: pinned host [s1, s2]
    copied: torch.cuda.Event | None = None  # receiver: after a verified staging buffer was scattered


@dataclass(eq=False)
class _Chan:
    peer: str
    cid: str
    sending: bool
    comm: int
    stream: torch.cuda.Stream
    side: torch.cuda.Stream | None  # receiver: verification and scatter
    created: float
    state: str = "init"  # init -> ready -> dead
    busy: _Op | None = None  # an NCCL call answered "in progress": nothing else may be issued yet
    waiting: deque[_Op] = field(default_factory=deque)  # not yet issued (sender: queued pieces;
    # receiver: "piece" signals)
    flight: deque[_Op] = field(default_factory=deque)  # issued, in stream order
    scatter: deque[_Op] = field(default_factory=deque)  # receiver: verified, being scattered
    next_seq: int = 0  # seq 0 is the warm-up
    progress_at: float = 0.0  # last time the head of `flight` moved
    ready_at: float = 0.0
    uid: bytes = b""  # receiver: the NCCL unique id it created, re-sent until the channel is up
    opened_at: float = 0.0  # receiver: when "open" was last sent


def _stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def _event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def _done(event: torch.cuda.Event) -> bool:
    return bool(event.query())  # type: ignore[no-untyped-call]


def _ops(ch: _Chan) -> list[_Op]:
    """Every piece operation a channel holds, issued or not."""
    return ([ch.busy] if ch.busy is not None else []) + list(ch.flight) + list(ch.waiting) + list(ch.scatter)


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a number") from e


class NcclTransport(Transport):
    """Pieces over NCCL point-to-point between GPUs (see the module docstring)."""

    name = "nccl"

    def __init__(
        self,
        device: torch.device | int | str | None = None,
        *,
        rate_limit: float | None = None,
        max_ctas: int | None = None,
        pipeline: int = 4,
        init_timeout: float = 60.0,
        op_timeout: float = 60.0,
        library: str | None = None,
        nccl: Nccl | None = None,
        fast_checksum: bool = True,
        token: str | None = None,
        rate_cap: float | None = None,
        io_timeout_s: float | None = None,
    ) -> None:
        """`rate_limit`: bytes/s over all sending channels (None: unlimited); `max_ctas`: NCCL's cap
        on the thread blocks of one communicator; `pipeline`: operations queued on one channel's
        stream; `library`: path of libnccl; `nccl`: an already loaded binding (tests pass a stand-in);
        `fast_checksum`: verify with `fused_checksum_async` where it works (same values).
        `token`, `rate_cap`, `io_timeout_s`: the node's names (NodeConfig); the token is not needed
        here (every channel message travels on the authenticated control plane), `rate_cap` is
        `rate_limit`, `io_timeout_s` is `op_timeout`."""
        super().__init__()
        if rate_limit is None:
            rate_limit = rate_cap
        if io_timeout_s is not None:
            op_timeout = io_timeout_s
        self._device_arg = device
        gbps = _env_float("SWARM_NCCL_RATE_GBPS")
        self.rate_limit = rate_limit if rate_limit is not None else (gbps * 1e9 if gbps else None)
        ctas = _env_float("SWARM_NCCL_MAX_CTAS")
        self.max_ctas = max_ctas if max_ctas is not None else (int(ctas) if ctas else None)
        if pipeline < 1:
            raise ConfigError(f"pipeline must be >= 1, got {pipeline}")
        self.pipeline = pipeline
        self.init_timeout = init_timeout
        self.op_timeout = op_timeout
        self._library = library
        self.nccl: Nccl | None = nccl
        self.fast_checksum = fast_checksum
        self._checksum: Callable[[Sequence[torch.Tensor]], torch.Tensor] = checksum_async
        self._gpu_checksum = True  # the manifest's algorithm is wsum32, computed on the GPU
        self.device: torch.device | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._teardowns: list[threading.Thread] = []
        # Engine-thread state.
        self._send: dict[str, _Chan] = {}
        self._recv: dict[str, _Chan] = {}
        self._orphans: dict[str, list[tuple[int, float]]] = {}  # sends asked before the channel exists
        self._dead_cids: set[str] = set()
        self._have: set[int] = set()  # pieces this transport received and verified
        self._direct: dict[int, _Op] = {}  # piece -> its receive straight into the parameters
        self._committing: set[int] = set()  # pieces whose verified staging buffer is being scattered
        self._rate_next = 0.0
        self._stats: dict[str, Any] = {
            "bytes_sent": 0,
            "bytes_received": 0,
            "pieces_sent": 0,
            "pieces_received": 0,
            "checksum_failures": 0,
            "channels_opened": 0,
            "channels_failed": 0,
            "init_s": [],
        }

    # --- set-up ------------------------------------------------------------------------------------

    def bind(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor], events: Events) -> None:
        super().bind(manifest, tensors, events)
        devices = {v.device for v in self.views if v.numel()}
        if len(devices) > 1:
            raise ConfigError(f"the tensors of one rank live on several devices: {sorted(map(str, devices))}")
        if devices:
            dev = devices.pop()
        elif self._device_arg is not None:
            dev = torch.device(self._device_arg)
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
        if isinstance(dev, int):
            dev = torch.device("cuda", dev)
        if dev.type != "cuda":
            raise ConfigError(f"the NCCL transport needs CUDA tensors, these are on {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        # Size the checksum's cached position weights once, here, for the largest piece (growing the
        # cache later would free a tensor that another stream may still read).
        self._gpu_checksum = getattr(manifest, "checksum", "wsum32") == "wsum32"
        if not self._gpu_checksum:
            log.warning(
                "manifest checksum %r is computed in host memory: every received piece is copied to the "
                "host to be verified (build GPU manifests with checksum 'wsum32')",
                manifest.checksum,
            )
        longest = max((p.length for p in manifest.pieces), default=0)
        if longest and self._gpu_checksum:
            with torch.cuda.device(dev):
                checksum_async([torch.zeros((longest + 3) // 4 * 4, dtype=torch.uint8, device=dev)])
                if self.fast_checksum and fused_checksum_works(dev):
                    self._checksum = fused_checksum_async
                torch.cuda.synchronize(dev)

    def open(self, host: str) -> dict[str, Any]:
        if self.device is None:
            raise ConfigError("bind() the transport to its tensors before open()")
        if self.nccl is None:
            self.nccl = Nccl.load(self._library)
        torch.cuda.synchronize(self.device)  # parameters written by the loader are complete
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="swarm-nccl", daemon=True)
            self._thread.start()
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": int(self.device.index or 0),
            "gpu": str(getattr(props, "uuid", props.name)),
            "hostname": socket.gethostname(),
            "nccl": self.nccl.version,
        }

    # --- the node's calls (any thread): they only enqueue ----------------------------------------

    def connect(self, peer: str, params: Mapping[str, Any]) -> None:
        self._post(lambda: self._open_recv(peer))

    def expect(self, peer: str, piece: int) -> None:
        return None  # the seed's "piece" signal drives the receive; requests need no set-up here

    def send(self, peer: str, piece: int) -> None:
        self._post(lambda: self._queue_send(peer, piece))

    def cancel(self, peer: str, piece: int) -> None:
        self._post(lambda: self._cancel(peer, piece))

    def on_message(self, peer: str, msg: Message) -> None:
        if not isinstance(msg, Channel) or msg.transport != self.name:
            return
        params = dict(msg.params)
        self._post(lambda: self._message(peer, params))

    def drop(self, peer: str) -> None:
        self._post(lambda: self._drop(peer, "dropped by the node", report=False))

    def close(self) -> None:
        thread = self._thread
        if thread is not None:
            self._post(self._close_all)
            thread.join(timeout=10.0)
            if thread.is_alive():
                log.warning("NCCL transport engine did not stop within 10 s")
        deadline = time.monotonic() + 20.0
        for t in list(self._teardowns):
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._thread = None

    def has_channel(self, peer: str) -> bool:
        """Whether `send(peer, p)` can be accepted: always, since a send asked before the peer's channel
        exists is held until it opens (bounded by `init_timeout`, then reported `sent(False)`)."""
        return True

    def unexpect(self, peer: str, piece: int) -> None:
        """A request was cancelled or refused: nothing to undo, the seed's signal drives receives."""
        return None

    def is_ready(self, peer: str) -> bool:
        """True once the channel from `peer` (opened by `connect`) has finished its set-up."""
        ch = self._recv.get(peer)
        return ch is not None and ch.state == "ready"

    def stats(self) -> dict[str, Any]:
        out = dict(self._stats)
        out["init_s"] = list(self._stats["init_s"])
        out["channels"] = {"send": sorted(self._send), "recv": sorted(self._recv)}
        out["rate_limit"] = self.rate_limit
        out["max_ctas"] = self.max_ctas
        out["checksum"] = "fused" if self._checksum is fused_checksum_async else "torch"
        return out

    def _post(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)

    # --- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        assert self.device is not None
        torch.cuda.set_device(self.device)
        capture.relax()  # never disturb a CUDA graph capture of the process we serve from
        active = False
        while not self._stop.is_set():
            # Poll every 0.2 ms while anything is under way (set-up, queued or in-flight pieces),
            # else sleep until a command arrives.
            try:
                cmd: Callable[[], None] | None = self._commands.get(timeout=0.0002 if active else 0.05)
            except queue.Empty:
                cmd = None
            try:
                while cmd is not None:
                    cmd()
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                pass
            except Exception:
                log.exception("NCCL transport command failed")
            now = time.monotonic()
            active = bool(self._orphans)
            for ch in list(self._send.values()) + list(self._recv.values()):
                try:
                    self._progress(ch, now)
                except Exception as e:
                    log.exception("NCCL channel %s to %s failed", ch.cid, ch.peer)
                    self._fail(ch, f"{type(e).__name__}: {e}")
                active = active or (
                    ch.state == "init" or ch.busy is not None or bool(ch.waiting or ch.flight or ch.scatter)
                )
            self._expire_orphans(now)

    def _events(self) -> Events:
        assert self.events is not None
        return self.events

    def _notify(self, peer: str, params: dict[str, Any]) -> None:
        try:
            self._events().notify(peer, Channel(self.name, params))
        except Exception:
            log.exception("could not send an NCCL channel message to %s", peer)

    def _new_chan(self, peer: str, cid: str, uid: bytes, sending: bool) -> _Chan:
        assert self.nccl is not None and self.device is not None
        comm, _ = self.nccl.init_rank(2, uid, 0 if sending else 1, blocking=False, max_ctas=self.max_ctas)
        ch = _Chan(
            peer=peer,
            cid=cid,
            sending=sending,
            comm=comm,
            stream=_stream(self.device),
            side=None if sending else _stream(self.device),
            created=time.monotonic(),
            uid=b"" if sending else uid,
        )
        self._stats["channels_opened"] += 1
        # The warm-up transfer is the channel's first operation on both sides (seq 0).
        ch.waiting.appendleft(_Op(piece=-1, nbytes=WARMUP_BYTES, seq=0))
        ch.next_seq = 1
        return ch

    def _open_recv(self, peer: str) -> None:
        old = self._recv.get(peer)
        if old is not None and old.state != "dead":
            return
        assert self.nccl is not None
        cid = secrets.token_hex(6)
        try:
            uid = self.nccl.unique_id()
            self._recv[peer] = ch = self._new_chan(peer, cid, uid, sending=False)
            ch.opened_at = time.monotonic()
        except TransportError as e:
            log.warning("cannot open an NCCL channel from %s: %s", peer, e)
            self._events().closed(peer, f"NCCL set-up failed: {e}")
            return
        self._notify(peer, {"op": "open", "cid": cid, "uid": uid})

    def _message(self, peer: str, params: dict[str, Any]) -> None:
        op = params.get("op")
        cid = params.get("cid")
        if not isinstance(cid, str):
            log.warning("NCCL channel message without a channel id from %s: %.200r", peer, params)
            return
        if op == "open":
            uid = params.get("uid")
            if not isinstance(uid, bytes):
                log.warning("NCCL open from %s without a unique id", peer)
                return
            old = self._send.get(peer)
            if (old is not None and old.cid == cid) or cid in self._dead_cids:
                return  # a repeated "open" of a channel this side already has (or has given up)
            if old is not None:
                self._fail(old, "peer opened a new channel", notify=False, report_closed=False)
            try:
                sender = self._new_chan(peer, cid, uid, sending=True)
            except TransportError as e:
                log.warning("cannot open an NCCL channel to %s: %s", peer, e)
                self._notify(peer, {"op": "close", "cid": cid, "reason": f"NCCL set-up failed: {e}"[:200]})
                return
            self._send[peer] = sender
            for p, _ in self._orphans.pop(peer, []):
                sender.waiting.append(_Op(piece=p))
        elif op == "piece":
            receiver = self._recv.get(peer)
            if receiver is None or receiver.cid != cid:
                if cid not in self._dead_cids:
                    log.warning("NCCL piece signal from %s for unknown channel %s", peer, cid)
                return
            seq, piece = params.get("seq"), params.get("piece")
            if type(seq) is not int or type(piece) is not int:
                self._fail(receiver, f"malformed piece signal {params!r:.200}")
                return
            receiver.waiting.append(_Op(piece=piece, seq=seq))
        elif op == "close":
            reason = str(params.get("reason", ""))[:200]
            for chans in (self._send, self._recv):
                found = chans.get(peer)
                if found is not None and found.cid == cid:
                    self._fail(found, f"peer closed the channel: {reason}", notify=False)
        else:
            log.warning("unknown NCCL channel op %r from %s", op, peer)

    def _queue_send(self, peer: str, piece: int) -> None:
        ch = self._send.get(peer)
        if ch is None or ch.state == "dead":
            self._orphans.setdefault(peer, []).append((piece, time.monotonic()))
            return
        ch.waiting.append(_Op(piece=piece))

    def _cancel(self, peer: str, piece: int) -> None:
        ch = self._send.get(peer)
        if ch is not None:
            for op in list(ch.waiting):
                if op.piece == piece:
                    ch.waiting.remove(op)
                    self._events().sent(peer, piece, False)
                    return
        orphans = self._orphans.get(peer)
        if orphans:
            for item in orphans:
                if item[0] == piece:
                    orphans.remove(item)
                    self._events().sent(peer, piece, False)
                    return

    def _expire_orphans(self, now: float) -> None:
        for peer, items in list(self._orphans.items()):
            keep = [(p, t) for p, t in items if now - t < self.init_timeout]
            for p, t in items:
                if now - t >= self.init_timeout:
                    log.warning(
                        "no NCCL channel to %s opened within %.0f s; piece %d not sent", peer, now - t, p
                    )
                    self._events().sent(peer, p, False)
            if keep:
                self._orphans[peer] = keep
            else:
                del self._orphans[peer]

    # --- progress of one channel ---------------------------------------------------------------------

    def _progress(self, ch: _Chan, now: float) -> None:
        assert self.nccl is not None
        if ch.state == "dead":
            return
        if ch.state == "init":
            state = self.nccl.async_error(ch.comm)
            if state == NCCL_IN_PROGRESS:
                if now - ch.created > self.init_timeout:
                    self._fail(ch, f"NCCL set-up did not finish within {self.init_timeout:.0f} s")
                elif not ch.sending and now - ch.opened_at > OPEN_RESEND_S:
                    # The control plane may have dropped "open" (a peer not yet accepted, say):
                    # repeat it; the sender ignores copies of a channel it already has.
                    ch.opened_at = now
                    self._notify(ch.peer, {"op": "open", "cid": ch.cid, "uid": ch.uid})
                return
            if state != NCCL_SUCCESS:
                self._fail(ch, f"NCCL set-up failed: {self.nccl.error_string(state)}")
                return
            ch.state = "ready"
            ch.ready_at = ch.progress_at = now
            self._stats["init_s"].append(round(now - ch.created, 4))
        if ch.busy is not None:
            state = self.nccl.async_error(ch.comm)
            if state == NCCL_IN_PROGRESS:
                if now - ch.busy.issued > self.op_timeout:
                    self._fail(ch, f"NCCL call did not return within {self.op_timeout:.0f} s")
                return
            if state != NCCL_SUCCESS:
                self._fail(ch, f"NCCL error: {self.nccl.error_string(state)}")
                return
            op, ch.busy = ch.busy, None
            self._enqueued(ch, op)
        elif ch.flight:
            state = self.nccl.async_error(ch.comm)
            if state not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                self._fail(ch, f"NCCL error: {self.nccl.error_string(state)}")
                return
        self._reap(ch, now)
        if ch.state != "dead":
            self._issue(ch, now)

    def _issue(self, ch: _Chan, now: float) -> None:
        assert self.nccl is not None and self.manifest is not None and self.device is not None
        while ch.busy is None and ch.waiting and len(ch.flight) < self.pipeline:
            op = ch.waiting[0]
            if ch.sending:
                if op.seq < 0:  # a piece: pace it, number it, tell the receiver
                    length = self.manifest.pieces[op.piece].length
                    if self.rate_limit:
                        if now < self._rate_next:
                            return
                        self._rate_next = max(self._rate_next, now) + length / self.rate_limit
                    op.seq = ch.next_seq
                    ch.next_seq += 1
                    op.nbytes = length
                    self._notify(ch.peer, {"op": "piece", "cid": ch.cid, "seq": op.seq, "piece": op.piece})
                ch.waiting.popleft()
                op.buf = self._source(op, ch.stream)
                rc = self.nccl.send(ch.comm, op.buf.data_ptr(), op.nbytes, 1, ch.stream.cuda_stream)
            else:
                expected = 0 if op.piece < 0 else ch.next_seq
                if op.seq != expected:
                    raise TransportError(f"piece signal out of order: seq {op.seq}, expected {expected}")
                if op.piece >= 0:
                    if not 0 <= op.piece < len(self.manifest.pieces):
                        raise TransportError(f"piece signal for piece {op.piece} outside the manifest")
                    ch.next_seq += 1
                ch.waiting.popleft()
                op.buf = self._destination(op, ch.stream)
                rc = self.nccl.recv(ch.comm, op.buf.data_ptr(), op.nbytes, 0, ch.stream.cuda_stream)
            op.issued = now
            if not ch.flight:
                ch.progress_at = now
            if rc == NCCL_IN_PROGRESS:
                ch.busy = op
                return
            self._enqueued(ch, op)

    def _source(self, op: _Op, stream: torch.cuda.Stream) -> torch.Tensor:
        """The bytes to send; a staging buffer is allocated and packed on the channel's stream."""
        assert self.manifest is not None and self.device is not None
        if op.piece < 0:
            torch.cuda.set_stream(stream)
            return torch.zeros(WARMUP_BYTES, dtype=torch.uint8, device=self.device)
        views = self.manifest.piece_views(self.views, op.piece)
        if len(views) == 1:
            return views[0]
        torch.cuda.set_stream(stream)
        buf = torch.empty(op.nbytes, dtype=torch.uint8, device=self.device)
        torch.cat(views, out=buf)
        return buf

    def _destination(self, op: _Op, stream: torch.cuda.Stream) -> torch.Tensor:
        """Where a receive lands: the parameters when nothing else may write or has verified them,
        else a staging buffer allocated on the channel's stream (which is left current)."""
        assert self.manifest is not None and self.device is not None
        if op.piece < 0:
            op.nbytes = WARMUP_BYTES
            torch.cuda.set_stream(stream)
            return torch.empty(WARMUP_BYTES, dtype=torch.uint8, device=self.device)
        piece = self.manifest.pieces[op.piece]
        op.nbytes = piece.length
        if (
            piece.zero_copy
            and op.piece not in self._have
            and op.piece not in self._direct
            and op.piece not in self._committing
        ):
            op.direct = True
            self._direct[op.piece] = op
            return self.manifest.piece_views(self.views, op.piece)[0]
        torch.cuda.set_stream(stream)
        return torch.empty(piece.length, dtype=torch.uint8, device=self.device)

    def _enqueued(self, ch: _Chan, op: _Op) -> None:
        """The NCCL operation is on the channel stream: mark its end; on a receiver, verify after it."""
        assert op.buf is not None
        op.done = _event()
        op.done.record(ch.stream)
        if not ch.sending and op.piece >= 0 and self._gpu_checksum:
            assert ch.side is not None
            # The engine thread's current stream is set per operation (set_stream costs ~3 us where
            # a `with torch.cuda.stream()` block costs ~20 us, measured on an H200 host).
            torch.cuda.set_stream(ch.side)
            ch.side.wait_event(op.done)
            sums = self._checksum([op.buf])
            op.sums = torch.empty(2, dtype=torch.int64, pin_memory=True)
            op.sums.copy_(sums, non_blocking=True)
            op.checked = _event()
            op.checked.record(ch.side)
        ch.flight.append(op)

    def _reap(self, ch: _Chan, now: float) -> None:
        """Report what finished, in order; time out a head that does not move."""
        events = self._events()
        while ch.flight:
            op = ch.flight[0]
            last = op.checked if op.checked is not None else op.done
            assert last is not None
            if not _done(last):
                if now - max(ch.progress_at, op.issued) > self.op_timeout:
                    raise TransportError(
                        f"piece {op.piece} made no progress for {self.op_timeout:.0f} s "
                        f"({'send' if ch.sending else 'receive'})"
                    )
                break
            ch.flight.popleft()
            ch.progress_at = now
            if op.piece < 0:
                continue
            if ch.sending:
                self._stats["bytes_sent"] += op.nbytes
                self._stats["pieces_sent"] += 1
                op.buf = None
                events.sent(ch.peer, op.piece, True)
            else:
                self._verified(ch, op)
        while ch.scatter and ch.scatter[0].copied is not None and _done(ch.scatter[0].copied):
            op = ch.scatter.popleft()
            self._committing.discard(op.piece)
            self._have.add(op.piece)
            op.buf = None
            self._stats["bytes_received"] += op.nbytes
            self._stats["pieces_received"] += 1
            events.received(ch.peer, op.piece)

    def _verified(self, ch: _Chan, op: _Op) -> None:
        assert self.manifest is not None and op.buf is not None
        events = self._events()
        if op.sums is not None:
            s1, s2 = (int(v) & 0xFFFFFFFFFFFFFFFF for v in op.sums.tolist())
            got = f"{s1:016x}{s2:016x}"
        else:  # a manifest with a host-memory algorithm (blake3): hash a host copy, synchronously
            if ch.side is not None:
                torch.cuda.set_stream(ch.side)
            got = checksum([op.buf], self.manifest.checksum)
        want = self.checksums[op.piece] if self.checksums is not None else None
        if op.direct and self._direct.get(op.piece) is op:
            del self._direct[op.piece]
        if want is None or got != want:
            self._stats["checksum_failures"] += 1
            op.buf = None
            if want is None:
                log.warning("piece %d from %s arrived before its checksums were known", op.piece, ch.peer)
                events.failed(ch.peer, op.piece, "error")
            else:
                log.warning(
                    "piece %d from %s: checksum mismatch (got %s, expected %s)", op.piece, ch.peer, got, want
                )
                events.failed(ch.peer, op.piece, "bad_checksum")
            return
        if op.direct or op.piece in self._have or op.piece in self._committing:
            self._have.add(op.piece)
            op.buf = None
            self._stats["bytes_received"] += op.nbytes
            self._stats["pieces_received"] += 1
            events.received(ch.peer, op.piece)
            return
        # A verified staging buffer: scatter it into the parameters, after any receive of the same
        # piece that still writes there straight, then report.
        assert ch.side is not None and op.buf is not None
        self._committing.add(op.piece)
        torch.cuda.set_stream(ch.side)
        other = self._direct.get(op.piece)
        if other is not None and other.done is not None:
            ch.side.wait_event(other.done)
        offset = 0
        for view in self.manifest.piece_views(self.views, op.piece):
            n = view.numel()
            view.copy_(op.buf[offset : offset + n])
            offset += n
        op.copied = _event()
        op.copied.record(ch.side)
        ch.scatter.append(op)

    # --- failure and tear-down ----------------------------------------------------------------------

    def _fail(self, ch: _Chan, reason: str, *, notify: bool = True, report_closed: bool = True) -> None:
        """Abort one channel (and, on a failure, the peer's other direction): report its pieces."""
        if ch.state == "dead":
            return
        ch.state = "dead"
        self._stats["channels_failed"] += 1
        log.warning("NCCL channel %s %s %s: %s", ch.cid, "to" if ch.sending else "from", ch.peer, reason)
        chans = self._send if ch.sending else self._recv
        if chans.get(ch.peer) is ch:
            del chans[ch.peer]
        self._dead_cids.add(ch.cid)
        if notify:
            self._notify(ch.peer, {"op": "close", "cid": ch.cid, "reason": reason[:200]})
        ops = (
            ([ch.busy] if ch.busy is not None else []) + list(ch.flight) + list(ch.waiting) + list(ch.scatter)
        )
        events = self._events()
        for op in ops:
            if op.piece < 0:
                continue
            if ch.sending:
                events.sent(ch.peer, op.piece, False)
            else:
                events.failed(ch.peer, op.piece, "error")
        self._abort_later(ch, ops)
        if report_closed:
            other = (self._recv if ch.sending else self._send).get(ch.peer)
            if other is not None:
                self._fail(other, reason, notify=notify, report_closed=False)
            try:
                events.closed(ch.peer, reason)
            except Exception:
                log.exception("closed() callback failed")

    def _abort_later(self, ch: _Chan, ops: list[_Op]) -> None:
        """Abort the communicator off the engine thread. Until its streams are idle, the buffers stay
        alive and the pieces it was writing stay fenced (`_direct`, `_committing`): a new receive of
        such a piece lands in staging, and a scatter of it waits for the aborted receive's event."""
        assert self.nccl is not None
        nccl = self.nccl
        for op in ch.scatter:
            self._committing.add(op.piece)

        def unfence() -> None:
            for op in ops:
                if self._direct.get(op.piece) is op:
                    del self._direct[op.piece]
                if op.copied is not None:
                    self._committing.discard(op.piece)
            ops.clear()

        def teardown() -> None:
            started = time.monotonic()
            rc = nccl.abort(ch.comm)
            if rc != NCCL_SUCCESS:
                log.warning("ncclCommAbort of channel %s returned %s", ch.cid, nccl.error_string(rc))
            deadline = started + 30.0
            for s in (ch.stream, ch.side):
                if s is None:
                    continue
                marker = _event()
                marker.record(s)
                while not _done(marker):
                    if time.monotonic() > deadline:
                        log.error("streams of aborted NCCL channel %s still busy after 30 s", ch.cid)
                        _leaked.append(ops)  # never freed, never unfenced
                        return
                    time.sleep(0.001)
            log.info("NCCL channel %s aborted in %.3f s", ch.cid, time.monotonic() - started)
            self._post(unfence)

        t = threading.Thread(
            target=self._with_device(teardown), name=f"swarm-nccl-abort-{ch.cid}", daemon=True
        )
        self._teardowns = [x for x in self._teardowns if x.is_alive()]
        self._teardowns.append(t)
        t.start()

    def _with_device(self, fn: Callable[[], None]) -> Callable[[], None]:
        device = self.device

        def run() -> None:
            if device is not None:
                torch.cuda.set_device(device)
            try:
                fn()
            except Exception:
                log.exception("NCCL tear-down failed")

        return run

    def _drop(self, peer: str, reason: str, *, report: bool) -> None:
        for chans in (self._send, self._recv):
            ch = chans.get(peer)
            if ch is not None:
                if report:
                    self._fail(ch, reason, report_closed=False)
                else:
                    self._silent_abort(ch, reason)
        self._orphans.pop(peer, None)

    def _silent_abort(self, ch: _Chan, reason: str) -> None:
        """Abort without reporting pieces (the node dropped the peer and forgets its requests)."""
        ch.state = "dead"
        chans = self._send if ch.sending else self._recv
        if chans.get(ch.peer) is ch:
            del chans[ch.peer]
        self._dead_cids.add(ch.cid)
        self._notify(ch.peer, {"op": "close", "cid": ch.cid, "reason": reason})
        ops = (
            ([ch.busy] if ch.busy is not None else []) + list(ch.flight) + list(ch.waiting) + list(ch.scatter)
        )
        self._abort_later(ch, ops)

    def _close_all(self) -> None:
        for peer in set(self._send) | set(self._recv):
            self._drop(peer, "closing", report=False)
        self._stop.set()


_leaked: list[list[_Op]] = []  # buffers of channels whose streams never went idle: never freed
