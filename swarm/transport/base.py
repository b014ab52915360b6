"""The data-plane interface: how piece bytes move between two nodes.

A node owns one `Transport`. The node's control loop decides *what* moves (swarm.scheduler); the
transport moves the bytes and reports back through `Events`, from its own threads. Contract:

- `open(...)` binds whatever the transport listens on and returns the parameters a peer needs to reach
  it (they travel in the control-plane `Hello`, so set-up overlaps the handshake).
- Leecher side: `connect(peer, params)` opens (or starts opening) a channel to a peer; `expect(peer, p)`
  is called when a request for piece p went out, before the bytes can arrive; the transport writes the
  piece into the local tensors only after its checksum matched, then reports `received(peer, p)`; a bad
  or failed piece is reported as `failed(peer, p, reason)` and never touches the tensors'
  already-verified bytes.
- Seed side: `send(peer, p)` queues piece p for the peer; completion is reported as `sent(peer, p, ok)`.
  `cancel(peer, p)` drops it if it has not started.
- `on_message(peer, msg)`: control messages addressed to the transport (`Channel`, `Sent`), for
  transports that need a side channel (an NCCL unique id, a "sending now" signal). A successful
  `Sent` that a transport hands to `Events.notify` travels in the peer's next `Batch` (one frame per
  loop turn) and reaches the other side's `on_message` as `Sent(piece, True)`; other messages leave
  at once.
- Paths: `offer()` is what this member can use (advertised in its Hello, swarm.transport.paths);
  `choose(peer, offer)` picks the path of a pair from the peer's offer (None: nothing in common);
  `path(peer)` is that choice; `one_sided(peer)` says that pieces from `peer` are read by this side
  alone (CUDA IPC), so the node sends that peer no requests or cancels.
- `drop(peer)` frees everything tied to one peer at once (sockets, threads, buffers, communicators), also
  when the peer died; `close()` does that for every peer and stops listening. Both are bounded in time.
- Every blocking operation inside a transport has a timeout; a channel that times out is dropped and
  reported as `closed(peer, reason)`.
- Tuning lives with the transport: `default_piece_size(on_gpu)` and `default_scheduler(on_gpu)` are what
  the node uses when its config sets no piece size or scheduler settings (measured per transport).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swarm.identity import Identity
from swarm.manifest import DEFAULT_PIECE_SIZE, Manifest
from swarm.protocol import Message
from swarm.scheduler import SchedulerConfig
from swarm.transport.paths import Offer, local_offer

#: Piece size between GPUs, NCCL and CUDA IPC alike (one swarm's members must agree on it: it is part of
#: the manifest, and a pair may use either path). The control plane costs ~0.2-0.4 ms of CPU a piece on
#: its busiest thread while NVLink moves 64 MiB in ~0.18 ms, so 64 MiB pieces cap a leecher far below the
#: link; with 256 MiB pieces the control plane's ceiling (no bytes moved) measured 269-563 GB/s per
#: leecher on an H200 (NCCL engine; CUDA IPC copies are faster still).
GPU_PIECE_SIZE = 256 << 20


@dataclass
class Events:
    """Callbacks from transport threads to the node; each must be cheap and thread-safe."""

    received: Callable[[str, int], None]
    failed: Callable[[str, int, str], None]
    sent: Callable[[str, int, bool], None]
    closed: Callable[[str, str], None]
    #: Ask the node to deliver a control message to a peer (for transports with a side channel).
    notify: Callable[[str, Message], None]


class Transport(ABC):
    name: str = ""

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.views: list[torch.Tensor] = []
        self.checksums: list[str] | None = None
        self.events: Events | None = None
        #: this node's id and the key that proves it, set by the node before `open` (the TCP data
        #: handshake signs with it)
        self.peer_id = ""
        self.identity: Identity | None = None
        self._offer: Offer | None = None

    def bind(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor], events: Events) -> None:
        self.manifest = manifest
        self.views = manifest.byte_views(tensors)
        self.events = events

    def set_checksums(self, checksums: Sequence[str]) -> None:
        """The expected checksum of every piece; received pieces are verified against them."""
        self.checksums = list(checksums)

    @abstractmethod
    def open(self, host: str) -> dict[str, Any]:
        """Start listening on `host`; return the parameters peers need (sent in Hello.data)."""

    @abstractmethod
    def connect(self, peer: str, params: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def expect(self, peer: str, piece: int) -> None: ...

    def unexpect(self, peer: str, piece: int) -> None:
        """A request to `peer` was cancelled or refused: stop expecting piece `piece` from it."""
        return None

    def has_channel(self, peer: str) -> bool:
        """Whether `send(peer, p)` can be accepted now (a transport that holds early sends says yes)."""
        return True

    @abstractmethod
    def send(self, peer: str, piece: int) -> None: ...

    @abstractmethod
    def cancel(self, peer: str, piece: int) -> None: ...

    def on_message(self, peer: str, msg: Message) -> None:
        """Control messages for the transport; the default transport needs none."""
        return None

    @abstractmethod
    def drop(self, peer: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def offer(self) -> Offer:
        """What this member offers its peers (after `bind`): this transport alone, on the GPU of its
        tensors for a GPU transport."""
        if self._offer is None:
            gpu = next((v.device for v in self.views if v.is_cuda), None) if self.name != "tcp" else None
            self._offer = local_offer([self.name], gpu)
        return self._offer

    def choose(self, peer: str, offer: Offer) -> str | None:
        """The path to use with `peer`, given its offer; None when there is none in common. A member
        forced to one transport uses it with every peer that runs it (no second-guessing: a forced
        NCCL pair on one GPU is what tests/gpu/test_node_loopback.py drives through a loopback);
        swarm.transport.auto chooses among several with `choose_path`."""
        return self.name if self.name in offer.transports else None

    def path(self, peer: str) -> str:
        return self.name

    def one_sided(self, peer: str) -> bool:
        """Whether pieces from `peer` are read by this side alone (no request travels to the peer)."""
        return False

    # --- tuning: what the node uses unless its config says otherwise -------------------------------

    def default_piece_size(self, on_gpu: bool) -> int:
        """The piece size for a member whose tensors are (`on_gpu`) or are not in GPU memory."""
        return DEFAULT_PIECE_SIZE

    def default_scheduler(self, on_gpu: bool) -> SchedulerConfig | None:
        """swarm.scheduler settings for this transport's links; None: the scheduler's defaults."""
        return None
