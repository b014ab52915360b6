"""CUDA IPC transport: a member reads the pieces it wants straight out of a peer's GPU memory, one-sided.

For members on one host whose pieces live in GPU memory (the same GPU, or GPUs that reach each other by
peer access; swarm.transport.paths chooses). Shape:

- Export, once per member, when the transport opens (node start, off any reader's path): every CUDA
  storage that holds this member's tensors is shared with PyTorch's own CUDA IPC sharing
  (`UntypedStorage._share_cuda_`, what torch.multiprocessing sends between processes); the handles,
  with each tensor's (storage, offset), go in one `Channel(op="export")` to each peer that asks with
  `Channel(op="open")`. The weights are never copied into a second buffer.
- Import, once per pair, when a first piece is wanted from the peer (so the holder of the pieces wanted
  first, the seed, is mapped first, and a peer never read from is never mapped): the reader asks for the
  export, opens every storage (`UntypedStorage._new_shared_cuda`) on its own device on a thread of its
  own (the engine keeps issuing copies from other peers meanwhile), checks with the driver that every
  claimed byte is mapped (cuMemGetAddressRange: a peer that claims more bytes than it exported would
  otherwise make a copy read out of bounds and kill the reader's CUDA context) and that each tensor
  lies inside its storage.
- Pieces: `expect(peer, p)` (a request of the scheduler) is the whole transfer. The engine thread
  enqueues the copies of the piece's spans from the peer's memory into this member's tensors with
  `copy_(non_blocking=True)` on one of its own streams (a device-to-device cudaMemcpyAsync: the copy
  engines, none of the peer's SMs, no work at all in the peer's process), then the fused GPU checksum
  (swarm.transport.gpu_checksum) of the written bytes on the same stream, then an event. The piece is
  reported `received` only when the checksum matched; a mismatch is `failed(..., "bad_checksum")`. No
  request or completion message travels to the peer (`one_sided` is true), so the node sends it none.
- Verified bytes are never written again: a piece verified here is answered at once when asked again;
  a second request for a piece whose copy is under way waits for that copy (endgame duplicates cost
  nothing), and is copied itself only if the first one fails.

Why this export. Measured on an H200 (one GPU, torch 2.11, driver 580; bench/ipc_export.py, results in
bench/results/ipc-export-nvidia-h200.json): a reader mapped a 4 GiB buffer through PyTorch's sharing,
queued 50 copies of it (~100 ms of copying) and the exporter was SIGKILLed 1 ms later. For memory from
the caching allocator (legacy cudaIpc handles) and for expandable segments (PyTorch shares their cuMem
handles as file descriptors) alike: every copy completed, the copied bytes were equal, the mapping
still held the same bytes 1 s later, and a kernel ran afterwards. The mapping keeps the physical
memory alive and the reader's CUDA context is unharmed, and no copy of the weights is made, so this
sharing is used for both. The one difference seen: an expandable segment is mapped in 20 MiB chunks
(cuMemGetAddressRange answers per chunk), so the bounds check walks the chunks. tests/gpu/test_ipc.py
repeats the kill through the transport (the seed killed while a leecher copies from it). The CUDA VMM
API driven directly (file-descriptor handles without PyTorch) was not tried: nothing measured argued
for it.

Limits:
- A mapping keeps the exporter's whole allocation segment reachable by the reader (other tensors the
  caching allocator placed in it too): the path is only chosen between members of one host.
- A set-up that fails (an export that does not open here or fails its bounds check, a peer that
  cannot export, no export within `open_timeout`) is reported through `closed(peer, ...)` before any
  piece moved from that peer; swarm.transport.auto then uses TCP for that pair.
- Copies cannot be cancelled once enqueued; `drop(peer)` forgets the peer's pending requests, and the
  mapping is released when its last copy is done. `close()` waits (bounded) for every copy.
- Endgame across paths: a piece copied here straight into the tensors while another transport writes
  the same piece could, if the bytes read here fail their checksum, leave the other transport's verified
  bytes overwritten. This needs a member on our own host serving corrupt GPU memory during an endgame
  that spans two paths; it is not guarded against.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm import capture
from swarm.errors import ConfigError, TransportError
from swarm.manifest import Manifest, checksum_async
from swarm.protocol import Channel, Message
from swarm.scheduler import SchedulerConfig
from swarm.transport.base import GPU_PIECE_SIZE, Events, Transport
from swarm.transport.command_loop import CommandLoop
from swarm.transport.gpu_checksum import fused_checksum_async, fused_checksum_works

log = logging.getLogger("swarm.transport.ipc")

#: Streams the reader spreads its copies over (copy engines run several copies at once).
STREAMS = 4
_MAX_REGIONS = 1 << 16


def recommended_scheduler() -> SchedulerConfig:
    """swarm.scheduler settings for members whose pieces move GPU to GPU on one host: a piece of 256 MiB
    is copied and verified in ~0.2 ms (bench/gpu.py `ipc`), less than the node's control work for it,
    so each peer gets a deep pipeline of requests (they cost the peer nothing: it is never asked)."""
    return SchedulerConfig(
        max_uploads=16,
        seed_max_uploads=16,
        max_upload_queue=64,
        seed_max_upload_queue=64,
        min_pipeline=8,
        max_pipeline=32,
        max_requests=96,
        pipeline_window_s=0.004,
    )


@dataclass(eq=False)
class _Copy:
    piece: int
    peer: str
    stream: torch.cuda.Stream
    done: torch.cuda.Event
    sums: torch.Tensor  # pinned host [s1, s2]
    issued: float
    src: list[torch.Tensor]  # holds the peer's mapping alive until the copy is done
    late: bool = False


@dataclass(eq=False)
class _Remote:
    """One peer whose memory this member reads."""

    state: str = "idle"  # idle -> opening (asked) -> mapping (export here) -> ready | failed
    views: list[torch.Tensor] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # requests before the export arrived
    opened_at: float = 0.0


def _event() -> torch.cuda.Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


class _Driver:
    """cuMemGetAddressRange from libcuda: the allocation the driver really mapped at an address."""

    _lib: Any = None

    @classmethod
    def address_range(cls, ptr: int) -> tuple[int, int]:
        if cls._lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuMemGetAddressRange_v2
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
            fn.restype = ctypes.c_int
            cls._lib = lib
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = cls._lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
        if rc != 0:
            raise TransportError(f"cuMemGetAddressRange failed ({rc}) on an imported CUDA IPC mapping")
        return int(base.value), int(size.value)

    @classmethod
    def check_mapped(cls, ptr: int, size: int) -> None:
        """Raise unless [ptr, ptr + size) is mapped memory. A legacy cudaIpc mapping is one allocation;
        an expandable segment is mapped in chunks (20 MiB each, measured), walked one by one."""
        end, at = ptr + size, ptr
        for _ in range(size // (2 << 20) + 2):
            if at >= end:
                return
            base, length = cls.address_range(at)
            if length <= 0 or base + length <= at:
                break
            at = base + length
        if at < end:
            raise TransportError(
                f"a peer claims {size} bytes of GPU memory of which only {at - ptr} are mapped"
            )


class IpcTransport(Transport):
    """Pieces read one-sided out of a same-host peer's GPU memory (see the module docstring)."""

    name = "ipc"

    def __init__(
        self,
        device: torch.device | int | str | None = None,
        *,
        streams: int = STREAMS,
        op_timeout: float = 60.0,
        open_timeout: float = 10.0,
        fast_checksum: bool = True,
        token: str | None = None,
        rate_cap: float | None = None,
        io_timeout_s: float | None = None,
    ) -> None:
        """`streams`: CUDA streams the reader copies on; `op_timeout`: a copy not done by then closes
        its peer; `open_timeout`: the export must arrive by then. `token`, `rate_cap`, `io_timeout_s`:
        the node's names; the token is not needed (the export travels on the authenticated control
        plane), a rate cap does not apply (the reader's copy engines do the work, not the server)."""
        super().__init__()
        if streams < 1:
            raise ConfigError(f"streams must be >= 1, got {streams}")
        self._device_arg = device
        self.n_streams = streams
        self.op_timeout = io_timeout_s if io_timeout_s is not None else op_timeout
        self.open_timeout = open_timeout
        self.fast_checksum = fast_checksum
        self.device: torch.device | None = None
        self._checksum: Callable[[Sequence[torch.Tensor]], torch.Tensor] = checksum_async
        self._streams: list[torch.cuda.Stream] = []
        self._sums = torch.empty(0)
        self._next_stream = 0
        self._loop = CommandLoop("swarm-ipc", "CUDA IPC transport", log)
        self._export: dict[str, Any] | None = None
        self._export_error = ""
        self._export_lock = threading.Lock()
        self._mappers: list[threading.Thread] = []
        self._exporter: threading.Thread | None = None
        # Engine-thread state.
        self._remotes: dict[str, _Remote] = {}
        #: copies in flight, per stream in issue order (a stream completes them in that order, so only
        #: each head is polled)
        self._flight: list[deque[_Copy]] = []
        self._copying: dict[int, _Copy] = {}
        self._waiters: dict[int, list[str]] = {}  # piece -> peers whose request waits for its copy
        self._have: set[int] = set()
        self._stats: dict[str, Any] = {
            "bytes_received": 0,
            "pieces_received": 0,
            "checksum_failures": 0,
            "exports": 0,
            "imports": 0,
            "first_copy_t": 0.0,
            "last_verified_t": 0.0,
        }

    # --- set-up ------------------------------------------------------------------------------------

    def bind(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor], events: Events) -> None:
        super().bind(manifest, tensors, events)
        devices = {v.device for v in self.views if v.numel()}
        if len(devices) > 1:
            raise ConfigError(f"the tensors of one rank live on several devices: {sorted(map(str, devices))}")
        dev = devices.pop() if devices else torch.device(self._device_arg or "cuda")
        if dev.type != "cuda":
            raise ConfigError(f"the CUDA IPC transport needs CUDA tensors, these are on {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        if getattr(manifest, "checksum", "wsum32") != "wsum32":
            raise ConfigError(
                f"the CUDA IPC transport verifies pieces on the GPU; manifest checksum {manifest.checksum!r} "
                "is computed in host memory (build GPU manifests with checksum 'wsum32')"
            )
        longest = max((p.length for p in manifest.pieces), default=0)
        with torch.cuda.device(dev):
            # Size the torch checksum's cached weights once, for the largest piece (growing the cache
            # later would free a tensor another stream may still read).
            if longest:
                checksum_async([torch.zeros((longest + 3) // 4 * 4, dtype=torch.uint8, device=dev)])
            if self.fast_checksum and fused_checksum_works(dev):
                self._checksum = fused_checksum_async
            # Pinned host rows for every piece's [s1, s2]: no allocation per piece.
            self._sums = torch.empty((max(1, len(manifest.pieces)), 2), dtype=torch.int64, pin_memory=True)
            self._streams = [torch.cuda.Stream(dev) for _ in range(self.n_streams)]  # type: ignore[no-untyped-call]
            self._flight = [deque() for _ in self._streams]
            torch.cuda.synchronize(dev)

    def open(self, host: str) -> dict[str, Any]:
        if self.device is None:
            raise ConfigError("bind() the transport to its tensors before open()")
        torch.cuda.synchronize(self.device)  # tensors written by the loader are complete
        self._loop.start(self.device, self._step)
        # Export now, off the path of the first reader and of the node's start: on a thread (a reader's
        # "open" waits for it under the lock; a failure is kept and told to each reader).
        self._exporter = threading.Thread(target=self._export_quietly, name="swarm-ipc-export", daemon=True)
        self._exporter.start()
        return {}

    def _export_quietly(self) -> None:
        assert self.device is not None
        capture.relax()
        torch.cuda.set_device(self.device)
        with contextlib.suppress(TransportError):
            self._export_once()

    def _export_once(self) -> dict[str, Any]:
        """This member's export (built on first use, then the same for every peer): storages shared
        through PyTorch's CUDA IPC, and where each tensor of the manifest sits in them."""
        with self._export_lock:
            if self._export is not None:
                return self._export
            if self._export_error:
                raise TransportError(self._export_error)
            try:
                capture.relax()  # never disturb a CUDA graph capture of the process we serve from
                regions: list[list[Any]] = []
                index: dict[int, int] = {}
                tensors: list[list[int]] = []
                for v in self.views:
                    if v.numel() == 0:
                        tensors.append([-1, 0])
                        continue
                    storage = v.untyped_storage()
                    key = storage.data_ptr()
                    if key not in index:
                        if len(regions) >= _MAX_REGIONS:
                            raise TransportError(f"more than {_MAX_REGIONS} CUDA storages to export")
                        (_, handle, size, offset, ref, ref_offset, ev, ev_sync) = storage._share_cuda_()  # type: ignore[attr-defined, no-untyped-call, unused-ignore]
                        index[key] = len(regions)
                        regions.append(
                            [handle, int(size), int(offset), ref, int(ref_offset), ev, bool(ev_sync)]
                        )
                    tensors.append([index[key], v.data_ptr() - key])
            except (RuntimeError, TypeError, ValueError) as e:
                self._export_error = f"cannot export this member's GPU memory over CUDA IPC: {e}"
                raise TransportError(self._export_error) from e
            self._export = {"regions": regions, "tensors": tensors}
            self._stats["exports"] += 1
            return self._export

    # --- the node's calls (any thread): they only enqueue ----------------------------------------

    def one_sided(self, peer: str) -> bool:
        return True

    def connect(self, peer: str, params: Mapping[str, Any]) -> None:
        self._post(lambda: self._open(peer))

    def expect(self, peer: str, piece: int) -> None:
        self._post(lambda: self._expect(peer, piece))

    def unexpect(self, peer: str, piece: int) -> None:
        self._post(lambda: self._unexpect(peer, piece))

    def send(self, peer: str, piece: int) -> None:
        # One-sided: a peer reads by itself; a request that reached us anyway is answered "not sent".
        self._emit("sent", peer, piece, False)

    def cancel(self, peer: str, piece: int) -> None:
        return None

    def has_channel(self, peer: str) -> bool:
        return False

    def on_message(self, peer: str, msg: Message) -> None:
        if not isinstance(msg, Channel) or msg.transport != self.name:
            return
        params = dict(msg.params)
        op = params.get("op")
        if op == "open":  # on the node's thread: export (once) and answer at once
            try:
                export = self._export_once()
            except TransportError as e:
                self._notify(peer, {"op": "error", "reason": str(e)[:300]})
                return
            self._notify(peer, {"op": "export", **export})
        elif op in ("export", "error"):
            self._post(lambda: self._imported(peer, params))
        else:
            log.warning("unknown CUDA IPC channel op %.40r from %s", op, peer)

    def drop(self, peer: str) -> None:
        self._post(lambda: self._forget(peer))

    def close(self) -> None:
        self._loop.stop()
        deadline = time.monotonic() + max(1.0, min(self.op_timeout, 30.0))
        exporter = self._exporter
        for t in [*self._mappers, *([exporter] if exporter is not None else [])]:
            t.join(max(0.0, deadline - time.monotonic()))
        for flight in self._flight:  # mappings are released only once their copies are done
            while flight and not flight[-1].done.query() and time.monotonic() < deadline:  # type: ignore[no-untyped-call]
                time.sleep(0.001)
            flight.clear()
        self._remotes.clear()

    def default_piece_size(self, on_gpu: bool) -> int:
        return GPU_PIECE_SIZE

    def default_scheduler(self, on_gpu: bool) -> SchedulerConfig:
        return recommended_scheduler()

    def is_ready(self, peer: str) -> bool:
        """True once `peer`'s export is mapped and checked."""
        r = self._remotes.get(peer)
        return r is not None and r.state == "ready"

    def stats(self) -> dict[str, Any]:
        out = dict(self._stats)
        out["checksum"] = "fused" if self._checksum is fused_checksum_async else "torch"
        out["peers"] = sorted(self._remotes)
        return out

    def _post(self, fn: Callable[[], None]) -> None:
        self._loop.post(fn)

    def _emit(self, kind: str, *args: Any) -> None:
        if self.events is not None:
            getattr(self.events, kind)(*args)

    def _notify(self, peer: str, params: dict[str, Any]) -> None:
        try:
            self._emit("notify", peer, Channel(self.name, params))
        except Exception:
            log.exception("could not send a CUDA IPC channel message to %s", peer)

    # --- the engine thread -------------------------------------------------------------------------

    def _step(self, now: float) -> bool:
        """After each round of commands (swarm.transport.command_loop): reap finished copies; whether
        work is under way."""
        try:
            self._reap(now)
        except Exception:
            log.exception("CUDA IPC transport failed to reap copies")
        return any(self._flight) or any(r.state in ("opening", "mapping") for r in self._remotes.values())

    def _open(self, peer: str) -> None:
        """A peer to read from. Its export is asked for and mapped only when a first piece is wanted
        from it: mapping costs ~0.1 ms a storage (hundreds for a model), so the peer that holds the
        pieces wanted first (the seed) is mapped first, and peers never read from are never mapped."""
        r = self._remotes.get(peer)
        if r is None or r.state == "failed":
            self._remotes[peer] = _Remote()

    def _imported(self, peer: str, params: dict[str, Any]) -> None:
        r = self._remotes.get(peer)
        if r is None or r.state != "opening":
            return  # not asked for, or answered already
        if params.get("op") == "error":
            reason = f"CUDA IPC set-up failed: peer cannot export: {str(params.get('reason', ''))[:300]}"
            self._set_up_failed(peer, r, reason)
            return
        # Mapped on a thread of its own, so that this thread keeps issuing copies from other peers.
        r.state = "mapping"
        t = threading.Thread(
            target=self._map_in_background, args=(peer, r, params), name="swarm-ipc-map", daemon=True
        )
        self._mappers = [x for x in self._mappers if x.is_alive()] + [t]
        t.start()

    def _map_in_background(self, peer: str, r: _Remote, params: dict[str, Any]) -> None:
        assert self.device is not None
        try:
            capture.relax()
            torch.cuda.set_device(self.device)
            views = self._map(params)
        except (TransportError, RuntimeError, TypeError, ValueError) as e:
            reason = f"CUDA IPC set-up failed: {type(e).__name__}: {e}"
            self._post(lambda: self._set_up_failed(peer, r, reason) if r.state == "mapping" else None)
            return
        self._post(lambda: self._mapped(peer, r, views))

    def _mapped(self, peer: str, r: _Remote, views: list[torch.Tensor]) -> None:
        if self._remotes.get(peer) is not r or r.state != "mapping":
            return  # dropped or timed out meanwhile
        r.views = views
        r.state = "ready"
        self._stats["imports"] += 1
        self._stats["imported_t"] = self._stats.get("imported_t") or time.time()
        pending, r.pending = r.pending, []
        for piece in pending:
            self._expect(peer, piece)

    def _map(self, params: dict[str, Any]) -> list[torch.Tensor]:
        """The peer's tensors as byte views of its memory, every bound checked before any use."""
        assert self.manifest is not None and self.device is not None
        regions, tensors = params.get("regions"), params.get("tensors")
        if not isinstance(regions, list) or not isinstance(tensors, list) or len(regions) > _MAX_REGIONS:
            raise TransportError("malformed export")
        if len(tensors) != len(self.manifest.tensors):
            raise TransportError(
                f"export of {len(tensors)} tensors, the manifest has {len(self.manifest.tensors)}"
            )
        storages: list[torch.Tensor] = []
        for reg in regions:
            if not (isinstance(reg, list) and len(reg) == 7 and isinstance(reg[0], bytes)):
                raise TransportError("malformed export region")
            handle, size, offset, ref, ref_offset, ev, ev_sync = reg
            if not all(type(x) is int and x >= 0 for x in (size, offset, ref_offset)):
                raise TransportError("malformed export region")
            storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
                self.device.index, handle, size, offset, ref, ref_offset, ev, bool(ev_sync)
            )
            _Driver.check_mapped(storage.data_ptr(), size)
            flat = torch.empty(0, dtype=torch.uint8, device=self.device)
            flat.set_(storage, 0, (size,))  # type: ignore[call-overload]
            storages.append(flat)
        views = []
        for spec, entry in zip(self.manifest.tensors, tensors, strict=True):
            if not (isinstance(entry, list) and len(entry) == 2 and all(type(x) is int for x in entry)):
                raise TransportError("malformed export entry")
            region, start = entry
            if spec.nbytes == 0:
                views.append(torch.empty(0, dtype=torch.uint8, device=self.device))
                continue
            if not 0 <= region < len(storages) or start < 0 or start + spec.nbytes > storages[region].numel():
                raise TransportError(f"export places tensor {spec.name!r} outside its storage")
            views.append(storages[region][start : start + spec.nbytes])
        return views

    def _set_up_failed(self, peer: str, r: _Remote, reason: str) -> None:
        log.warning("%s: %s", peer, reason)
        r.state = "failed"
        pending, r.pending = r.pending, []
        # `closed` first: swarm.transport.auto moves the pair to TCP before the pieces are asked again.
        # They fail as "refused": no byte of the peer was looked at, so nothing counts against it (as
        # "error", a whole pipeline of failures would exclude the peer, over TCP too).
        self._emit("closed", peer, reason)
        for piece in pending:
            self._emit("failed", peer, piece, "refused")

    def _expect(self, peer: str, piece: int) -> None:
        assert self.manifest is not None
        if not 0 <= piece < len(self.manifest.pieces):
            return
        if piece in self._have:
            self._emit("received", peer, piece)
            return
        if piece in self._copying:
            waiters = self._waiters.setdefault(piece, [])
            if peer not in waiters:
                waiters.append(peer)
            return
        r = self._remotes.get(peer)
        if r is None or r.state == "failed":
            self._emit("failed", peer, piece, "error")
            return
        if r.state == "idle":
            r.state = "opening"
            r.opened_at = time.monotonic()
            self._notify(peer, {"op": "open"})
        if r.state != "ready":
            r.pending.append(piece)
            return
        self._issue(peer, r, piece)

    def _issue(self, peer: str, r: _Remote, piece: int) -> None:
        assert self.manifest is not None
        if self._exporter is not None:
            # Sharing swaps each storage's deleter: let it finish before this member's tensors are
            # written (it started at open, so this waits only on a very early first piece).
            self._exporter.join(30.0)
            if self._exporter.is_alive():
                log.warning("CUDA IPC export still running after 30 s")
            self._exporter = None
        index = self._next_stream
        stream = self._streams[index]
        self._next_stream = (index + 1) % len(self._streams)
        dst = self.manifest.piece_views(self.views, piece)
        src = self.manifest.piece_views(r.views, piece)
        torch.cuda.set_stream(stream)  # cheaper than a `with torch.cuda.stream()` block per piece
        for d, s in zip(dst, src, strict=True):
            d.copy_(s, non_blocking=True)
        sums = self._sums[piece]  # one copy of a piece at a time, so its row is free
        sums.copy_(self._checksum(dst), non_blocking=True)
        done = _event()
        done.record(stream)
        now = time.monotonic()
        copy = _Copy(piece, peer, stream, done, sums, now, src)
        if not self._stats["first_copy_t"]:
            self._stats["first_copy_t"] = time.time()
        self._flight[index].append(copy)
        self._copying[piece] = copy

    def _unexpect(self, peer: str, piece: int) -> None:
        waiters = self._waiters.get(piece)
        if waiters and peer in waiters:
            waiters.remove(peer)
        r = self._remotes.get(peer)
        if r is not None and piece in r.pending:
            r.pending.remove(piece)

    def _forget(self, peer: str) -> None:
        self._remotes.pop(peer, None)  # copies in flight keep their source views until done
        for waiters in self._waiters.values():
            if peer in waiters:
                waiters.remove(peer)

    def _reap(self, now: float) -> None:
        if not self._remotes and not any(self._flight):
            return
        for r_peer, r in list(self._remotes.items()):
            if r.state in ("opening", "mapping") and now - r.opened_at > self.open_timeout:
                self._set_up_failed(r_peer, r, f"no CUDA IPC export within {self.open_timeout:.0f} s")
        for flight in self._flight:
            while flight:
                copy = flight[0]
                if not copy.done.query():  # type: ignore[no-untyped-call]
                    if not copy.late and now - copy.issued > self.op_timeout:
                        copy.late = True
                        self._emit("closed", copy.peer, f"a CUDA IPC copy took over {self.op_timeout:.0f} s")
                    break
                flight.popleft()
                self._verified(copy)

    def _verified(self, copy: _Copy) -> None:
        assert self.manifest is not None
        copy.src = []
        if self._copying.get(copy.piece) is copy:
            del self._copying[copy.piece]
        s1, s2 = (int(v) & 0xFFFFFFFFFFFFFFFF for v in copy.sums.tolist())
        got = f"{s1:016x}{s2:016x}"
        want = self.checksums[copy.piece] if self.checksums is not None else None
        waiters = self._waiters.pop(copy.piece, [])
        if got != want:
            self._stats["checksum_failures"] += 1
            log.warning(
                "piece %d read from %s: checksum mismatch (got %s, expected %s)",
                copy.piece,
                copy.peer,
                got,
                want,
            )
            self._emit("failed", copy.peer, copy.piece, "bad_checksum" if want is not None else "error")
            for i, peer in enumerate(waiters):  # the next holder asked for it is read instead
                r = self._remotes.get(peer)
                if r is not None and r.state == "ready":
                    self._issue(peer, r, copy.piece)
                    if waiters[i + 1 :]:
                        self._waiters[copy.piece] = waiters[i + 1 :]
                    return
                self._emit("failed", peer, copy.piece, "error")
            return
        self._have.add(copy.piece)
        self._stats["bytes_received"] += self.manifest.pieces[copy.piece].length
        self._stats["pieces_received"] += 1
        self._stats["last_verified_t"] = time.time()
        self._emit("received", copy.peer, copy.piece)
        for peer in waiters:
            self._emit("received", peer, copy.piece)
