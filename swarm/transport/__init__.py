"""Data-plane transports: base (the interface), paths (which path a pair uses), auto (several at once),
tcp (host memory), ipc (CUDA IPC on one host), nccl (GPU to GPU; nccl_binding, nccl_engine), gpu_checksum and
command_loop (what the GPU transports share).

`make_transport` builds one by its name (swarm.options.TRANSPORTS); each is imported only when chosen, so
a member without CUDA or libnccl never loads what it cannot use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarm.transport.base import Transport


def make_transport(name: str, *, token: str | None, io_timeout_s: float, rate_cap: float | None) -> Transport:
    """The transport called `name` ("auto", "tcp", "ipc", "nccl"), with the node's options (each takes
    the same three; a transport that has no use for one says so in its docstring)."""
    if name == "auto":
        from swarm.transport.auto import AutoTransport as cls
    elif name == "ipc":
        from swarm.transport.ipc import IpcTransport as cls  # type: ignore[assignment]
    elif name == "nccl":
        from swarm.transport.nccl import NcclTransport as cls  # type: ignore[assignment]
    else:
        from swarm.transport.tcp import TcpTransport as cls  # type: ignore[assignment]
    return cls(token=token, io_timeout_s=io_timeout_s, rate_cap=rate_cap)
