"""A thin ctypes binding of the few libnccl entry points swarm.transport.nccl uses.

A thin ctypes binding of libnccl (the very library torch loaded, found through /proc/self/maps, else
the nvidia-nccl package) rather than one c10d ProcessGroupNCCL per pair. Reasons:
- the NCCL unique id is 128 bytes that travel in our own authenticated `Channel` message; c10d needs a
  Store, i.e. a TCPStore server and port per pair (or a Python Store shim), beside the ZMQ control plane;
- non-blocking initialisation (ncclConfig_t.blocking = 0) lets a set-up whose peer vanished be aborted
  at any moment; c10d's eager init blocks its caller;
- we choose the CUDA stream of every transfer and order the checksum after it with events; c10d runs
  point-to-point on its internal streams and adds a watchdog thread per group;
- abort is one call on one communicator, with no process-wide side effects;
- both drive the same libnccl kernels, so the bandwidth cannot differ by design. bench/gpu.py's
  `binding` case measures set-up, 64 MiB-piece bandwidth and abort of both side by side; its figures
  go to docs/benchmarks.md once a machine of two GPUs or more has run it (none was lent so far).
The binding was checked against the real libnccl 2.28.9 (torch 2.11) on an H200: non-blocking init of
a one-rank communicator, a send to itself and a receive in one group, abort (tests/gpu).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from typing import ClassVar

from swarm.errors import ConfigError, TransportError

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
NCCL_INT8 = 0
NCCL_UINT8 = 1
NCCL_UNIQUE_ID_BYTES = 128
_CONFIG_UNDEF_INT = -2147483648
_API_MAGIC = 0xCAFEBEEF


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


class NcclConfig(ctypes.Structure):
    """ncclConfig_t as of NCCL 2.18. Newer libraries copy `size` bytes over their own defaults and
    keep the defaults of fields added later, so this layout works with every NCCL >= 2.18."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("magic", ctypes.c_uint),
        ("version", ctypes.c_uint),
        ("blocking", ctypes.c_int),
        ("cgaClusterSize", ctypes.c_int),
        ("minCTAs", ctypes.c_int),
        ("maxCTAs", ctypes.c_int),
        ("netName", ctypes.c_char_p),
        ("splitShare", ctypes.c_int),
    ]


class NcclError(TransportError):
    """An NCCL call failed; `code` is the ncclResult_t."""

    def __init__(self, message: str, code: int) -> None:
        self.code = code
        super().__init__(message)


def find_libnccl() -> str:
    """The libnccl to load: $SWARM_NCCL_LIBRARY, else the one this process already loaded (torch's),
    else the nvidia-nccl package's, else the system's."""
    env = os.environ.get("SWARM_NCCL_LIBRARY")
    if env:
        return env
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if line.strip() else ""
            if "/libnccl.so" in path:
                return path
    try:
        import nvidia.nccl  # type: ignore[import-not-found]

        for base in list(nvidia.nccl.__path__):
            candidate = os.path.join(base, "lib", "libnccl.so.2")
            if os.path.exists(candidate):
                return candidate
    except ImportError:
        pass
    return ctypes.util.find_library("nccl") or "libnccl.so.2"


