"""The default transport: several transports at once, the best path chosen for each pair of members.

`AutoTransport` runs TCP always, and, when this member's tensors live in GPU memory, CUDA IPC and (where
libnccl loads) NCCL beside it. Its offer (swarm.transport.paths) lists them; for each peer the node asks
`choose(peer, offer)` when the peer's Hello arrives, and every later call for that peer goes to the
chosen transport. Both ends choose with the same symmetric function, so they agree without a message.

Fallback: a CUDA IPC set-up that fails (a peer that only claims to share our host, an export CUDA
cannot open in this process, a peer that cannot export) moves that pair to TCP before any piece moved:
its pieces are then requested and served as usual (a member serving a one-sided path answers a request
that reaches it over TCP). Failures after set-up are reported as `closed` like any transport's.

Limits: transport-specific control messages (`Channel`) are routed by the transport name they carry;
the merged Hello parameters are the union of each transport's (they use distinct keys).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.manifest import Manifest
from swarm.protocol import Channel, Message
from swarm.scheduler import SchedulerConfig
from swarm.transport.base import GPU_PIECE_SIZE, Events, Transport
from swarm.transport.paths import Offer, choose_path, local_offer

log = logging.getLogger("swarm.transport.auto")


class AutoTransport(Transport):
    name = "auto"

    def __init__(
        self,
        *,
        token: str | None = None,
        io_timeout_s: float = 30.0,
        rate_cap: float | None = None,
        transports: Mapping[str, Transport] | None = None,
        nccl: bool = True,
    ) -> None:
        """`transports`: the transports to run by path name (default: chosen at `bind` from where the
        tensors live); `nccl`: offer NCCL where libnccl loads (default)."""
        self.subs: dict[str, Transport] = dict(transports or {})
        self._preset = transports is not None
        self._opts: dict[str, Any] = {"token": token, "io_timeout_s": io_timeout_s, "rate_cap": rate_cap}
        self._nccl = nccl
        self._paths: dict[str, str] = {}
        self._setup_s: dict[str, float] = {}
        self._params: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._pid = ""
        self._identity: Identity | None = None
        super().__init__()

    @property  # type: ignore[override]
    def peer_id(self) -> str:
        return self._pid

    @peer_id.setter
    def peer_id(self, value: str) -> None:
        self._pid = value
        for t in self.subs.values():
            t.peer_id = value

    @property  # type: ignore[override]
    def identity(self) -> Identity | None:
        return self._identity

    @identity.setter
    def identity(self, value: Identity | None) -> None:
        self._identity = value
        for t in self.subs.values():
            t.identity = value

    # --- set-up ------------------------------------------------------------------------------------

    def bind(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor], events: Events) -> None:
        super().bind(manifest, tensors, events)
        gpu = next((v.device for v in self.views if v.is_cuda), None)
        if not self._preset:
            self.subs = self._default_subs(gpu is not None)
        for name, t in self.subs.items():
            t.peer_id = self._pid
            t.identity = self._identity
            t0 = time.perf_counter()
            t.bind(manifest, tensors, self._events_for(name))
            self._setup_s[f"{name}.bind"] = time.perf_counter() - t0
        self._offer = local_offer(self.subs, gpu if set(self.subs) - {"tcp"} else None)

    def _default_subs(self, gpu: bool) -> dict[str, Transport]:
        from swarm.transport.tcp import TcpTransport

        subs: dict[str, Transport] = {"tcp": TcpTransport(**self._opts)}
        if gpu:
            from swarm.transport.ipc import IpcTransport

            subs["ipc"] = IpcTransport(io_timeout_s=self._opts["io_timeout_s"])
            if self._nccl:
                from swarm.transport.nccl import NcclTransport
                from swarm.transport.nccl_binding import Nccl

                try:
                    Nccl.load()
                    subs["nccl"] = NcclTransport(**self._opts)
                except ConfigError as e:
                    log.info("NCCL not offered: %s", e)
        return subs

    def open(self, host: str) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, t in self.subs.items():
            t0 = time.perf_counter()
            params.update(t.open(host))
            self._setup_s[f"{name}.open"] = time.perf_counter() - t0
        return params

    def set_checksums(self, checksums: Sequence[str]) -> None:
        super().set_checksums(checksums)
        for t in self.subs.values():
            t.set_checksums(checksums)

    def _events_for(self, name: str) -> Events:
        outer = self.events
        assert outer is not None

        def closed(peer: str, reason: str) -> None:
            if name == "ipc" and self._fall_back(peer, reason):
                return
            outer.closed(peer, reason)

        return Events(
            received=outer.received, failed=outer.failed, sent=outer.sent, closed=closed, notify=outer.notify
        )

    def _fall_back(self, peer: str, reason: str) -> bool:
        """An IPC pair that never got ready moves to TCP; True when it did."""
        ipc = self.subs.get("ipc")
        with self._lock:
            if self._paths.get(peer) != "ipc" or ipc is None or ipc.is_ready(peer) or "tcp" not in self.subs:  # type: ignore[attr-defined]
                return False
            self._paths[peer] = "tcp"
            params = self._params.get(peer)
        log.warning("peer %s: %s; using TCP for this pair", peer, reason)
        if params is not None:
            self.subs["tcp"].connect(peer, params)
        return True

    # --- paths -------------------------------------------------------------------------------------

    def choose(self, peer: str, offer: Offer) -> str | None:
        path = choose_path(self.offer(), offer)
        with self._lock:
            if path is not None and not (self._paths.get(peer) == "tcp" and path == "ipc"):
                self._paths[peer] = path  # a pair that fell back from IPC stays on TCP
            return self._paths.get(peer) if path is not None else None

    def path(self, peer: str) -> str:
        return self._paths.get(peer, "")

    def _sub(self, peer: str) -> Transport:
        return self.subs.get(self._paths.get(peer, "tcp")) or self.subs["tcp"]

    def _serving(self, peer: str) -> Transport:
        """The transport that serves `peer`'s requests: a one-sided path gets none, so a request that
        arrives anyway (the peer fell back) is served over TCP."""
        t = self._sub(peer)
        return self.subs.get("tcp", t) if t.one_sided(peer) else t

    def one_sided(self, peer: str) -> bool:
        return self._sub(peer).one_sided(peer)

    # --- tuning (before `bind`: the piece size goes into the manifest) ------------------------------

    def default_piece_size(self, on_gpu: bool) -> int:
        return GPU_PIECE_SIZE if on_gpu else super().default_piece_size(on_gpu)

    def default_scheduler(self, on_gpu: bool) -> SchedulerConfig | None:
        """With tensors in GPU memory: CUDA IPC's deeper pipelines (one host first)."""
        if not on_gpu:
            return super().default_scheduler(on_gpu)
        from swarm.transport import ipc

        return ipc.recommended_scheduler()

    # --- routed calls ------------------------------------------------------------------------------

    def connect(self, peer: str, params: Mapping[str, Any]) -> None:
        with self._lock:
            self._params[peer] = dict(params)
        self._sub(peer).connect(peer, params)

    def expect(self, peer: str, piece: int) -> None:
        self._sub(peer).expect(peer, piece)

    def unexpect(self, peer: str, piece: int) -> None:
        self._sub(peer).unexpect(peer, piece)

    def has_channel(self, peer: str) -> bool:
        return self._serving(peer).has_channel(peer)

    def send(self, peer: str, piece: int) -> None:
        self._serving(peer).send(peer, piece)

    def cancel(self, peer: str, piece: int) -> None:
        self._serving(peer).cancel(peer, piece)

    def on_message(self, peer: str, msg: Message) -> None:
        if isinstance(msg, Channel):
            t = self.subs.get(msg.transport)
            if t is not None:
                t.on_message(peer, msg)
            return
        for t in self.subs.values():
            t.on_message(peer, msg)

    def drop(self, peer: str) -> None:
        with self._lock:
            self._paths.pop(peer, None)
            self._params.pop(peer, None)
        for t in self.subs.values():
            t.drop(peer)

    def close(self) -> None:
        for t in self.subs.values():
            t.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: t.stats() for name, t in self.subs.items()}
        out["paths"] = dict(self._paths)
        out["setup_s"] = dict(self._setup_s)  # what each transport's start cost (bench/gpu.py `ipc`)
        return out
