"""Tuning lives with the transport: each transport's piece size and scheduler settings, and the node
using those of the transport it runs (not of its config's transport name) unless configured otherwise.
Runs without CUDA or libnccl: building a transport touches neither."""

from __future__ import annotations

import pytest

from swarm.manifest import DEFAULT_PIECE_SIZE
from swarm.options import TRANSPORTS
from swarm.scheduler import SchedulerConfig
from swarm.transport import ipc, make_transport, nccl
from swarm.transport.base import GPU_PIECE_SIZE, Transport

OPTS = {"token": None, "io_timeout_s": 7.0, "rate_cap": None}


@pytest.mark.parametrize("name", TRANSPORTS)
def test_make_transport_builds_each_transport_by_its_name(name: str) -> None:
    t = make_transport(name, **OPTS)  # type: ignore[arg-type]
    assert isinstance(t, Transport) and t.name == name


# (transport, tensors on the GPU) -> (piece size, scheduler settings)
EXPECTED = {
    ("tcp", False): (DEFAULT_PIECE_SIZE, None),
    ("tcp", True): (DEFAULT_PIECE_SIZE, None),  # forced TCP stages GPU tensors through host memory
    ("auto", False): (DEFAULT_PIECE_SIZE, None),
    ("auto", True): (GPU_PIECE_SIZE, ipc.recommended_scheduler()),  # one host first: CUDA IPC's
    ("ipc", True): (GPU_PIECE_SIZE, ipc.recommended_scheduler()),
    ("ipc", False): (GPU_PIECE_SIZE, ipc.recommended_scheduler()),
    ("nccl", True): (GPU_PIECE_SIZE, nccl.recommended_scheduler()),
    ("nccl", False): (GPU_PIECE_SIZE, nccl.recommended_scheduler()),
}


@pytest.mark.parametrize(("name", "on_gpu"), sorted(EXPECTED))
def test_each_transport_has_its_own_tuning(name: str, on_gpu: bool) -> None:
    t = make_transport(name, **OPTS)  # type: ignore[arg-type]
    assert (t.default_piece_size(on_gpu), t.default_scheduler(on_gpu)) == EXPECTED[name, on_gpu]


def test_the_gpu_settings_differ_from_the_defaults() -> None:
    """Otherwise the table above could not tell a transport that ignores its tuning."""
    assert GPU_PIECE_SIZE != DEFAULT_PIECE_SIZE
    assert ipc.recommended_scheduler() != SchedulerConfig() != nccl.recommended_scheduler()
    assert ipc.recommended_scheduler() != nccl.recommended_scheduler()


def _node(
    transport: str, given: Transport | None = None, **cfg: object
) -> tuple[int, SchedulerConfig | None]:
    from swarm.node import Node, NodeConfig
    from swarm.synthetic import synthetic_key, synthetic_tensors

    tensors = synthetic_tensors(1 << 20, device="cpu")
    node = Node(
        synthetic_key(1 << 20),
        tensors,
        NodeConfig(transport=transport, mdns=False, **cfg),  # type: ignore[arg-type]
        complete=True,
        transport=given,
    )
    try:
        assert isinstance(node.transport, type(given) if given is not None else Transport)
        return node.manifest.piece_size, node._scheduler_config
    finally:
        node.close()


def test_the_node_uses_its_transports_tuning() -> None:
    assert _node("tcp") == (DEFAULT_PIECE_SIZE, None)
    assert _node("nccl") == (GPU_PIECE_SIZE, nccl.recommended_scheduler())
    assert _node("ipc") == (GPU_PIECE_SIZE, ipc.recommended_scheduler())
    # A transport handed to the node brings its own tuning, whatever name the config carries.
    assert _node("tcp", nccl.NcclTransport()) == (GPU_PIECE_SIZE, nccl.recommended_scheduler())


def test_configured_tuning_wins_over_the_transports() -> None:
    mine = SchedulerConfig(max_uploads=3)
    assert _node("nccl", piece_size=1 << 20, scheduler=mine) == (1 << 20, mine)