class Nccl:
    """The few libnccl entry points vllm-swarm uses, with checked return codes.

    ctypes releases the GIL during each call. Calls on one communicator must not run concurrently.
    """

    _instances: ClassVar[dict[str, Nccl]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise ConfigError(
                f"cannot load libnccl from {path}: {e}",
                hint="install the nvidia-nccl package matching your CUDA, or set SWARM_NCCL_LIBRARY",
            ) from e
        self.path = path
        lib = self.lib
        c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [c_int]
        lib.ncclGetVersion.argtypes = [ctypes.POINTER(c_int)]
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(NcclUniqueId)]
        lib.ncclCommInitRankConfig.argtypes = [
            ctypes.POINTER(c_void_p),
            c_int,
            NcclUniqueId,
            c_int,
            ctypes.POINTER(NcclConfig),
        ]
        lib.ncclCommGetAsyncError.argtypes = [c_void_p, ctypes.POINTER(c_int)]
        lib.ncclCommAbort.argtypes = [c_void_p]
        lib.ncclCommDestroy.argtypes = [c_void_p]
        for fn in (lib.ncclSend, lib.ncclRecv):
            fn.argtypes = [c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]
        lib.ncclBroadcast.argtypes = [c_void_p, c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p]
        lib.ncclGroupStart.argtypes = []
        lib.ncclGroupEnd.argtypes = []
        for fn in (
            lib.ncclGetVersion,
            lib.ncclGetUniqueId,
            lib.ncclCommInitRankConfig,
            lib.ncclCommGetAsyncError,
            lib.ncclCommAbort,
            lib.ncclCommDestroy,
            lib.ncclSend,
            lib.ncclRecv,
            lib.ncclBroadcast,
            lib.ncclGroupStart,
            lib.ncclGroupEnd,
        ):
            fn.restype = c_int
        v = ctypes.c_int()
        self._check(lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        self.version = v.value
        if self.version < 21800:
            raise ConfigError(f"libnccl {self.version} at {path} is too old", hint="NCCL >= 2.18 is needed")

    @classmethod
    def load(cls, path: str | None = None) -> Nccl:
        path = path or find_libnccl()
        with cls._lock:
            inst = cls._instances.get(path)
            if inst is None:
                inst = cls._instances[path] = cls(path)
            return inst

    def error_string(self, code: int) -> str:
        s = self.lib.ncclGetErrorString(code)
        return s.decode(errors="replace") if s else f"ncclResult {code}"

    def _check(self, rc: int, what: str) -> int:
        if rc not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            raise NcclError(f"{what} failed: {self.error_string(rc)} ({rc})", rc)
        return rc

    def unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), NCCL_UNIQUE_ID_BYTES)

    def init_rank(
        self, nranks: int, uid: bytes, rank: int, *, blocking: bool, max_ctas: int | None = None
    ) -> tuple[int, int]:
        """Start (blocking=False) or run a communicator's initialisation on the current CUDA device.
        Returns (comm handle, rc); with rc == NCCL_IN_PROGRESS poll `async_error` until it is done."""
        if len(uid) != NCCL_UNIQUE_ID_BYTES:
            raise NcclError(f"NCCL unique id of {len(uid)} bytes, expected {NCCL_UNIQUE_ID_BYTES}", 4)
        cid = NcclUniqueId()
        ctypes.memmove(ctypes.addressof(cid), uid, NCCL_UNIQUE_ID_BYTES)
        config = NcclConfig(
            ctypes.sizeof(NcclConfig),
            _API_MAGIC,
            21800,
            1 if blocking else 0,
            _CONFIG_UNDEF_INT,
            _CONFIG_UNDEF_INT,
            max_ctas if max_ctas else _CONFIG_UNDEF_INT,
            None,
            _CONFIG_UNDEF_INT,
        )
        comm = ctypes.c_void_p()
        rc = self.lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, cid, rank, ctypes.byref(config))
        if rc not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            if comm.value:
                self.lib.ncclCommAbort(comm)
            raise NcclError(f"ncclCommInitRankConfig failed: {self.error_string(rc)} ({rc})", rc)
        return int(comm.value or 0), rc

    def async_error(self, comm: int) -> int:
        state = ctypes.c_int()
        rc = self.lib.ncclCommGetAsyncError(ctypes.c_void_p(comm), ctypes.byref(state))
        self._check(rc, "ncclCommGetAsyncError")
        return state.value

    def send(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        rc = self.lib.ncclSend(
            ctypes.c_void_p(ptr), nbytes, NCCL_UINT8, peer, ctypes.c_void_p(comm), ctypes.c_void_p(stream)
        )
        return self._check(rc, "ncclSend")

    def recv(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        rc = self.lib.ncclRecv(
            ctypes.c_void_p(ptr), nbytes, NCCL_UINT8, peer, ctypes.c_void_p(comm), ctypes.c_void_p(stream)
        )
        return self._check(rc, "ncclRecv")

    def broadcast(self, comm: int, ptr: int, nbytes: int, root: int, stream: int) -> int:
        rc = self.lib.ncclBroadcast(
            ctypes.c_void_p(ptr),
            ctypes.c_void_p(ptr),
            nbytes,
            NCCL_UINT8,
            root,
            ctypes.c_void_p(comm),
            ctypes.c_void_p(stream),
        )
        return self._check(rc, "ncclBroadcast")

    def group_start(self) -> None:
        self._check(self.lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> int:
        return self._check(self.lib.ncclGroupEnd(), "ncclGroupEnd")

    def abort(self, comm: int) -> int:
        return int(self.lib.ncclCommAbort(ctypes.c_void_p(comm)))

    def destroy(self, comm: int) -> int:
        return int(self.lib.ncclCommDestroy(ctypes.c_void_p(comm)))
