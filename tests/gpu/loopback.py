"""A stand-in for swarm.transport.nccl_binding.Nccl that joins two transports of ONE process on ONE GPU.

NCCL refuses two ranks on one GPU, so on a one-GPU machine the transport's engine (streams, piece
signals, staging, verification, scatter, duplicates, failures, rate limit) is exercised through this
loopback instead: communicators are matched by their unique id; a send copies its bytes to a "wire"
buffer on the sender's stream; a receive answers `in progress` until a send is there, then copies from
the wire on the receiver's stream (so, as with NCCL, nothing after the receive on that stream runs
before the bytes are in place). An abort makes the peer's communicator report a remote error.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

import torch

from swarm.transport.nccl_binding import NCCL_IN_PROGRESS, NCCL_SUCCESS

NCCL_REMOTE_ERROR = 6


class _CudaArray:
    def __init__(self, ptr: int, n: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (n,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def _wrap(ptr: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(_CudaArray(ptr, n), device=device)


class _Comm:
    def __init__(self, uid: bytes, rank: int, nranks: int, device: torch.device) -> None:
        self.uid = uid
        self.rank = rank
        self.nranks = nranks
        self.device = device
        self.aborted = False
        self.pending_recv = False


class LoopbackNccl:
    version = 0
    path = "loopback"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.comms: dict[int, _Comm] = {}
        self.groups: dict[bytes, dict[int, int]] = {}
        self.wire: dict[bytes, collections.deque[tuple[torch.Tensor, Any]]] = collections.defaultdict(
            collections.deque
        )
        self.posted: dict[bytes, collections.deque[tuple[torch.Tensor, Any, _Comm]]] = (
            collections.defaultdict(collections.deque)
        )
        self.next = 1
        self.sends = 0
        self.recvs = 0

    def error_string(self, code: int) -> str:
        return f"loopback error {code}"

    def unique_id(self) -> bytes:
        return os.urandom(128)

    def init_rank(
        self, nranks: int, uid: bytes, rank: int, *, blocking: bool, max_ctas: int | None = None
    ) -> tuple[int, int]:
        with self.lock:
            h = self.next
            self.next += 1
            self.comms[h] = _Comm(uid, rank, nranks, torch.device("cuda", torch.cuda.current_device()))
            self.groups.setdefault(uid, {})[rank] = h
            return h, NCCL_IN_PROGRESS

    def async_error(self, comm: int) -> int:
        with self.lock:
            c = self.comms[comm]
            group = self.groups[c.uid]
            if any(self.comms[h].aborted for h in group.values()):
                return NCCL_REMOTE_ERROR
            if len(group) < c.nranks or c.pending_recv:
                return NCCL_IN_PROGRESS
            return NCCL_SUCCESS

    def send(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        c = self.comms[comm]
        s = torch.cuda.ExternalStream(stream, device=c.device)
        with torch.cuda.stream(s):
            wire = _wrap(ptr, nbytes, c.device).clone()
            ev = torch.cuda.Event()
            ev.record(s)
        with self.lock:
            self.sends += 1
            self.wire[c.uid].append((wire, ev))
            self._match(c.uid)
        return NCCL_SUCCESS

    def recv(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        c = self.comms[comm]
        s = torch.cuda.ExternalStream(stream, device=c.device)
        with self.lock:
            self.recvs += 1
            c.pending_recv = True
            self.posted[c.uid].append((_wrap(ptr, nbytes, c.device), s, c))
            self._match(c.uid)
            return NCCL_IN_PROGRESS if c.pending_recv else NCCL_SUCCESS

    def _match(self, uid: bytes) -> None:
        wire, posted = self.wire[uid], self.posted[uid]
        while wire and posted:
            data, ev = wire.popleft()
            dst, s, c = posted.popleft()
            s.wait_event(ev)
            with torch.cuda.stream(s):
                dst.copy_(data[: dst.numel()])
                data.record_stream(s)
            c.pending_recv = bool(posted)

    def abort(self, comm: int) -> int:
        with self.lock:
            self.comms[comm].aborted = True
        return NCCL_SUCCESS

    def destroy(self, comm: int) -> int:
        return self.abort(comm)
