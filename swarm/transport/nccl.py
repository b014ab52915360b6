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
  order: it numbers (`seq`) and enqueues `ncclSend` for every piece the channel takes in one turn of
  its engine (up to `pipeline`), then tells the receiver all of them in one message,
  `Channel(op="pieces", cid, seq of the first, [pieces])`; the receiver enqueues `ncclRecv` in `seq`
  order when the message arrives. A receiver says in its "open" that it reads such batches; to one
  that does not (an older member) the seed sends `Channel(op="piece", cid, seq, piece)` a piece.
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

Verification uses `fused_checksum_async` (swarm.transport.gpu_checksum): swarm.manifest's `wsum32`
values from one pass over the bytes (measured figures there).

The libnccl binding is swarm.transport.nccl_binding, the engine thread swarm.transport.nccl_engine;
this module holds the transport's configuration and the node's calls.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import torch

from swarm.errors import ConfigError
from swarm.manifest import Manifest, checksum_async
from swarm.protocol import Channel, Message
from swarm.scheduler import SchedulerConfig
from swarm.transport.base import GPU_PIECE_SIZE, Events
from swarm.transport.gpu_checksum import fused_checksum_async, fused_checksum_works
from swarm.transport.nccl_binding import Nccl
from swarm.transport.nccl_engine import NcclEngine

log = logging.getLogger("swarm.transport.nccl")

# --- settings the node uses with this transport (measured, see docs/benchmarks.md) -----------------


def recommended_scheduler() -> SchedulerConfig:
    """swarm.scheduler settings for NVLink-class links: several pieces requested and uploading per peer,
    so the ~1 ms control round trip is hidden. With the general defaults (tuned on the simulator for
    slow links) the control plane's ceiling measured 52-65 GB/s per leecher at 64 MiB pieces and
    163-223 GB/s at 256 MiB; with these, 116-197 and 269-563 GB/s (1-3 leechers, H200)."""
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


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r} is not a number") from e


class NcclTransport(NcclEngine):
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
        self._loop.start(self.device, self._step)
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
        self._loop.stop(self._close_all)
        deadline = time.monotonic() + 20.0
        for t in list(self._teardowns):
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def has_channel(self, peer: str) -> bool:
        """Whether `send(peer, p)` can be accepted: always, since a send asked before the peer's channel
        exists is held until it opens (bounded by `init_timeout`, then reported `sent(False)`)."""
        return True

    def unexpect(self, peer: str, piece: int) -> None:
        """A request was cancelled or refused: nothing to undo, the seed's signal drives receives."""
        return None

    def default_piece_size(self, on_gpu: bool) -> int:
        return GPU_PIECE_SIZE

    def default_scheduler(self, on_gpu: bool) -> SchedulerConfig:
        return recommended_scheduler()

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
