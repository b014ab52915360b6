"""A fused GPU checksum: swarm.manifest's `wsum32` values of a piece in one pass over its bytes.

Used by the GPU transports (swarm.transport.nccl, swarm.transport.ipc) to verify every received piece on
the GPU before it is announced. Measured on an H200: 60 us for a 64 MiB piece against 289 us for the torch
version in swarm.manifest, which is slower than NVLink delivers the piece (~183 us) and would cap a
receiver near 230 GB/s. Needs Triton and CUDA tensors; `fused_checksum_works` says whether it runs here
(else callers use swarm.manifest.checksum_async, same values).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from swarm.manifest import checksum_async

log = logging.getLogger("swarm.transport.gpu_checksum")


#: Filled by `_build_fused_kernel` (Triton is imported only when a GPU transport verifies a piece).
tl: Any = None
_fused_kernel: Any = None
FUSED_BLOCK = 8192


def _build_fused_kernel() -> Any:
    """The Triton kernel behind `fused_checksum_async`; built on first use."""
    global _fused_kernel, tl
    if _fused_kernel is not None:
        return _fused_kernel
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[misc, untyped-decorator, unused-ignore]
    def checksum_kernel(x_ptr, out_ptr, n, base, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        # Per block of BLOCK int32 words: s1 = sum(x), s2 = sum(x * w(position)) in int64, where the
        # int32 product wraps and w is swarm.manifest's position hash, computed here in registers.
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0)
        m32 = tl.full([BLOCK], 4294967295, tl.int64)
        h = ((offs + base + 1) * tl.full([BLOCK], 2654435761, tl.int64)) & m32
        h = h ^ (h >> 16)
        h = (h * tl.full([BLOCK], 2246822507, tl.int64)) & m32
        h = h ^ (h >> 13)
        w = ((h & 2147483647) | 1).to(tl.int32)
        tl.store(out_ptr + pid * 2, tl.sum(x.to(tl.int64), axis=0))
        tl.store(out_ptr + pid * 2 + 1, tl.sum((x * w).to(tl.int64), axis=0))

    _fused_kernel = checksum_kernel
    return _fused_kernel


def fused_checksum_async(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """The same int64 [s1, s2] as swarm.manifest.checksum_async, in one read of the bytes.

    The manifest's torch version makes about five passes (sum; multiply reading the words and a cached
    weight table, writing the products; sum of products): on an H200 it verifies a 64 MiB piece in
    ~290 us, slower than NVLink delivers one (~180 us at 366 GB/s), so it would cap a receiver near
    230 GB/s. This kernel reads each word once and computes the weights in registers (~60 us a 64 MiB
    piece on an H200). Values are bit-identical (integer sums are exact and order-free; checked by
    bench/gpu.py over a whole model and by tests/gpu); CUDA tensors only, needs Triton.
    """
    kernel = _build_fused_kernel()
    device = views[0].device
    parts: list[torch.Tensor] = []
    for v in views:
        if v.numel() % 4 or v.data_ptr() % 4:
            total = sum(x.numel() for x in views)
            buf = torch.zeros((total + 3) // 4 * 4, dtype=torch.uint8, device=device)
            torch.cat(list(views), out=buf[:total])
            parts = [buf.view(torch.int32)]
            break
        parts.append(v.view(torch.int32))
    partials = []
    base = 0
    for words in parts:
        n = words.numel()
        if n == 0:
            continue
        blocks = (n + FUSED_BLOCK - 1) // FUSED_BLOCK
        out = torch.empty((blocks, 2), dtype=torch.int64, device=device)
        kernel[(blocks,)](words, out, n, base, BLOCK=FUSED_BLOCK, num_warps=8)
        partials.append(out)
        base += n
    if not partials:
        return torch.zeros(2, dtype=torch.int64, device=device)
    return (partials[0] if len(partials) == 1 else torch.cat(partials)).sum(dim=0)


_works: dict[str, bool] = {}


def fused_checksum_works(device: torch.device) -> bool:
    """True when `fused_checksum_async` runs here and agrees with swarm.manifest on random bytes (checked
    once per device and process: several transports of one node ask)."""
    key = str(device)
    if key not in _works:
        _works[key] = _check(device)
    return _works[key]


def _check(device: torch.device) -> bool:
    try:
        g = torch.Generator(device=device)
        g.manual_seed(12345)
        for n in ((1 << 20) + 12, 1001):
            b = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device, generator=g)
            parts = [b[: n // 2 // 4 * 4], b[n // 2 // 4 * 4 :]]
            if not torch.equal(fused_checksum_async(parts), checksum_async(parts)):
                log.warning("fused checksum disagrees with swarm.manifest's; using the torch version")
                return False
        return True
    except Exception as e:  # no Triton, no compiler: the torch version is always there
        log.info("fused checksum unavailable (%s: %s); using the torch version", type(e).__name__, e)
        return False
