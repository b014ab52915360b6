"""CUDA graph capture is never disturbed by serving (swarm.capture), on one GPU, without vLLM.

This process holds a synthetic model on the GPU and seeds it over TCP while its main thread captures CUDA
graphs in a loop, in PyTorch's default (global) capture mode, as vLLM does after loading. Two leecher
processes on the same GPU pull the whole model at the same time. Every capture must succeed and replay
the right result, and each leecher must finish with every piece verified and the bytes identical.
Skipped without CUDA.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (one GPU)"),
]

SIZE = 1_000_000_000  # 1 GB: each leecher needs a few seconds over loopback TCP
PIECE = 8 << 20


def _capture_once(x: torch.Tensor, w: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Capture a graph of many small kernels (a long capture window), replay it, check the result."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        y = x
        for _ in range(3):  # warm-up outside the capture, as torch.cuda.graph asks
            y = torch.tanh(y @ w)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, stream=stream):  # capture_error_mode="global", PyTorch's default
        y = x
        for _ in range(64):
            y = torch.tanh(y @ w)
    graph.replay()
    torch.cuda.synchronize()
    ref = x
    for _ in range(64):
        ref = torch.tanh(ref @ w)
    assert torch.allclose(y, ref), "a replayed graph computed something else"


def test_capture_while_serving_two_leechers() -> None:
    from swarm.node import Node, NodeConfig
    from swarm.synthetic import synthetic_key, synthetic_tensors
    from tests.loopback import free_port

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    port = free_port()
    tensors = synthetic_tensors(SIZE, device="cuda")
    config = NodeConfig(
        transport="tcp",
        host="127.0.0.1",
        control_port=port,
        mdns=False,
        piece_size=PIECE,
    )
    x = torch.randn(64, 256, device=dev)
    w = torch.randn(256, 256, device=dev) / 16
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    captures = 0
    with Node(synthetic_key(SIZE), tensors, config, complete=True) as seed:
        leechers = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.gpu.test_capture", str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 240
            while any(p.poll() is None for p in leechers):
                assert time.monotonic() < deadline, "leechers did not finish in 240 s"
                _capture_once(x, w, stream)
                captures += 1
            outputs = [p.communicate(timeout=10)[0] for p in leechers]
        finally:
            for p in leechers:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        sent, total = seed.status()["bytes_out"], seed.manifest.total_bytes
    for p, out in zip(leechers, outputs, strict=True):
        assert p.returncode == 0, out[-2000:]
        assert "verified: identical to the synthetic model" in out, out[-2000:]
    assert captures > 10, f"only {captures} captures ran while the leechers fetched"
    assert sent >= total, (sent, total)  # every piece left the capturing process at least once
    print(f"{captures} graph captures while serving 2 x {total / 1e9:.2f} GB; seed sent {sent / 1e9:.2f} GB")


def _leech(port: int) -> int:
    """A leecher process on the same GPU (as vLLM instance B or C would be): fetch, then compare."""
    from swarm.node import Node, NodeConfig
    from swarm.synthetic import synthetic_key, synthetic_tensors

    torch.cuda.set_device(0)
    tensors = synthetic_tensors(SIZE, fill=False, device="cuda")
    config = NodeConfig(
        transport="tcp", host="127.0.0.1", mdns=False, piece_size=PIECE, peers=f"127.0.0.1:{port}"
    )
    with Node(synthetic_key(SIZE), tensors, config, complete=False) as node:
        print(node.fetch().describe(), flush=True)
    expected = synthetic_tensors(SIZE, device="cuda")
    same = all(torch.equal(expected[k].view(torch.int16), t.view(torch.int16)) for k, t in tensors.items())
    print("verified: identical to the synthetic model" if same else "MISMATCH", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(_leech(int(sys.argv[1])))
