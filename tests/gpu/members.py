"""Swarm members as separate processes on one machine, for tests/gpu/test_ipc.py and bench/gpu.py's `ipc`
case: CUDA IPC cannot open an export of its own process, so every member is a process of its own.

`Members` starts `member_main` in spawned processes and ends every one of them (`close`, also on
failure; `kill` sends SIGKILL to one). A member builds the synthetic model (bench.gpu.make_model: the
same bytes in every process for the same `seed`; a leecher starts from a poisoned copy), starts a
swarm.node.Node on 127.0.0.1 with static peers, reports "ready", and a leecher then fetches, reporting
progress and, at the end, whether its bytes equal the model's and whether its CUDA context still runs
a kernel. Every member then serves until told to stop. Records go to one queue as dicts with `rank`
and `event`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from typing import Any

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _model(spec_name: str, device: Any, *, random: bool, seed: int) -> dict[str, Any]:
    from bench.gpu import llama_spec, make_model, small_spec

    spec = small_spec() if spec_name == "small" else llama_spec()
    return make_model(spec, device, random=random, seed=seed)


def member_main(opts: dict[str, Any], results: Any, commands: Any) -> None:
    """One member. `opts`: rank, role (seed|leecher), ports (every member's control port), peers (ranks
    to dial), device (cuda|cpu), model, seed, piece_mib, transport, pace_s (leecher: sleep before each
    IPC copy), corrupt_piece (seed: serve wrong bytes for it), wait_go (leecher: fetch only after "go"),
    node (extra NodeConfig fields)."""
    os.environ.update(SAFE_ENV)
    rank = opts["rank"]
    node = None
    try:
        import torch

        from swarm.manifest import Manifest, SwarmKey, as_bytes
        from swarm.node import Node, NodeConfig

        device = torch.device("cuda", 0) if opts.get("device", "cuda") == "cuda" else torch.device("cpu")
        torch.cuda.set_device(0)
        # Made on the GPU (its generator gives the same bytes in every process), then moved where the
        # member keeps them; one checksum algorithm for all, so that CPU and GPU members share a manifest.
        tensors = _model(
            opts.get("model", "small"), torch.device("cuda", 0), random=True, seed=opts.get("seed", 3)
        )
        tensors = {k: v.to(device) for k, v in tensors.items()}
        piece_size = int(opts.get("piece_mib", 4)) << 20
        manifest = Manifest.from_tensors(tensors, piece_size=piece_size, checksum="wsum32")
        expected: dict[str, Any] | None = None
        if opts["role"] == "leecher":
            if opts.get("check", True):
                expected = {k: v.clone() for k, v in tensors.items()}
            for t in tensors.values():
                as_bytes(t).fill_(0xA5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ports = opts["ports"]
        cfg = NodeConfig(
            **{
                "transport": opts.get("transport", "auto"),
                "peers": ",".join(f"127.0.0.1:{ports[j]}" for j in opts.get("peers", [])) or None,
                "host": "127.0.0.1",
                "control_port": ports[rank],
                "mdns": False,
                "piece_size": piece_size,
                "discovery_timeout_s": 20.0,
                "stall_timeout_s": 30.0,
                "deadline_s": 120.0,
                **opts.get("node", {}),
            }
        )
        key = SwarmKey(model_id=f"ipc-test-{opts.get('model', 'small')}", dtype="bfloat16", engine="test")
        transport = _transport(opts, cfg)
        if opts.get("warm_checksum") and device.type == "cuda":
            from swarm.transport.gpu_checksum import fused_checksum_works

            fused_checksum_works(device)
        if opts.get("matmul_s"):
            import threading

            stop_matmul = threading.Event()
            matmul = start_matmul(device, float(opts["matmul_s"]), stop_matmul, results, rank)
        if opts.get("wait_go"):
            results.put({"rank": rank, "event": "waiting"})
            wait_for(commands, "go", 300.0)
        t0 = time.time()
        node = Node(
            key, tensors, cfg, complete=opts["role"] == "seed", manifest=manifest, transport=transport
        )
        t_made = time.time()
        if opts.get("corrupt_piece") is not None:
            # The checksums were taken from the true bytes: now the member holds wrong bytes of one piece
            # (-1: of every piece).
            bad = int(opts["corrupt_piece"])
            for p in range(len(manifest.pieces)) if bad < 0 else [bad]:
                for v in manifest.piece_views(manifest.byte_views(tensors), p):
                    v.bitwise_not_()
            torch.cuda.synchronize()
        node.start()
        t_started = time.time()
        results.put(
            {"rank": rank, "event": "ready", "id": node.id, "t": time.time(), "pieces": len(manifest.pieces)}
        )
        if opts["role"] == "leecher":
            t1 = time.time()
            held = [0]

            def progress(done: int, total: int) -> None:
                held[0] += 1
                results.put({"rank": rank, "event": "progress", "done": done, "total": total})

            report = node.fetch(progress if opts.get("progress", True) else None)
            t2 = time.time()
            record: dict[str, Any] = {
                "rank": rank,
                "event": "done",
                "start": t0,
                "fetch": t1,
                "made": t_made,
                "started": t_started,
                "end": t2,
                "bytes": manifest.total_bytes,
                "from": {k: v for k, v in report.bytes_by_peer.items()},
                "stats": _stats(node),
            }
            if device.type == "cuda":
                torch.cuda.synchronize()
            if expected is not None:
                record["identical"] = all(
                    torch.equal(as_bytes(tensors[n]), as_bytes(expected[n])) for n in expected
                )
                del expected
            if device.type == "cuda":  # the CUDA context still runs a kernel
                a = torch.randn(256, 256, device=device)
                record["kernel_ok"] = bool(torch.isfinite(a @ a).all().item())
            results.put(record)
        wait_for(commands, "stop", 300.0)
        if opts.get("matmul_s"):
            stop_matmul.set()
            matmul.join(60.0)
    except Exception:
        results.put({"rank": rank, "event": "error", "error": traceback.format_exc()})
    finally:
        if node is not None:
            with contextlib.suppress(Exception):
                node.close()
        results.put({"rank": rank, "event": "closed"})


def start_matmul(device: Any, seconds: float, stop: Any, results: Any, rank: int) -> Any:
    """The stand-in for inference: bf16 8192^3 matrix products back to back on their own stream until
    `stop` is set (at most `seconds`); reports each one's GPU time and the wall time it ended (record
    "matmul")."""
    import threading

    import torch

    def loop() -> None:
        torch.cuda.set_device(device)
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        stream = torch.cuda.Stream(device)
        samples = []
        with torch.cuda.stream(stream):
            for _ in range(5):
                a @ b
            stream.synchronize()
            end = time.monotonic() + seconds
            while time.monotonic() < end and not stop.is_set():
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(stream)
                a @ b
                e1.record(stream)
                e1.synchronize()
                samples.append((time.time(), e0.elapsed_time(e1)))
        results.put({"rank": rank, "event": "matmul", "samples": samples})

    t = threading.Thread(target=loop, name="matmul", daemon=True)
    t.start()
    return t


def _transport(opts: dict[str, Any], cfg: Any) -> Any:
    pace = float(opts.get("pace_s", 0.0))
    lie = bool(opts.get("lie_export"))
    if not pace and not lie:
        return None
    from swarm.transport.auto import AutoTransport
    from swarm.transport.ipc import IpcTransport
    from swarm.transport.tcp import TcpTransport

    class TestIpc(IpcTransport):
        """Reads one piece every `pace` seconds (so that a test can act mid-transfer); with `lie`, its
        export claims 1 GiB more of every storage than it shares (a hostile or broken peer)."""

        def _issue(self, peer: str, r: Any, piece: int) -> None:
            time.sleep(pace)
            super()._issue(peer, r, piece)

        def _export_once(self) -> dict[str, Any]:
            export = super()._export_once()
            if not lie:
                return export
            regions = [[r[0], r[1] + (1 << 30), *r[2:]] for r in export["regions"]]
            return {"regions": regions, "tensors": export["tensors"]}

    return AutoTransport(transports={"tcp": TcpTransport(), "ipc": TestIpc(io_timeout_s=cfg.io_timeout_s)})


def _stats(node: Any) -> dict[str, Any]:
    st = node.transport.stats()
    st["status_paths"] = node.status().get("paths", {})
    return st


def wait_for(commands: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if commands.get(timeout=0.5) == what:
                return
        except queue.Empty:
            continue


class Members:
    """Member processes and their records; `close()` ends every one (stop, then terminate, then kill)."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.procs: dict[int, Any] = {}
        self.commands: dict[int, Any] = {}
        self.records: list[dict[str, Any]] = []

    def start(self, opts: dict[str, Any], target: Any = member_main) -> None:
        q = self.ctx.Queue()
        p = self.ctx.Process(target=target, args=(opts, self.results, q), daemon=True)
        p.start()
        self.procs[opts["rank"]] = p
        self.commands[opts["rank"]] = q

    def tell(self, rank: int, what: str) -> None:
        self.commands[rank].put(what)

    def kill(self, rank: int) -> None:
        p = self.procs[rank]
        if p.pid is not None and p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(10)

    def wait(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        """The first record (new or seen) for which `predicate` holds; raises on a member's error."""
        for rec in self.records:
            if predicate(rec):
                return rec
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rec = self.results.get(timeout=0.5)
            except queue.Empty:
                continue
            self.records.append(rec)
            if rec.get("event") == "error":
                raise AssertionError(f"member {rec['rank']} failed:\n{rec['error']}")
            if predicate(rec):
                return rec
        raise TimeoutError(f"no {what} within {timeout:.0f} s; records: {self.records[-10:]}")

    def event(self, rank: int, event: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait(
            lambda r: r.get("rank") == rank and r.get("event") == event, timeout, f"{event} of {rank}"
        )

    def close(self) -> None:
        for rank, p in self.procs.items():
            if p.is_alive():
                self.commands[rank].put("stop")
        deadline = time.monotonic() + 15.0
        for p in self.procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
