"""What a CUDA IPC reader sees when the exporter is SIGKILLed mid-transfer, for each kind of export.

    python bench/ipc_export.py --gib 4 --copies 50 --json $OUT/ipc_export.json

Two processes on GPU 0. The exporter fills a buffer with random bytes and shares it with PyTorch's own
CUDA IPC sharing (`UntypedStorage._share_cuda_`, as torch.multiprocessing does); the reader maps it
(`_new_shared_cuda`), asks the driver for the mapped allocation's range (cuMemGetAddressRange, which
swarm.transport.ipc uses to bound a peer's claims), queues `--copies` copies of the whole buffer into
its own memory, and says so; the parent then SIGKILLs the exporter at once. The reader waits for its
copies, compares them with the same random bytes made locally, again 1 s later, and runs a kernel.
Kinds: "legacy" (PyTorch's caching allocator: cudaMalloc segments, legacy cudaIpc handles) and
"expandable" (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: cuMem segments that PyTorch shares
through file descriptors). The CUDA VMM API driven directly is not covered.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _fill(n: int, device: Any) -> Any:
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(1234)
    return torch.randint(-(2**31), 2**31 - 1, (n // 4,), dtype=torch.int32, device=device, generator=g)


def exporter(kind: str, nbytes: int, out: Any, hold: Any) -> None:
    if kind == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    import torch

    torch.cuda.set_device(0)
    buf = _fill(nbytes, torch.device("cuda", 0))
    torch.cuda.synchronize()
    out.put(("export", buf.untyped_storage()._share_cuda_()))
    hold.get(timeout=300)  # killed before this returns


def reader(kind: str, nbytes: int, copies: int, inbox: Any, out: Any) -> None:
    if kind == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    rec: dict[str, Any] = {"kind": kind, "bytes": nbytes, "copies": copies}
    try:
        import torch

        from swarm.transport.ipc import _Driver

        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        _, args = inbox.get(timeout=120)
        t0 = time.perf_counter()
        storage = torch.UntypedStorage._new_shared_cuda(0, *args[1:])
        rec["open_s"] = time.perf_counter() - t0
        try:
            base, size = _Driver.address_range(storage.data_ptr())
            rec["address_range"] = {
                "claimed": args[2],
                "offset_in_allocation": storage.data_ptr() - base,
                "allocation": size,
            }
        except Exception as e:
            rec["address_range"] = f"{type(e).__name__}: {e}"
        src = torch.empty(0, dtype=torch.uint8, device=dev)
        src.set_(storage, 0, (nbytes,))
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(copies):
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        out.put({"queued": time.time()})
        t1 = time.perf_counter()
        done.synchronize()
        rec["copies_s"] = time.perf_counter() - t1
        rec["copies_done_after_kill"] = True
        want = _fill(nbytes, dev).view(torch.uint8)
        rec["copy_equal"] = bool(torch.equal(dst, want))
        time.sleep(1.0)
        rec["mapping_equal_1s_later"] = bool(torch.equal(src, want))
        a = torch.randn(1024, 1024, device=dev)
        rec["kernel_ok"] = bool(torch.isfinite(a @ a).all().item())
    except Exception:
        rec["error"] = traceback.format_exc()[-2000:]
    out.put(rec)


def run(kind: str, gib: float, copies: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    nbytes = int(gib * (1 << 30)) // 4 * 4
    ex_out, hold, rd_in, rd_out = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    ex = ctx.Process(target=exporter, args=(kind, nbytes, ex_out, hold), daemon=True)
    rd = ctx.Process(target=reader, args=(kind, nbytes, copies, rd_in, rd_out), daemon=True)
    ex.start()
    rd.start()
    try:
        rd_in.put(ex_out.get(timeout=120))
        first = rd_out.get(timeout=120)
        if "queued" in first:
            os.kill(ex.pid, signal.SIGKILL)  # type: ignore[arg-type]
            killed = time.time()
            rec: dict[str, Any] = rd_out.get(timeout=120)
            rec["killed_after_queue_s"] = killed - first["queued"]
        else:
            rec = first
        ex.join(10)
        rec["exporter_exit"] = ex.exitcode
        return rec
    except queue.Empty:
        return {"kind": kind, "error": "timed out"}
    finally:
        for p in (ex, rd):
            if p.is_alive():
                p.kill()
            p.join(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--kinds", default="legacy,expandable")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    records = [run(k, args.gib, args.copies) for k in args.kinds.split(",") if k]
    for r in records:
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
