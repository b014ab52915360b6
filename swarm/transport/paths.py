"""Which data path a pair of members uses: a pure function of what each one offers.

Every member advertises an `Offer` in its Hello (`data["paths"]`): its host identity (the kernel's boot
id and the hostname: two processes with the same identity share one machine, hence one PCIe/NVLink
fabric and one CUDA driver), the UUID of the GPU its pieces live on ("" for host memory), the UUIDs of
the GPUs that one can reach by peer access, and the transports it runs. Both ends of a pair compute
`choose_path(mine, theirs)`; the function is symmetric, so they agree without another message.

Order of preference (fastest first):

- "ipc": CUDA IPC, one-sided copies by the reader's copy engines. Both offer it, both hold their pieces
  in GPU memory, the same host, and the same GPU or GPUs that reach each other by peer access.
- "nccl": both offer it, both on GPUs, and not the same GPU (NCCL cannot join two ranks of one GPU).
  Between hosts this is the only GPU path; on one host it is taken where IPC is not possible.
- "tcp": both offer it (host memory, any machine).

None in common: `None` (the node refuses the pair with "wrong_transport"). This is how a member on
"auto" (swarm.transport.auto) chooses; a member forced to one transport uses it with any peer that
runs it (swarm.transport.base.Transport.choose).

Limits: the host identity and GPU UUIDs are what the peer says; a peer that lies about sharing our host
gets an IPC path whose set-up fails (the handles open nowhere else), and the transport then reports the
pair closed. Nothing read from a peer's offer is trusted beyond that choice.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Paths from fastest to slowest; `choose_path` returns the first one both ends can use.
PREFERENCE = ("ipc", "nccl", "tcp")
_MAX_GPUS = 64
_MAX_STR = 128


@dataclass(frozen=True)
class Offer:
    """What one member can use for its data plane (advertised in its Hello as `data["paths"]`)."""

    host: str = ""
    gpu: str = ""  # UUID of the GPU holding this member's pieces; "" when they live in host memory
    peer_gpus: frozenset[str] = field(default_factory=frozenset)  # GPUs that one reaches by peer access
    transports: frozenset[str] = frozenset({"tcp"})

    def to_wire(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "gpu": self.gpu,
            "peer_gpus": sorted(self.peer_gpus),
            "transports": sorted(self.transports),
        }

    @classmethod
    def from_wire(cls, data: Any, *, fallback: str = "tcp") -> Offer:
        """A peer's offer from its Hello; malformed fields count as absent. A member that sends no offer
        (an older version) runs only the transport named in its Hello (`fallback`), on no known host."""
        if not isinstance(data, Mapping):
            return cls(transports=frozenset({fallback}) if fallback in PREFERENCE else frozenset())
        host = data.get("host")
        gpu = data.get("gpu")
        return cls(
            host=host[:_MAX_STR] if isinstance(host, str) else "",
            gpu=gpu[:_MAX_STR] if isinstance(gpu, str) else "",
            peer_gpus=frozenset(_strings(data.get("peer_gpus"))),
            transports=frozenset(t for t in _strings(data.get("transports")) if t in PREFERENCE),
        )


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v[:_MAX_STR] for v in value[:_MAX_GPUS] if isinstance(v, str)]


def choose_path(a: Offer, b: Offer) -> str | None:
    """The best path both `a` and `b` can use (symmetric: `choose_path(a, b) == choose_path(b, a)`)."""
    common = a.transports & b.transports
    both_gpu = bool(a.gpu and b.gpu)
    same_host = bool(a.host) and a.host == b.host
    same_gpu = both_gpu and a.gpu == b.gpu
    if "ipc" in common and both_gpu and same_host:
        if same_gpu or (b.gpu in a.peer_gpus and a.gpu in b.peer_gpus):
            return "ipc"
    if "nccl" in common and both_gpu and not same_gpu:
        return "nccl"
    if "tcp" in common:
        return "tcp"
    return None


def host_identity() -> str:
    """This machine's identity for the path choice: the kernel boot id (unique per boot, shared by every
    process and container of one kernel) and the hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}/{socket.gethostname()}"[:_MAX_STR]


def local_offer(transports: Iterable[str], gpu_device: Any = None) -> Offer:
    """This member's offer: `transports` it runs; `gpu_device` the CUDA device of its pieces (or None)."""
    gpu, peers = "", frozenset[str]()
    if gpu_device is not None:
        import torch

        index = torch.device(gpu_device).index
        index = torch.cuda.current_device() if index is None else index
        gpu = gpu_uuid(index)
        peers = frozenset(
            gpu_uuid(j)
            for j in range(torch.cuda.device_count())
            if j != index and torch.cuda.can_device_access_peer(index, j)
        )
    return Offer(host=host_identity(), gpu=gpu, peer_gpus=peers, transports=frozenset(transports))


def gpu_uuid(index: int) -> str:
    import torch

    props = torch.cuda.get_device_properties(index)
    return str(getattr(props, "uuid", "") or f"{props.name}#{index}")
