"""swarm.node driving the NCCL transport: a seed and two leechers in one process on one GPU, real ZeroMQ
control plane on loopback with static peers, NCCL replaced by tests/gpu/loopback.py (NCCL refuses two
ranks on one GPU; tests/gpu/test_nccl.py runs the real thing on two GPUs). Skipped without CUDA."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (one GPU)"),
]

PIECE = 1 << 20


def test_two_leechers_fetch_through_nodes() -> None:
    pytest.importorskip("zmq")
    from bench.gpu import free_port, make_model, small_spec
    from swarm.manifest import Manifest, SwarmKey, as_bytes
    from swarm.node import Node, NodeConfig
    from swarm.transport.nccl import NcclTransport
    from tests.gpu.loopback import LoopbackNccl

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    nccl = LoopbackNccl()
    models = [make_model(small_spec(), dev, random=(r == 0), seed=3) for r in range(3)]
    manifest = Manifest.from_tensors(models[0], piece_size=PIECE)
    ports = [free_port() for _ in range(3)]
    key = SwarmKey(model_id="loopback-test", dtype="bfloat16")

    def config(r: int) -> NodeConfig:
        return NodeConfig(
            transport="nccl",
            peers=",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != r),
            host="127.0.0.1",
            control_port=ports[r],
            mdns=False,
            piece_size=PIECE,
            discovery_timeout_s=10.0,
            stall_timeout_s=20.0,
            deadline_s=60.0,
        )

    nodes = [
        Node(
            key,
            models[r],
            config(r),
            complete=(r == 0),
            manifest=manifest,
            transport=NcclTransport(dev, nccl=nccl, op_timeout=10.0),  # type: ignore[arg-type]
        ).start()
        for r in range(3)
    ]
    reports: dict[int, Any] = {}
    errors: list[BaseException] = []

    def fetch(r: int) -> None:
        try:
            reports[r] = nodes[r].fetch()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(r,)) for r in (1, 2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert not errors, errors
        assert sorted(reports) == [1, 2]
        torch.cuda.synchronize()
        for r in (1, 2):
            for name, t in models[0].items():
                assert torch.equal(as_bytes(models[r][name]), as_bytes(t)), (r, name)
            assert sum(reports[r].bytes_by_peer.values()) == manifest.total_bytes
        assert nccl.sends > 0
    finally:
        for n in nodes:
            n.close()
