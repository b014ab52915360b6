"""The NCCL transport on real GPUs: two processes, one GPU each, real NCCL, real control messages
(encoded and decoded by swarm.protocol, relayed over multiprocessing queues by bench.gpu.MiniNode).

Skipped unless CUDA and at least 2 GPUs are present. Checks: byte-identical tensors after a transfer
of a model with packed, split and odd-sized tensors; duplicate arrivals of one piece (one straight into
the parameters, one through staging); a bad checksum reported as failed without touching verified
bytes; a seed that dies mid-transfer reported as closed within the timeout, and a bounded close.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import time
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs CUDA and at least 2 GPUs (NCCL between two processes)",
    ),
]

PIECE = 1 << 20


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    from swarm.manifest import as_bytes

    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(name.encode())
        h.update(as_bytes(t).cpu().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, port: int, inboxes: dict[str, Any], results: Any) -> None:
    from bench.gpu import SAFE_ENV, Coord, MiniNode, make_model, small_spec
    from swarm.manifest import Manifest, piece_checksums
    from swarm.protocol import Request
    from swarm.transport.nccl import NcclTransport

    os.environ.update(SAFE_ENV)
    out: dict[str, Any] = {"rank": rank}
    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        coord = Coord(port, rank, 2)
        tensors = make_model(small_spec(), device, random=(rank == 0), seed=5)
        manifest = Manifest.from_tensors(tensors, piece_size=PIECE)
        if rank == 0:
            coord.set("sums", piece_checksums(manifest, tensors))
            out["digest"] = _digest(tensors)
        coord.barrier("built")
        sums: list[str] = coord.get("sums")
        transport = NcclTransport(device, op_timeout=5.0, init_timeout=30.0)
        node = MiniNode(f"r{rank}", inboxes, transport, manifest, tensors, sums)
        zero_copy = next(p.index for p in manifest.pieces if p.zero_copy)
        packed = next(p.index for p in manifest.pieces if not p.zero_copy)
        out["pieces"] = len(manifest.pieces)
        out["packed"] = sum(1 for p in manifest.pieces if not p.zero_copy)
        if rank == 1:
            transport.connect("r0", {})
            node.ready("r0")
            # 1. duplicates: the same piece asked twice at once, for a zero-copy and a packed piece
            with node.cond:
                for p in (zero_copy, packed):
                    for _ in range(2):
                        node._notify("r0", Request(p))
                deadline = time.monotonic() + 30
                while node.received_count < 4 and time.monotonic() < deadline:
                    node.cond.wait(timeout=0.5)
            out["duplicates_received"] = node.received_count
            # 2. everything, in order, pipelined
            t = time.perf_counter()
            node.fetch([(p.index, "r0") for p in manifest.pieces], timeout=120)
            out["fetch_s"] = time.perf_counter() - t
            torch.cuda.synchronize()
            out["identical_sums"] = piece_checksums(manifest, tensors) == sums
            out["digest"] = _digest(tensors)
            out["failures_after_fetch"] = list(node.failures)
            # 3. a bad expected checksum: reported failed; the verified bytes stay as they were
            node.retry = False
            bad = list(sums)
            bad[zero_copy] = "0" * 32
            transport.set_checksums(bad)
            with node.cond:
                node._notify("r0", Request(zero_copy))
                deadline = time.monotonic() + 30
                while not node.failures and time.monotonic() < deadline:
                    node.cond.wait(timeout=0.5)
            out["bad_checksum_failures"] = list(node.failures)
            transport.set_checksums(sums)
            torch.cuda.synchronize()
            out["intact_after_bad"] = piece_checksums(manifest, tensors) == sums
            # 4. the seed dies in the middle of a (slowed down) transfer
            coord.set("die", True)
            with node.cond:
                node.cyclic = [(p.index, "r0") for p in manifest.pieces]
                node.pending.extend(node.cyclic)
                node._pump()
            died = None
            deadline = time.monotonic() + 60
            with node.cond:
                while not node.closed and time.monotonic() < deadline:
                    node.cond.wait(timeout=0.5)
                    if died is None:
                        died = coord.maybe("died")
                if died is None:
                    died = coord.maybe("died")
            out["closed"] = list(node.closed)
            out["closed_after_s"] = time.time() - died if died else None
            t = time.perf_counter()
            node.cyclic = None
            node.shutdown()
            out["shutdown_s"] = time.perf_counter() - t
        else:
            coord.get("die")  # blocks until the leecher reaches the last scenario
            transport.rate_limit = 20 * PIECE  # 20 pieces a second
            time.sleep(1.5)
            out["stats"] = transport.stats()
            coord.set("died", time.time())
            results.put(out)
            time.sleep(0.2)
            os._exit(0)
    except Exception as e:
        import traceback

        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    results.put(out)


def test_transfer_duplicates_bad_checksum_and_peer_death() -> None:
    import torch.distributed as dist

    from bench.gpu import SAFE_ENV, free_port

    os.environ.update(SAFE_ENV)
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 3, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    inboxes = {"r0": ctx.Queue(), "r1": ctx.Queue()}
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, inboxes, results)) for r in range(2)]
    for p in procs:
        p.start()
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 240
    while len(got) < 2 and time.monotonic() < deadline:
        try:
            r = results.get(timeout=1.0)
        except queue.Empty:
            continue
        got[r["rank"]] = r
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    del store
    assert len(got) == 2, f"workers answered: {sorted(got)}"
    seed, leech = got[0], got[1]
    assert "error" not in seed, seed["error"]
    assert "error" not in leech, leech["error"]
    assert seed["packed"] > 0 and seed["pieces"] > seed["packed"]
    assert leech["duplicates_received"] == 4
    assert leech["identical_sums"]
    assert leech["digest"] == seed["digest"], "bytes differ after the transfer"
    assert leech["failures_after_fetch"] == []
    bad = leech["bad_checksum_failures"]
    assert len(bad) == 1 and bad[0].endswith("bad_checksum"), bad
    assert leech["intact_after_bad"], "a failed arrival changed verified bytes"
    assert leech["closed"], "the seed's death was never reported"
    assert leech["closed_after_s"] is not None and leech["closed_after_s"] < 20
    assert leech["shutdown_s"] < 25
