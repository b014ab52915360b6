"""GPU work on the swarm's own threads that cannot disturb CUDA graph capture in the same process.

Why: vLLM captures CUDA graphs after loading, while the node of the same process already serves pieces
from its background threads. PyTorch captures in CUDA's *global* capture mode by default: while one
thread captures, a "potentially unsafe" CUDA call from any other thread that is itself in global mode (a
synchronous copy, an allocation, a synchronisation) is refused, and the refusal invalidates the capture.
vLLM then fails at start-up with a capture error that names none of our code.

Rules, for every swarm thread that may touch a GPU:

1. `relax()` first: the thread switches itself to the *relaxed* capture mode
   (cuThreadExchangeStreamCaptureMode, a per-thread setting of the driver), in which another thread's
   capture does not prohibit its calls;
2. copies run on a private non-blocking stream (`side_stream`), never on the legacy default stream
   (which would synchronise implicitly with every blocking stream, a capturing one included), and the
   thread waits for that stream only (`copy_to_host`, `copy_from_host`).

tests/gpu/test_capture.py checks it on a GPU without vLLM: a process captures graphs in a loop while its
node serves two leechers; every capture must succeed and every piece verify.

Limits: needs the CUDA driver library (libcuda.so.1) loadable with ctypes; with no GPU tensor nothing
here runs and no CUDA call is made.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence

import torch

from swarm.errors import TransportError

#: CUstreamCaptureMode: CU_STREAM_CAPTURE_MODE_RELAXED
_RELAXED = 2
_local = threading.local()
_driver_lock = threading.Lock()
_driver: ctypes.CDLL | None = None


def _libcuda() -> ctypes.CDLL:
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = ctypes.CDLL("libcuda.so.1")
        return _driver


def relax(device: torch.device | None = None) -> None:
    """Put the calling thread in the relaxed stream-capture mode (once per thread). With `device`, first
    make that device's context current in this thread (a new thread has none)."""
    if getattr(_local, "relaxed", False):
        return
    if device is not None:
        torch.cuda.set_device(device)
    mode = ctypes.c_int(_RELAXED)
    try:
        rc = _libcuda().cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    except OSError as e:
        raise TransportError(f"cannot load the CUDA driver to set the capture mode: {e}") from e
    if rc != 0:
        raise TransportError(f"cuThreadExchangeStreamCaptureMode failed with CUDA error {rc}")
    _local.relaxed = True


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's private stream on `device` (created once per thread and device)."""
    streams: dict[int, torch.cuda.Stream] = getattr(_local, "streams", None) or {}
    _local.streams = streams
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
    return streams[index]


def _stream_for(v: torch.Tensor, used: dict[int, torch.cuda.Stream]) -> torch.cuda.Stream:
    """This thread's private stream for a GPU view (the thread relaxed first), noted in `used` so that
    the caller waits once per stream, after every copy is enqueued."""
    relax(v.device)
    stream = side_stream(v.device)
    used[id(stream)] = stream
    return stream


def copy_to_host(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Host copies of GPU views (CPU views returned as they are), made capture-safe; returns once every
    copy is done."""
    out: list[torch.Tensor] = []
    used: dict[int, torch.cuda.Stream] = {}
    for v in views:
        if v.device.type != "cuda":
            out.append(v)
            continue
        with torch.cuda.stream(_stream_for(v, used)):
            out.append(v.to("cpu", non_blocking=True))
    for stream in used.values():
        stream.synchronize()
    return out


def copy_from_host(views: Sequence[torch.Tensor], data: torch.Tensor) -> None:
    """Fill `views` (in order) from the host bytes `data`; returns once the bytes are in place."""
    offset = 0
    used: dict[int, torch.cuda.Stream] = {}
    for v in views:
        src = data[offset : offset + v.numel()]
        offset += v.numel()
        if v.device.type != "cuda":
            v.copy_(src)
            continue
        with torch.cuda.stream(_stream_for(v, used)):
            v.copy_(src, non_blocking=True)
    for stream in used.values():
        stream.synchronize()
