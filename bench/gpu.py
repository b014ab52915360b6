"""GPU benchmark of vllm-swarm's data path, every case side by side in one run on one machine.

    python bench/gpu.py --json $OUT/gpu.json            # all cases, all visible GPUs
    python bench/gpu.py --cases pair,naive --gpus 2

One process a GPU (rank 0 is the seed, ranks 1..k leechers), a synthetic model shaped like an 8B
Llama in bf16 (vLLM's fused qkv_proj/gate_up_proj, 195 tensors, 16.06 GB, 288 pieces), made on the GPU,
no download. Cases (each with end-to-end time, communicator set-up included, and transfer-only time):

- pair: NCCL send of every tensor from the seed to one leecher, straight between parameter memories:
  the floor;
- naive: the seed sends the whole model to k leechers at once (k = 1..GPUs-1), one communicator each;
- broadcast: ncclBroadcast of every tensor to k leechers in one static group;
- transport: k leechers fetch every piece from the seed through swarm.transport.nccl (piece signals,
  pipelining, GPU checksums) with a small stand-in control plane over multiprocessing queues;
- swarm, swarm_staggered: real swarm.node processes, one a GPU, over NCCL and (`swarm_ipc`,
  `swarm_staggered_ipc`) over CUDA IPC between the GPUs (--swarm-transports);
- disk: safetensors.torch.load_file of the same tensors from the page cache into the GPU;
- checksum: swarm.manifest's checksum over the whole model, and a fused Triton kernel of the same
  function (values checked identical), in GB/s;
- serving: a bf16 matrix-multiply loop on the seed GPU alone, then while the seed serves pieces
  (default settings, then under a rate cap);
- binding: one c10d ProcessGroupNCCL per pair (with a store) against the ctypes binding: set-up,
  64 MiB-piece bandwidth, abort.
- ipc (one GPU, every member a process of its own): the primitive (k readers map the seed's export
  through swarm.transport.ipc and copy plus verify the whole model, piece by piece on 4 streams, all at
  once; best of --ipc-rounds), and the swarm (seed + k leecher nodes, transport "auto", which picks CUDA
  IPC): end-to-end from the leechers' node start (static peers on loopback, handshake included) and
  transfer-only (first copy to last verified piece, as the transport timed them); k = 1 and 3, with a
  cluster token. Then k = 1 with a cold checksum kernel (`ipc_swarm_cold`), k = 3 with each leecher
  knowing only the seed (`ipc_swarm_star`), and a bf16 matmul loop in the seed alone and while 3
  leechers pull.

Output: a table (ratios to the pair floor), and with --json a list of records with at least `case`,
`leechers`, `bytes`, `e2e_s`, `transfer_s`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in SAFE_ENV.items():
    os.environ[_k] = _v

import torch  # noqa: E402

from swarm.manifest import Manifest, as_bytes, checksum_async, piece_checksums  # noqa: E402
from swarm.protocol import Channel, Request, decode_payload, pack  # noqa: E402
from swarm.transport.base import Events  # noqa: E402
from swarm.transport.gpu_checksum import fused_checksum_async  # noqa: E402
from swarm.transport.nccl import NcclTransport  # noqa: E402
from swarm.transport.nccl_binding import NCCL_IN_PROGRESS, NCCL_SUCCESS, Nccl, NcclError  # noqa: E402
from tests.loopback import free_port  # noqa: E402

ALL_CASES = (
    "checksum",
    "pair",
    "naive",
    "broadcast",
    "transport",
    "swarm",
    "swarm_staggered",
    "serving",
    "binding",
    "disk",
    "cpu_costs",
    "control",
    "ipc",
)

# --- the synthetic model -----------------------------------------------------------------------------


def llama_spec(
    layers: int = 32,
    hidden: int = 4096,
    inter: int = 14336,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 128256,
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names and shapes of a Llama-style model as vLLM holds it after loading (fused qkv, gate_up)."""
    hd = hidden // heads
    bf = torch.bfloat16
    spec: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        ("model.embed_tokens.weight", (vocab, hidden), bf)
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [
            (p + "self_attn.qkv_proj.weight", ((heads + 2 * kv_heads) * hd, hidden), bf),
            (p + "self_attn.o_proj.weight", (hidden, hidden), bf),
            (p + "mlp.gate_up_proj.weight", (2 * inter, hidden), bf),
            (p + "mlp.down_proj.weight", (hidden, inter), bf),
            (p + "input_layernorm.weight", (hidden,), bf),
            (p + "post_attention_layernorm.weight", (hidden,), bf),
        ]
    spec += [("model.norm.weight", (hidden,), bf), ("lm_head.weight", (vocab, hidden), bf)]
    return spec


def small_spec() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A few hundred MB with odd sizes (an int8 tensor of odd length) for tests."""
    spec = llama_spec(layers=3, hidden=512, inter=1400, heads=8, kv_heads=2, vocab=32003)
    spec.insert(5, ("model.layers.0.odd_scale", (1001,), torch.int8))
    return spec


def make_model(
    spec: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    device: torch.device,
    *,
    random: bool,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    out = {}
    for name, shape, dtype in spec:
        t = torch.empty(shape, dtype=dtype, device=device)
        if random:
            if dtype.itemsize == 2:
                t.view(torch.int16).random_(-32768, 32767, generator=g)
            else:
                t.view(torch.int8).random_(-128, 127, generator=g)
        else:
            as_bytes(t).fill_(0xA5)
        out[name] = t
    return out


def poison(tensors: dict[str, torch.Tensor]) -> None:
    for t in tensors.values():
        as_bytes(t).fill_(0xA5)
    torch.cuda.synchronize()


HAVE_TRITON = importlib.util.find_spec("triton") is not None


ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int8: "I8",
    torch.uint8: "U8",
}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file of `tensors`, written one tensor at a time (no second copy in host memory)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(as_bytes(t).cpu().numpy().data)


# --- coordination between the benchmark's processes ------------------------------------------------


class Coord:
    """Barriers and small values through a torch TCPStore hosted by the parent process."""

    def __init__(self, port: int, rank: int, world: int) -> None:
        import torch.distributed as dist

        self.store = dist.TCPStore(
            "127.0.0.1", port, world + 1, False, timeout=datetime.timedelta(seconds=300)
        )
        self.rank = rank
        self.world = world

    def barrier(self, name: str, n: int | None = None, timeout: float = 150.0) -> None:
        """Wait until n processes reached `name`; raise at once when another process gave up."""
        n = self.world if n is None else n
        self.store.add(f"bar/{name}", 1)
        deadline = time.monotonic() + timeout
        polls = 0
        while int(self.store.add(f"bar/{name}", 0)) < n:
            polls += 1
            if polls % 100 == 0 and self.store.check(["abort"]):
                raise RuntimeError(f"another process gave up: {self.store.get('abort').decode()[:300]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {name}")
            time.sleep(0.0005)

    def set(self, key: str, value: Any) -> None:
        self.store.set(key, json.dumps(value))

    def get(self, key: str) -> Any:
        return json.loads(self.store.get(key))

    def maybe(self, key: str) -> Any:
        """The value of `key`, or None when it is not set yet (never blocks)."""
        return self.get(key) if self.store.check([key]) else None

    def set_bytes(self, key: str, value: bytes) -> None:
        self.store.set(key, value)

    def get_bytes(self, key: str) -> bytes:
        return bytes(self.store.get(key))


def nccl_settle(nccl: Nccl, comms: list[int], timeout: float = 120.0) -> None:
    """Wait until non-blocking communicators have finished their pending work (init, a call)."""
    deadline = time.monotonic() + timeout
    pending = list(comms)
    while pending:
        still = []
        for c in pending:
            s = nccl.async_error(c)
            if s == NCCL_IN_PROGRESS:
                still.append(c)
            elif s != NCCL_SUCCESS:
                raise NcclError(f"NCCL: {nccl.error_string(s)}", s)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError("NCCL communicator did not settle")
            time.sleep(0.0002)


def nccl_do(nccl: Nccl, comm: int, rc: int) -> None:
    if rc == NCCL_IN_PROGRESS:
        nccl_settle(nccl, [comm])


# --- a stand-in control plane: relays messages between transports over multiprocessing queues -----


class MiniNode:
    """What swarm.node does for one transport, reduced to a fetch in order from given peers with a
    window of outstanding requests: relays `Channel` messages, serves `Request`s, reports arrivals."""

    def __init__(
        self,
        me: str,
        inboxes: dict[str, Any],
        transport: NcclTransport,
        manifest: Manifest,
        tensors: dict[str, torch.Tensor],
        checksums: list[str],
    ) -> None:
        self.me = me
        self.inboxes = inboxes
        self.transport = transport
        self.cond = threading.Condition()
        self.done: set[int] = set()
        self.outstanding: dict[int, str] = {}
        self.pending: collections.deque[tuple[int, str]] = collections.deque()
        self.failures: list[str] = []
        self.closed: list[str] = []
        self.received_count = 0
        self.window = 8
        self.retry = True  # ask again for a piece that failed
        self.cyclic: list[tuple[int, str]] | None = None  # refill the queue with these when it runs dry
        self.stop = threading.Event()
        transport.bind(
            manifest,
            tensors,
            Events(
                received=self._received,
                failed=self._failed,
                sent=lambda peer, p, ok: None,
                closed=self._closed,
                notify=self._notify,
            ),
        )
        transport.set_checksums(checksums)
        transport.open("127.0.0.1")
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _notify(self, peer: str, msg: Any) -> None:
        self.inboxes[peer].put((self.me, pack(msg)))

    def _loop(self) -> None:
        box = self.inboxes[self.me]
        while not self.stop.is_set():
            try:
                src, frame = box.get(timeout=0.05)
            except queue.Empty:
                continue
            msg = decode_payload(frame)
            if isinstance(msg, Channel):
                self.transport.on_message(src, msg)
            elif isinstance(msg, Request):
                self.transport.send(src, msg.piece)

    def _pump(self) -> None:
        while self.pending and len(self.outstanding) < self.window:
            p, peer = self.pending.popleft()
            self.outstanding[p] = peer
            self.transport.expect(peer, p)
            self._notify(peer, Request(p))
        if self.cyclic is not None and not self.pending:
            self.pending.extend(self.cyclic)

    def _received(self, peer: str, p: int) -> None:
        with self.cond:
            self.outstanding.pop(p, None)
            self.done.add(p)
            self.received_count += 1
            self._pump()
            self.cond.notify_all()

    def _failed(self, peer: str, p: int, reason: str) -> None:
        with self.cond:
            self.failures.append(f"{p}: {reason}")
            if self.outstanding.pop(p, None) is not None and self.retry and not self.closed:
                self.pending.appendleft((p, peer))
            self._pump()
            self.cond.notify_all()

    def _closed(self, peer: str, reason: str) -> None:
        with self.cond:
            self.closed.append(f"{peer}: {reason}")
            self.cond.notify_all()

    def ready(self, peer: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.transport.is_ready(peer):
                return
            if time.monotonic() > deadline or self.closed:
                raise TimeoutError(f"channel from {peer} not ready: {self.closed}")
            time.sleep(0.0005)

    def fetch(self, plan: list[tuple[int, str]], timeout: float = 150.0) -> None:
        """Fetch pieces in order (piece, peer); returns when all arrived, raises on a closed channel."""
        with self.cond:
            self.pending.extend(plan)
            self._pump()
            want = {p for p, _ in plan}
            deadline = time.monotonic() + timeout
            while not want <= self.done:
                if self.closed:
                    raise RuntimeError(f"channel closed: {self.closed}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(want - self.done)} pieces missing")
                self.cond.wait(timeout=min(left, 1.0))

    def shutdown(self) -> None:
        self.stop.set()
        self.transport.close()
        self.thread.join(timeout=5)


# --- the worker: one process a GPU -----------------------------------------------------------------


class Worker:
    def __init__(self, rank: int, world: int, port: int, inboxes: dict[str, Any], results: Any, args: Any):
        self.rank = rank
        self.world = world
        self.args = args
        self.results = results
        self.inboxes = inboxes
        self.device = torch.device("cuda", rank)
        torch.cuda.set_device(self.device)
        self.coord = Coord(port, rank, world)
        self.nccl = Nccl.load()
        spec = small_spec() if args.model == "small" else llama_spec()
        t = time.perf_counter()
        self.tensors = make_model(spec, self.device, random=(rank == 0), seed=1234)
        torch.cuda.synchronize()
        self.manifest = Manifest.from_tensors(self.tensors, piece_size=args.piece_mib << 20)
        self.bytes = self.manifest.total_bytes
        self.log(
            f"model {len(self.tensors)} tensors, {self.bytes / 1e9:.2f} GB, {time.perf_counter() - t:.2f} s"
        )
        if rank == 0:
            self.checksums = piece_checksums(self.manifest, self.tensors)
            self.coord.set("checksums", self.checksums)
        self.coord.barrier("built")
        if rank != 0:
            self.checksums = self.coord.get("checksums")
        self.nodes: MiniNode | None = None

    def log(self, msg: str) -> None:
        print(f"[r{self.rank} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def record(self, **rec: Any) -> None:
        rec.setdefault("device", torch.cuda.get_device_name(self.device))
        self.results.put(rec)
        self.log(f"record {rec}")

    def verify(self) -> bool:
        torch.cuda.synchronize()
        return piece_checksums(self.manifest, self.tensors) == self.checksums

    def tensor_list(self) -> list[torch.Tensor]:
        return [as_bytes(t) for t in self.tensors.values()]

    # --- NCCL baselines ------------------------------------------------------------------------------

    def p2p(self, label: str, k: int) -> None:
        key = f"{label}/{k}"
        ranks = k + 1
        part = self.rank < ranks
        if self.rank != 0:
            poison(self.tensors)
        if self.rank == 0:
            for i in range(1, ranks):
                self.coord.set_bytes(f"{key}/uid{i}", self.nccl.unique_id())
        self.coord.barrier(f"{key}/uids")
        if not part:
            self.coord.barrier(f"{key}/ready")
            self.coord.barrier(f"{key}/end")
            return
        t0 = time.perf_counter()
        if self.rank == 0:
            comms = [
                self.nccl.init_rank(2, self.coord.get_bytes(f"{key}/uid{i}"), 0, blocking=False)[0]
                for i in range(1, ranks)
            ]
        else:
            comms = [
                self.nccl.init_rank(2, self.coord.get_bytes(f"{key}/uid{self.rank}"), 1, blocking=False)[0]
            ]
        nccl_settle(self.nccl, comms)
        streams = [torch.cuda.Stream(self.device) for _ in comms]
        w = torch.zeros(4, dtype=torch.uint8, device=self.device)
        for c, s in zip(comms, streams, strict=True):
            if self.rank == 0:
                nccl_do(self.nccl, c, self.nccl.send(c, w.data_ptr(), 4, 1, s.cuda_stream))
            else:
                nccl_do(self.nccl, c, self.nccl.recv(c, w.data_ptr(), 4, 0, s.cuda_stream))
        torch.cuda.synchronize()
        setup = time.perf_counter() - t0
        self.coord.barrier(f"{key}/ready", n=self.world)
        start = time.time()
        views = self.tensor_list()
        if self.rank == 0:
            for c, s in zip(comms, streams, strict=True):
                for v in views:
                    nccl_do(self.nccl, c, self.nccl.send(c, v.data_ptr(), v.numel(), 1, s.cuda_stream))
        else:
            c, s = comms[0], streams[0]
            for v in views:
                nccl_do(self.nccl, c, self.nccl.recv(c, v.data_ptr(), v.numel(), 0, s.cuda_stream))
        torch.cuda.synchronize()
        end = time.time()
        self.coord.set(f"{key}/r{self.rank}", {"start": start, "end": end, "setup": setup})
        self.coord.barrier(f"{key}/end", n=self.world)
        t = time.perf_counter()
        for c in comms:
            self.nccl.abort(c)
        abort_s = time.perf_counter() - t
        ok = self.verify() if self.rank != 0 else True
        self.coord.set(f"{key}/ok{self.rank}", ok)
        self.coord.barrier(f"{key}/verified", n=ranks)
        if self.rank == 0:
            rows = [self.coord.get(f"{key}/r{r}") for r in range(ranks)]
            transfer = max(r["end"] for r in rows) - rows[0]["start"]
            setup_s = max(r["setup"] for r in rows)
            oks = [self.coord.get(f"{key}/ok{r}") for r in range(1, ranks)]
            self.record(
                case=label,
                leechers=k,
                bytes=self.bytes,
                e2e_s=setup_s + transfer,
                transfer_s=transfer,
                setup_s=setup_s,
                abort_s=abort_s,
                identical=all(oks),
            )

    def broadcast(self, k: int) -> None:
        key = f"broadcast/{k}"
        ranks = k + 1
        if self.rank != 0:
            poison(self.tensors)
        if self.rank == 0:
            self.coord.set_bytes(f"{key}/uid", self.nccl.unique_id())
        self.coord.barrier(f"{key}/uids")
        if self.rank >= ranks:
            self.coord.barrier(f"{key}/ready")
            self.coord.barrier(f"{key}/end")
            return
        t0 = time.perf_counter()
        comm = self.nccl.init_rank(ranks, self.coord.get_bytes(f"{key}/uid"), self.rank, blocking=False)[0]
        nccl_settle(self.nccl, [comm])
        s = torch.cuda.Stream(self.device)
        w = torch.zeros(4, dtype=torch.uint8, device=self.device)
        nccl_do(self.nccl, comm, self.nccl.broadcast(comm, w.data_ptr(), 4, 0, s.cuda_stream))
        torch.cuda.synchronize()
        setup = time.perf_counter() - t0
        self.coord.barrier(f"{key}/ready")
        start = time.time()
        for v in self.tensor_list():
            nccl_do(self.nccl, comm, self.nccl.broadcast(comm, v.data_ptr(), v.numel(), 0, s.cuda_stream))
        torch.cuda.synchronize()
        end = time.time()
        self.coord.set(f"{key}/r{self.rank}", {"start": start, "end": end, "setup": setup})
        self.coord.barrier(f"{key}/end")
        self.nccl.abort(comm)
        ok = self.verify() if self.rank != 0 else True
        self.coord.set(f"{key}/ok{self.rank}", ok)
        self.coord.barrier(f"{key}/verified", n=ranks)
        if self.rank == 0:
            rows = [self.coord.get(f"{key}/r{r}") for r in range(ranks)]
            transfer = max(r["end"] for r in rows) - min(r["start"] for r in rows)
            setup_s = max(r["setup"] for r in rows)
            self.record(
                case="broadcast",
                leechers=k,
                bytes=self.bytes,
                e2e_s=setup_s + transfer,
                transfer_s=transfer,
                setup_s=setup_s,
                identical=all(self.coord.get(f"{key}/ok{r}") for r in range(1, ranks)),
            )

    # --- the transport, with the stand-in control plane -------------------------------------------------

    def node(self) -> MiniNode:
        if self.nodes is None:
            self.nodes = MiniNode(
                f"r{self.rank}",
                self.inboxes,
                NcclTransport(self.device),
                self.manifest,
                self.tensors,
                self.checksums,
            )
        return self.nodes

    def transport(self, k: int) -> None:
        key = f"transport/{k}"
        if self.rank != 0:
            poison(self.tensors)
        self.coord.barrier(f"{key}/start")
        if self.rank == 0 or self.rank > k:
            self.node()
            self.coord.barrier(f"{key}/end")
        else:
            t0 = time.perf_counter()
            node = self.node()
            bind_s = time.perf_counter() - t0
            node.transport.connect("r0", {})
            node.ready("r0")
            t1 = time.perf_counter()
            node.fetch([(p.index, "r0") for p in self.manifest.pieces])
            t2 = time.perf_counter()
            ok = self.verify()
            st = node.transport.stats()
            self.coord.set(
                f"{key}/r{self.rank}",
                {
                    "e2e": t2 - t0,
                    "bind": bind_s,
                    "setup": t1 - t0,
                    "transfer": t2 - t1,
                    "ok": ok,
                    "failures": len(node.failures),
                    "init_s": st["init_s"],
                },
            )
            self.coord.barrier(f"{key}/end")
        if self.rank == 0:
            rows = [self.coord.get(f"{key}/r{r}") for r in range(1, k + 1)]
            self.record(
                case="transport",
                leechers=k,
                bytes=self.bytes,
                e2e_s=max(r["e2e"] for r in rows),
                transfer_s=max(r["transfer"] for r in rows),
                setup_s=max(r["setup"] for r in rows),
                bind_s=max(r["bind"] for r in rows),
                identical=all(r["ok"] for r in rows),
                failures=sum(r["failures"] for r in rows),
                init_s=[r["init_s"] for r in rows],
                pieces=len(self.manifest.pieces),
            )

    # --- the swarm: real swarm.node processes over ZMQ on loopback, static peers --------------------------

    def swarm(
        self,
        k: int,
        stagger_s: float,
        label: str,
        sched: str = "default",
        piece_mib: int = 64,
        transport: str = "nccl",
    ) -> None:
        """k leechers (ranks 1..k) fetch through swarm.node from the seed (rank 0) and each other over
        `transport` ("nccl", or "ipc": each reads the others' GPU memory through CUDA IPC); leecher i
        starts (i - 1) x stagger_s after the first."""
        from swarm.manifest import SwarmKey
        from swarm.node import Node, NodeConfig
        from swarm.transport.ipc import IpcTransport

        def make() -> Any:
            return NcclTransport(self.device) if transport == "nccl" else IpcTransport(self.device)

        key = f"{label}/{transport}/{sched}/{piece_mib}/{k}"
        ports = self.args.ports
        manifest = Manifest.from_tensors(self.tensors, piece_size=piece_mib << 20)
        members = range(k + 1)
        if self.rank != 0:
            poison(self.tensors)
        cfg = NodeConfig(
            transport=transport,
            peers=",".join(f"127.0.0.1:{ports[j]}" for j in members if j != self.rank),
            host="127.0.0.1",
            control_port=ports[self.rank],
            mdns=False,
            piece_size=manifest.piece_size,
            discovery_timeout_s=20.0,
            stall_timeout_s=30.0,
            deadline_s=120.0,
            scheduler=_nvlink_scheduler() if sched == "nvlink" else None,
        )
        skey = SwarmKey(model_id="bench-llama8b", dtype="bfloat16", engine="bench")
        node = None
        if self.rank == 0:
            node = Node(
                skey,
                self.tensors,
                cfg,
                complete=True,
                manifest=manifest,
                transport=make(),
            ).start()
        self.coord.barrier(f"{key}/start")
        t_go = time.time()
        if 0 < self.rank <= k:
            time.sleep((self.rank - 1) * stagger_s)
            first: list[float] = []

            def progress(held: int, total: int) -> None:
                if held and not first:
                    first.append(time.time())

            t0 = time.time()
            node = Node(
                skey,
                self.tensors,
                cfg,
                complete=False,
                manifest=manifest,
                transport=make(),
            ).start()
            report = node.fetch(progress)
            t1 = time.time()
            ok = self.verify()
            st = node.transport.stats()
            self.coord.set(
                f"{key}/r{self.rank}",
                {
                    "start": t0,
                    "first": first[0] if first else t1,
                    "end": t1,
                    "ok": ok,
                    "from": {
                        ("seed" if pid == self._seed_id(key) else pid): b
                        for pid, b in report.bytes_by_peer.items()
                    },
                    "init_s": st.get("init_s", []),
                    "checksum": st["checksum"],
                    "fetch_s": report.seconds,
                },
            )
        elif self.rank == 0:
            assert node is not None
            self.coord.set(f"{key}/seed_id", node.id)
        self.coord.barrier(f"{key}/end")
        if node is not None:
            t = time.perf_counter()
            node.close()
            close_s = time.perf_counter() - t
        else:
            close_s = 0.0
        self.coord.barrier(f"{key}/closed")
        if self.rank == 0:
            rows = [self.coord.get(f"{key}/r{r}") for r in range(1, k + 1)]
            if (
                label == "swarm"
                and transport == self.args.swarm_transports[0]
                and k == 1
                and sched == "nvlink"
                and piece_mib == max(self.args.swarm_piece_mib)
            ):
                self.coord.set("swarm/single_e2e", rows[0]["end"] - rows[0]["start"])
            self.record(
                case=label if transport == "nccl" else f"{label}_{transport}",
                transport=transport,
                leechers=k,
                bytes=self.bytes,
                e2e_s=max(r["end"] - r["start"] for r in rows),
                transfer_s=max(r["end"] for r in rows) - min(r["first"] for r in rows),
                all_loaded_s=max(r["end"] for r in rows) - t_go,
                stagger_s=stagger_s,
                identical=all(r["ok"] for r in rows),
                bytes_from=[r["from"] for r in rows],
                init_s=[r["init_s"] for r in rows],
                checksum=rows[0]["checksum"],
                seed_close_s=close_s,
                scheduler=sched,
                piece_mib=piece_mib,
            )

    def _seed_id(self, key: str) -> str:
        v = self.coord.maybe(f"{key}/seed_id")
        return str(v) if v else "?"

    # --- non-disturbing serving --------------------------------------------------------------------------

    def serving(self, seconds: float) -> None:
        """Matmul loop on the seed GPU alone, then while serving leechers (default, then rate-capped)."""
        k = self.world - 1
        node = self.node()
        if self.rank != 0:
            node.transport.connect("r0", {})
            node.ready("r0")
        self.coord.barrier("serving/ready")
        phases = [("alone", None), ("serving", None), ("capped", 25e9), ("alone2", None)]
        if self.rank == 0:
            rates: dict[str, dict[str, float]] = {}
            for work in ("compute", "decode"):
                replay, flop = self._matmul_graph(work)
                for name, cap in phases:
                    node.transport.rate_limit = cap
                    serve = name in ("serving", "capped")
                    if serve:
                        self.coord.set("serving/go", [work, name, True])
                        self.coord.barrier(f"serving/{work}/{name}/on")
                        time.sleep(0.3)
                    sent0 = node.transport.stats()["bytes_sent"]
                    t = time.perf_counter()
                    rate = self._run_graph(replay, flop, seconds)
                    moved = (node.transport.stats()["bytes_sent"] - sent0) / (time.perf_counter() - t)
                    rates.setdefault(work, {})[name] = rate
                    rates[work][name + "_GBps"] = moved / 1e9
                    if serve:
                        self.coord.set("serving/go", [work, name, False])
                        self.coord.barrier(f"serving/{work}/{name}/off")
                node.transport.rate_limit = None
            for work, r in rates.items():
                alone = max(r["alone"], r["alone2"])
                self.record(
                    case="serving",
                    leechers=k,
                    bytes=None,
                    e2e_s=None,
                    transfer_s=None,
                    workload=work,
                    tflops_alone=r["alone"],
                    tflops_alone_again=r["alone2"],
                    tflops_serving=r["serving"],
                    serving_GBps=r["serving_GBps"],
                    slowdown=1 - r["serving"] / alone,
                    cap_GBps=25,
                    tflops_capped=r["capped"],
                    capped_GBps=r["capped_GBps"],
                    slowdown_capped=1 - r["capped"] / alone,
                )
        else:
            everything = [(p.index, "r0") for p in self.manifest.pieces]
            for work in ("compute", "decode"):
                for name, _ in phases:
                    if name not in ("serving", "capped"):
                        continue
                    self._wait_go([work, name, True])
                    with node.cond:
                        node.cyclic = everything
                        node.pending.extend(everything)
                        node._pump()
                    self.coord.barrier(f"serving/{work}/{name}/on")
                    self._wait_go([work, name, False])
                    with node.cond:
                        node.cyclic = None
                        node.pending.clear()
                        deadline = time.monotonic() + 30
                        while node.outstanding and time.monotonic() < deadline:
                            node.cond.wait(timeout=0.5)
                    self.coord.barrier(f"serving/{work}/{name}/off")

    def _wait_go(self, want: list[Any], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                if self.coord.get("serving/go") == want:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"serving phase {want} never started")
            time.sleep(0.002)

    def _matmul_graph(self, work: str) -> tuple[Callable[[], None], float]:
        g = torch.Generator(device=self.device)
        g.manual_seed(7)
        if work == "compute":
            a = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16, generator=g)
            b = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16, generator=g)
            reps, flop = 10, 2 * 8192**3
        else:  # decode-like: a thin batch against a large weight, bound by memory bandwidth
            a = torch.randn(32, 8192, device=self.device, dtype=torch.bfloat16, generator=g)
            b = torch.randn(8192, 28672, device=self.device, dtype=torch.bfloat16, generator=g)
            reps, flop = 50, 2 * 32 * 8192 * 28672
        out = torch.empty(a.shape[0], b.shape[1], device=self.device, dtype=torch.bfloat16)
        s = torch.cuda.Stream(self.device)
        with torch.cuda.stream(s):
            for _ in range(3):
                torch.matmul(a, b, out=out)
        s.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s, capture_error_mode="thread_local"):
            for _ in range(reps):
                torch.matmul(a, b, out=out)
        s.synchronize()
        self._keep = (a, b, out, graph, s)

        def replay() -> None:
            with torch.cuda.stream(s):
                graph.replay()

        return replay, flop * reps

    def _run_graph(self, replay: Callable[[], None], flop: float, seconds: float) -> float:
        s = self._keep[4]
        for _ in range(2):
            replay()
        s.synchronize()
        n = 0
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            for _ in range(4):
                replay()
                n += 1
            s.synchronize()
        return n * flop / (time.perf_counter() - t) / 1e12

    # --- single-GPU cases ----------------------------------------------------------------------------

    def checksum(self) -> None:
        if self.rank != 0:
            return
        views = self.manifest.byte_views(self.tensors)
        pieces = self.manifest.pieces

        def run(fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> tuple[float, list[list[int]]]:
            times = []
            table: list[list[int]] = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                sums = [fn(self.manifest.piece_views(views, p.index)) for p in pieces]
                table = torch.stack(sums).cpu().tolist()
                times.append(time.perf_counter() - t)
            return sorted(times)[1], table

        torch_s, torch_table = run(checksum_async)
        rec: dict[str, Any] = {
            "case": "checksum",
            "leechers": 0,
            "bytes": self.bytes,
            "e2e_s": None,
            "transfer_s": None,
            "torch_s": torch_s,
            "torch_GBps": self.bytes / torch_s / 1e9,
        }
        if HAVE_TRITON:
            try:
                fused_s, fused_table = run(fused_checksum_async)
                rec.update(
                    fused_s=fused_s,
                    fused_GBps=self.bytes / fused_s / 1e9,
                    fused_identical=fused_table == torch_table,
                )
                # one 64 MiB piece alone, as the receiver verifies it (median of 20, events)
                v = [views[0][: 64 << 20]]
                for name, fn in (("torch", checksum_async), ("fused", fused_checksum_async)):
                    ts = []
                    for _ in range(20):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        fn(v)
                        b.record()
                        b.synchronize()
                        ts.append(a.elapsed_time(b) / 1e3)
                    rec[f"{name}_piece64MiB_us"] = sorted(ts)[10] * 1e6
            except Exception as e:
                rec["fused_error"] = f"{type(e).__name__}: {e}"[:500]
        self.record(**rec)

    def cpu_costs(self) -> None:
        """Host (CPU) microseconds per call of what the transport does for every piece (no sync)."""
        if self.rank != 0:
            return
        dev = self.device
        piece = self.manifest.byte_views(self.tensors)[0][: 64 << 20]
        s = torch.cuda.Stream(dev)
        pinned = torch.empty(2, dtype=torch.int64, pin_memory=True)
        small = torch.zeros(2, dtype=torch.int64, device=dev)
        comm = self.nccl.init_rank(1, self.nccl.unique_id(), 0, blocking=False)[0]
        nccl_settle(self.nccl, [comm])

        def per_call(fn: Callable[[], Any], n: int = 300) -> float:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            us = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            return us

        def stream_ctx() -> None:
            with torch.cuda.stream(s):
                pass

        def set_stream() -> None:
            torch.cuda.set_stream(s)

        def event_record() -> None:
            torch.cuda.Event().record(s)

        rec: dict[str, Any] = {
            "case": "cpu_costs",
            "leechers": 0,
            "bytes": None,
            "e2e_s": None,
            "transfer_s": None,
            "fused_checksum_us": per_call(lambda: fused_checksum_async([piece]), 100),
            "torch_checksum_us": per_call(lambda: checksum_async([piece]), 100),
            "stream_ctx_us": per_call(stream_ctx),
            "set_stream_us": per_call(set_stream),
            "event_record_us": per_call(event_record),
            "pinned_empty_us": per_call(lambda: torch.empty(2, dtype=torch.int64, pin_memory=True)),
            "copy_to_pinned_us": per_call(lambda: pinned.copy_(small, non_blocking=True)),
            "nccl_async_error_us": per_call(lambda: self.nccl.async_error(comm), 2000),
            "event_query_us": per_call(lambda: torch.cuda.Event().query(), 2000),
        }
        self.nccl.abort(comm)
        self.record(**rec)

    def disk(self) -> None:
        if self.rank != 0:
            return
        from safetensors.torch import load_file

        path = os.path.join(self.args.tmp, "swarm-bench.safetensors")
        t = time.perf_counter()
        write_safetensors(path, self.tensors)
        write_s = time.perf_counter() - t
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loaded = load_file(path, device=str(self.device))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del loaded
        ok = True
        with contextlib.suppress(OSError):
            os.unlink(path)
        best = min(times)
        self.record(
            case="disk",
            leechers=1,
            bytes=self.bytes,
            e2e_s=best,
            transfer_s=best,
            loads_s=times,
            prepare_s=write_s,
            identical=ok,
        )

    # --- binding comparison ------------------------------------------------------------------------------

    def binding(self, pieces: int = 64) -> None:
        if self.rank > 1:
            self.coord.barrier("binding/done")
            return
        import torch.distributed as dist

        size = 64 << 20
        buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        rec: dict[str, Any] = {}
        # c10d: one ProcessGroupNCCL for the pair, over a store
        try:
            self.coord.barrier("binding/c10d/start", n=2)
            t = time.perf_counter()
            store = dist.PrefixStore("c10d-pair", self.coord.store)
            pg = dist.ProcessGroupNCCL(store, self.rank, 2, dist.ProcessGroupNCCL.Options())
            w = torch.zeros(4, dtype=torch.uint8, device=self.device)
            (pg.send([w], 1, 0) if self.rank == 0 else pg.recv([w], 0, 0)).wait()
            torch.cuda.synchronize()
            rec["c10d_setup_s"] = time.perf_counter() - t
            self.coord.barrier("binding/c10d/ready", n=2)
            t = time.perf_counter()
            works = [
                (pg.send([buf], 1, 0) if self.rank == 0 else pg.recv([buf], 0, 0)) for _ in range(pieces)
            ]
            for wk in works:
                wk.wait()
            torch.cuda.synchronize()
            rec["c10d_GBps"] = pieces * size / (time.perf_counter() - t) / 1e9
            self.coord.barrier("binding/c10d/done", n=2)
            t = time.perf_counter()
            abort = getattr(pg, "abort", None) or getattr(pg, "_abort", None)
            if abort is not None:
                abort()
            else:
                pg._shutdown()
            rec["c10d_abort_s"] = time.perf_counter() - t
        except Exception as e:
            rec["c10d_error"] = f"{type(e).__name__}: {e}"[:500]
        # ctypes: the transport's way (non-blocking init, own stream)
        try:
            if self.rank == 0:
                self.coord.set_bytes("binding/uid", self.nccl.unique_id())
            self.coord.barrier("binding/ctypes/start", n=2)
            t = time.perf_counter()
            comm = self.nccl.init_rank(2, self.coord.get_bytes("binding/uid"), self.rank, blocking=False)[0]
            nccl_settle(self.nccl, [comm])
            s = torch.cuda.Stream(self.device)
            w = torch.zeros(4, dtype=torch.uint8, device=self.device)
            op = self.nccl.send if self.rank == 0 else self.nccl.recv
            nccl_do(self.nccl, comm, op(comm, w.data_ptr(), 4, 1 - self.rank, s.cuda_stream))
            torch.cuda.synchronize()
            rec["ctypes_setup_s"] = time.perf_counter() - t
            self.coord.barrier("binding/ctypes/ready", n=2)
            t = time.perf_counter()
            for _ in range(pieces):
                nccl_do(self.nccl, comm, op(comm, buf.data_ptr(), size, 1 - self.rank, s.cuda_stream))
            torch.cuda.synchronize()
            rec["ctypes_GBps"] = pieces * size / (time.perf_counter() - t) / 1e9
            self.coord.barrier("binding/ctypes/done", n=2)
            t = time.perf_counter()
            self.nccl.abort(comm)
            rec["ctypes_abort_s"] = time.perf_counter() - t
        except Exception as e:
            rec["ctypes_error"] = f"{type(e).__name__}: {e}"[:500]
        self.coord.set(f"binding/r{self.rank}", rec)
        self.coord.barrier("binding/done")
        if self.rank == 0:
            other = self.coord.get("binding/r1")
            merged = {k: max(v, other.get(k, v)) if isinstance(v, float) else v for k, v in rec.items()}
            merged.update({k: v for k, v in other.items() if k not in merged})
            self.record(
                case="binding", leechers=1, bytes=pieces * size, e2e_s=None, transfer_s=None, **merged
            )


def worker_main(rank: int, world: int, port: int, inboxes: dict[str, Any], results: Any, args: Any) -> None:
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    w: Worker | None = None
    try:
        w = Worker(rank, world, port, inboxes, results, args)
        cases = args.cases
        ks = list(range(1, world))
        for case in cases:
            w.coord.barrier(f"case/{case}")
            t = time.perf_counter()
            if case == "pair":
                w.p2p("pair", 1)
            elif case == "naive":
                for k in ks:
                    w.p2p("naive", k)
            elif case == "broadcast":
                for k in ks:
                    w.broadcast(k)
            elif case == "transport":
                for k in ks:
                    w.transport(k)
            elif case == "swarm":
                for via in args.swarm_transports:
                    for sched in args.sched:
                        for mib in args.swarm_piece_mib:
                            for k in ks:
                                w.swarm(k, 0.0, "swarm", sched, mib, via)
            elif case == "swarm_staggered":  # needs 2 leechers or more
                single = w.coord.maybe("swarm/single_e2e") or 0.5
                for via in args.swarm_transports:
                    for sched in args.sched:
                        for mib in args.swarm_piece_mib:
                            for k in ks[1:]:
                                w.swarm(k, args.stagger_s or 0.3 * single, "swarm_staggered", sched, mib, via)
            elif case == "serving":
                w.serving(args.serve_seconds)
            elif case == "binding":
                w.binding()
            elif case == "checksum":
                w.checksum()
            elif case == "cpu_costs":
                w.cpu_costs()
            elif case == "disk":
                w.disk()
            w.log(f"case {case} took {time.perf_counter() - t:.1f} s")
        w.coord.barrier("cases/done")
        if w.nodes is not None:
            w.nodes.shutdown()
        results.put({"worker_done": rank})
    except Exception:
        results.put({"error": f"rank {rank}: {traceback.format_exc()}"})
        print(traceback.format_exc(), flush=True)
        with contextlib.suppress(Exception):
            w.coord.store.set("abort", f"rank {rank}: {traceback.format_exc(limit=1)}")
        time.sleep(1.0)
        os._exit(1)


# --- the control plane alone: nodes on ONE GPU with a transport that moves nothing ---------------------


class NullNccl:
    """Stands in for libnccl and moves nothing: every operation completes at once. With receivers that
    already hold the right bytes (same seed), a fetch through swarm.node measures the control plane
    (ZeroMQ, scheduler, the transport's engine and signals) and the GPU verification of every piece,
    i.e. the fastest any swarm fetch can be whatever the link."""

    version = 0
    path = "null"

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def error_string(self, code: int) -> str:
        return f"null nccl {code}"

    def unique_id(self) -> bytes:
        return os.urandom(128)

    def init_rank(self, nranks: int, uid: bytes, rank: int, *, blocking: bool, max_ctas: int | None = None):
        with self._lock:
            self._next += 1
            return self._next, NCCL_SUCCESS

    def async_error(self, comm: int) -> int:
        return NCCL_SUCCESS

    def send(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        return NCCL_SUCCESS

    def recv(self, comm: int, ptr: int, nbytes: int, peer: int, stream: int) -> int:
        return NCCL_SUCCESS

    def abort(self, comm: int) -> int:
        return NCCL_SUCCESS

    def destroy(self, comm: int) -> int:
        return NCCL_SUCCESS


def _nvlink_scheduler() -> Any:
    """The scheduler settings swarm.transport.nccl recommends for NVLink (a proposal, measured here)."""
    from swarm.transport.nccl import recommended_scheduler

    return recommended_scheduler()


NVLINK_SCHEDULER: Any = None

#: The cluster token of the bench's swarms (an open swarm would add its lone-seed vote to every start).
BENCH_TOKEN = "bench-cluster-token"


class ControlTransport(NcclTransport):
    """NcclTransport for the control measurement: where a receive would land in a staging buffer
    (packed pieces, duplicates), the buffer is filled with the piece's bytes from this process's own
    tensors (which already hold the model), standing in for the bytes NullNccl does not move."""

    verify = True  # False: skip the GPU checksum (control plane and engine alone, no GPU kernels)

    def _enqueued(self, ch: Any, op: Any) -> None:
        if self.verify or ch.sending or op.piece < 0:
            super()._enqueued(ch, op)
            return
        op.done = torch.cuda.Event()
        op.done.record(ch.stream)
        ch.flight.append(op)

    def _verified(self, ch: Any, op: Any) -> None:
        if self.verify:
            super()._verified(ch, op)
            return
        if self._direct.get(op.piece) is op:
            del self._direct[op.piece]
        self._have.add(op.piece)
        op.buf = None
        self._events().received(ch.peer, op.piece)

    def _destination(self, op: Any, stream: Any) -> torch.Tensor:
        buf = super()._destination(op, stream)
        if not self.verify:
            return buf
        if op.piece >= 0 and not op.direct:
            assert self.manifest is not None
            torch.cat(self.manifest.piece_views(self.views, op.piece), out=buf)
        return buf


#: Bytes of one piece in the CPU variant of the control case: what a piece costs the control plane does
#: not depend on its size when the transport moves nothing (see `CpuControl`).
CPU_PIECE_BYTES = 4096


def null_transport(base: type) -> type:
    """A transport that moves nothing, on any machine (the CPU variant of the control case): the seed's
    `send` completes at once and signals the receiver through the control plane (`Sent`, which the node
    carries), and the receiver reports the piece received when that signal arrives (both processes
    already hold the same bytes). So a fetch costs exactly the control plane: ZeroMQ, codec, scheduler,
    node loop, one completion signal a piece. Made from `base` (the Transport class of the swarm code
    under test, which may be another checkout's: see `--control-baseline`)."""
    from swarm.protocol import Sent

    class NullTransport(base):  # type: ignore[valid-type, misc]
        name = "tcp"  # a two-sided path like TCP's, as far as path negotiation goes (it moves nothing)

        def __init__(self) -> None:
            super().__init__()
            self._expected: set[tuple[str, int]] = set()

        def open(self, host: str) -> dict[str, Any]:
            return {}

        def connect(self, peer: str, params: Any) -> None:
            pass

        def expect(self, peer: str, piece: int) -> None:
            self._expected.add((peer, piece))

        def unexpect(self, peer: str, piece: int) -> None:
            self._expected.discard((peer, piece))

        def send(self, peer: str, piece: int) -> None:
            self.events.notify(peer, Sent(piece, True))
            self.events.sent(peer, piece, True)

        def on_message(self, peer: str, msg: Any) -> None:
            if isinstance(msg, Sent) and msg.ok and (peer, msg.piece) in self._expected:
                self._expected.discard((peer, msg.piece))
                self.events.received(peer, msg.piece)

        def cancel(self, peer: str, piece: int) -> None:
            pass

        def drop(self, peer: str) -> None:
            self._expected = {e for e in self._expected if e[0] != peer}

        def close(self) -> None:
            pass

    return NullTransport


def _use_swarm_from(src: str) -> None:
    """Import `swarm` from another checkout in this (spawned) process from here on."""
    for name in [m for m in sys.modules if m == "swarm" or m.startswith("swarm.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(src))


def control_main(rank: int, world: int, port: int, ports: list[int], results: Any, args: Any) -> None:
    """One node of the control-plane measurement: every rank on cuda:0, or on the CPU with a transport
    that moves nothing (`--device cpu`; `args.control_src` names the checkout whose swarm runs)."""
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    coord = None
    cpu = args.device == "cpu"
    try:
        if args.control_src:
            _use_swarm_from(args.control_src)
        from swarm.manifest import Manifest, SwarmKey
        from swarm.node import Node, NodeConfig
        from swarm.transport.base import Transport

        coord = Coord(port, rank, world)
        if cpu:
            device = torch.device("cpu")
            meta = {n: torch.empty(shape, dtype=dt, device="meta") for n, shape, dt in llama_spec()}
            Null = null_transport(Transport)
        else:
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
            tensors = make_model(llama_spec(), device, random=True, seed=77)  # the same bytes everywhere
            from swarm.transport.nccl import fused_checksum_works  # also in older checkouts

            fused_checksum_works(device)  # compile the kernel here, not inside the first timed fetch
            torch.cuda.synchronize()
        global NVLINK_SCHEDULER
        NVLINK_SCHEDULER = _nvlink_scheduler()
        combos = [
            (m, v, sc)
            for sc in args.control_sched
            for v in (["none"] if cpu else args.control_verify)
            for m in args.control_piece_mib
        ]
        for piece_mib, verify, sched in combos:
            if cpu:
                # As many pieces as the 16 GB model has at this piece size, each CPU_PIECE_BYTES long.
                count = len(Manifest.from_tensors(meta, piece_size=piece_mib << 20).pieces)
                tensors = {"w": torch.full((count * CPU_PIECE_BYTES,), 0xA5, dtype=torch.uint8)}
                manifest = Manifest.from_tensors(tensors, piece_size=CPU_PIECE_BYTES)
                model_bytes = sum(
                    t.numel() * t.element_size() for t in meta.values()
                )  # what the pieces stand for
            else:
                manifest = Manifest.from_tensors(tensors, piece_size=piece_mib << 20)
                model_bytes = manifest.total_bytes
                ControlTransport.verify = verify == "gpu"

            def transport() -> Any:
                if cpu:
                    return Null()
                return ControlTransport(device, nccl=NullNccl())  # type: ignore[arg-type]

            for k in range(1, world):
                key = f"control/{piece_mib}/{verify}/{sched}/{k}"
                cfg = NodeConfig(
                    transport="tcp" if cpu else "nccl",
                    peers=",".join(f"127.0.0.1:{ports[j]}" for j in range(k + 1) if j != rank),
                    host="127.0.0.1",
                    control_port=ports[rank],
                    mdns=False,
                    piece_size=manifest.piece_size,
                    discovery_timeout_s=20.0,
                    stall_timeout_s=30.0,
                    deadline_s=120.0,
                    token=BENCH_TOKEN,
                    # on the CPU as on the GPU: NcclTransport gives the node these by default
                    scheduler=NVLINK_SCHEDULER if sched == "nvlink" or cpu else None,
                )
                skey = SwarmKey(model_id=f"control-{piece_mib}", dtype="bfloat16", engine="bench")
                node = None
                if rank == 0:
                    node = Node(
                        skey,
                        tensors,
                        cfg,
                        complete=True,
                        manifest=manifest,
                        transport=transport(),
                    ).start()
                coord.barrier(f"{key}/start")
                if 0 < rank <= k:
                    t0 = time.time()
                    node = Node(
                        skey,
                        tensors,
                        cfg,
                        complete=False,
                        manifest=manifest,
                        transport=transport(),
                    ).start()
                    t1 = time.time()
                    first: list[float] = []
                    report = node.fetch(
                        lambda held, total, first=first: (
                            first.append(time.time()) if held and not first else None
                        )
                    )
                    t2 = time.time()
                    coord.set(
                        f"{key}/r{rank}",
                        {
                            "start": t0,
                            "fetch": t1,
                            "first": first[0] if first else t1,
                            "end": t2,
                            "from": len(report.bytes_by_peer),
                        },
                    )
                coord.barrier(f"{key}/end")
                if node is not None:
                    node.close()
                coord.barrier(f"{key}/closed")
                if rank == 0:
                    rows = [coord.get(f"{key}/r{r}") for r in range(1, k + 1)]
                    fetch_s = max(r["end"] for r in rows) - min(r["fetch"] for r in rows)
                    n = len(manifest.pieces)
                    results.put(
                        {
                            "case": "control",
                            "leechers": k,
                            "bytes": model_bytes,
                            "e2e_s": max(r["end"] - r["start"] for r in rows),
                            "transfer_s": fetch_s,
                            "piece_mib": piece_mib,
                            "verify": verify,
                            "scheduler": sched,
                            "pieces": n,
                            "pieces_per_s_per_leecher": n / fetch_s,
                            "cap_GBps_per_leecher": model_bytes / fetch_s / 1e9,
                            "steady_s": max(r["end"] for r in rows) - min(r["first"] for r in rows),
                            "steady_GBps_per_leecher": model_bytes
                            / (max(r["end"] for r in rows) - min(r["first"] for r in rows))
                            / 1e9,
                            "peers_used": [r["from"] for r in rows],
                            "device": _device_name(device),
                            "code": args.control_label,
                        }
                    )
        coord.barrier("control/done")
        results.put({"worker_done": rank})
    except Exception:
        results.put({"error": f"control rank {rank}: {traceback.format_exc()}"})
        print(traceback.format_exc(), flush=True)
        with contextlib.suppress(Exception):
            if coord is not None:
                coord.store.set("abort", f"control rank {rank}")
        time.sleep(1.0)
        os._exit(1)


def collect(procs: list[Any], results: Any, world: int, timeout: float) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    done = 0
    deadline = time.monotonic() + timeout
    while done < world and time.monotonic() < deadline:
        try:
            rec = results.get(timeout=1.0)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                print("a worker died", flush=True)
                break
            continue
        if "worker_done" in rec:
            done += 1
        elif "error" in rec:
            print(rec["error"], flush=True)
            records.append(rec)
            break
        else:
            print(f"record {rec}", flush=True)
            records.append(rec)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_control(args: Any) -> list[dict[str, Any]]:
    """The control case; with --control-baseline, first with that checkout's swarm, then with this one,
    one piece size at a time (so that both see the same machine), and the ratios."""
    world = args.control_leechers + 1
    if not args.control_baseline:
        args = argparse.Namespace(**{**vars(args), "control_src": "", "control_label": "this"})
        return run_ranks(control_main, world, [free_port() for _ in range(world)], args)
    records: list[dict[str, Any]] = []
    for mib in args.control_piece_mib:
        for src, label in ((args.control_baseline, "baseline"), ("", "this")):
            one = {"control_piece_mib": [mib], "control_src": src, "control_label": label}
            one_args = argparse.Namespace(**{**vars(args), **one})
            records += run_ranks(control_main, world, [free_port() for _ in range(world)], one_args)
    base = {(r["piece_mib"], r["leechers"]): r for r in records if r.get("code") == "baseline"}
    for r in records:
        b = base.get((r.get("piece_mib"), r.get("leechers")))
        if r.get("code") == "this" and b is not None:
            r["vs_baseline"] = r["steady_GBps_per_leecher"] / b["steady_GBps_per_leecher"]
    return records


# --- ipc: one GPU, one process a member ----------------------------------------------------------------


def _hex(sums: torch.Tensor) -> str:
    s1, s2 = (int(v) & 0xFFFFFFFFFFFFFFFF for v in sums.tolist())
    return f"{s1:016x}{s2:016x}"


def ipc_primitive_main(opts: dict[str, Any], results: Any, commands: Any) -> None:
    """Rank 0 exports the model through swarm.transport.ipc; every other rank maps it once and, at each
    "go", copies and verifies the whole model piece by piece on the transport's streams: no node, no
    scheduler, no control message (the floor the swarm is held to)."""
    from tests.gpu.members import SAFE_ENV as ENV
    from tests.gpu.members import wait_for

    os.environ.update(ENV)
    rank = opts["rank"]
    try:
        from swarm.transport.ipc import IpcTransport

        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        tensors = make_model(llama_spec(), device, random=rank == 0, seed=77)
        manifest = Manifest.from_tensors(tensors, piece_size=opts["piece_mib"] << 20)
        t = IpcTransport(device)
        t.bind(manifest, tensors, Events(*(5 * [lambda *a: None])))
        if rank == 0:
            sums = piece_checksums(manifest, tensors)
            results.put(
                {
                    "rank": 0,
                    "event": "export",
                    "export": t._export_once(),
                    "checksums": sums,
                    "bytes": manifest.total_bytes,
                }
            )
            wait_for(commands, "stop", 600.0)
            return
        msg = commands.get(timeout=300)
        t0 = time.perf_counter()
        views = t._map(msg["export"])
        torch.cuda.synchronize()
        results.put({"rank": rank, "event": "mapped", "open_s": time.perf_counter() - t0})
        while True:
            cmd = commands.get(timeout=600)
            if cmd != "go":
                break
            start = time.time()
            sums = []
            for p in range(len(manifest.pieces)):
                torch.cuda.set_stream(t._streams[p % len(t._streams)])
                dst = manifest.piece_views(t.views, p)
                for d, x in zip(dst, manifest.piece_views(views, p), strict=True):
                    d.copy_(x, non_blocking=True)
                sums.append(t._checksum(dst))
            torch.cuda.synchronize()
            end = time.time()
            ok = [_hex(x) for x in sums] == msg["checksums"]
            results.put({"rank": rank, "event": "round", "start": start, "end": end, "verified": ok})
    except Exception:
        results.put({"rank": rank, "event": "error", "error": traceback.format_exc()})


def _ipc_primitive(args: Any, ks: list[int], piece_mib: int) -> list[dict[str, Any]]:
    from tests.gpu.members import Members

    readers = max(ks)
    m = Members()
    out = []
    try:
        for r in range(readers + 1):
            m.start({"rank": r, "piece_mib": piece_mib}, target=ipc_primitive_main)
        export = m.event(0, "export", 300)
        for r in range(1, readers + 1):
            m.tell(r, {"export": export["export"], "checksums": export["checksums"]})  # type: ignore[arg-type]
        opened = [m.event(r, "mapped", 300)["open_s"] for r in range(1, readers + 1)]
        for k in ks:
            rounds = []
            for _ in range(args.ipc_rounds):
                m.records = [x for x in m.records if x.get("event") != "round"]
                for r in range(1, k + 1):
                    m.tell(r, "go")
                rows = [m.event(r, "round", 300) for r in range(1, k + 1)]
                rounds.append((max(x["end"] for x in rows) - min(x["start"] for x in rows), rows))
            best, rows = min(rounds, key=lambda x: x[0])
            out.append(
                {
                    "case": "ipc_primitive",
                    "leechers": k,
                    "bytes": export["bytes"],
                    "transfer_s": best,
                    "e2e_s": best + max(opened[:k]),
                    "open_s": max(opened[:k]),
                    "rounds_s": [round(x[0], 5) for x in rounds],
                    "verified": all(x["verified"] for x in rows),
                    "piece_mib": piece_mib,
                }
            )
    finally:
        m.close()
    return out


def _ipc_swarm(
    args: Any, k: int, piece_mib: int, *, matmul_s: float = 0.0, warm: bool = True, star: bool = False
) -> list[dict[str, Any]]:
    """Seed + k leecher processes; `warm`: each leecher builds the fused checksum kernel (Triton) before
    its node starts, as a process that already ran one would (else the first node start pays it);
    `star`: each leecher knows only the seed (no leecher-to-leecher copies), to tell what the mesh costs
    on one GPU, where every source reads the same memory."""
    from tests.gpu.members import Members

    m = Members()
    ports = [free_port() for _ in range(k + 1)]
    base = {
        "ports": ports,
        "model": "llama8b",
        "seed": 77,
        "piece_mib": piece_mib,
        "warm_checksum": warm,
        # with a cluster token, as docs/operations.md asks: an open swarm's lone seed is believed only
        # after the 1 s vote (node.py _OPEN_QUORUM_S), which the end-to-end time would otherwise measure
        "node": {"token": BENCH_TOKEN},
    }
    out: list[dict[str, Any]] = []
    try:
        m.start({**base, "rank": 0, "role": "seed", "peers": [], "matmul_s": matmul_s})
        m.event(0, "ready", 300)
        for r in range(1, k + 1):
            peers = [0] if star else [j for j in range(k + 1) if j != r]
            m.start(
                {
                    **base,
                    "rank": r,
                    "role": "leecher",
                    "peers": peers,
                    "wait_go": True,
                    "check": False,
                    "progress": False,
                }
            )
        for r in range(1, k + 1):
            m.event(r, "waiting", 300)
        if matmul_s:
            time.sleep(2.0)  # the matmul loop alone first
        go = time.time()
        for r in range(1, k + 1):
            m.tell(r, "go")
        rows = [m.event(r, "done", 300) for r in range(1, k + 1)]
        first = min(x["stats"]["ipc"]["first_copy_t"] for x in rows)
        last = max(x["stats"]["ipc"]["last_verified_t"] for x in rows)
        nbytes = rows[0]["bytes"]
        out.append(
            {
                "case": "ipc_swarm" + ("" if warm else "_cold") + ("_star" if star else ""),
                "leechers": k,
                "bytes": nbytes,
                "e2e_s": max(x["end"] - x["start"] for x in rows),
                # where the end-to-end time goes, per leecher (seconds from its node's construction)
                "breakdown": [
                    {
                        "made": x["made"] - x["start"],
                        "started": x["started"] - x["start"],
                        "mapped": x["stats"]["ipc"].get("imported_t", 0) - x["start"],
                        "first_copy": x["stats"]["ipc"]["first_copy_t"] - x["start"],
                        "last_verified": x["stats"]["ipc"]["last_verified_t"] - x["start"],
                        "end": x["end"] - x["start"],
                        # inside `started`: each transport's bind (in `made`) and open
                        **{f"setup.{n}": v for n, v in x["stats"].get("setup_s", {}).items()},
                    }
                    for x in rows
                ],
                "transfer_s": last - first,
                "transfer_s_each": [
                    x["stats"]["ipc"]["last_verified_t"] - x["stats"]["ipc"]["first_copy_t"] for x in rows
                ],
                "ipc_bytes": [x["stats"]["ipc"]["bytes_received"] for x in rows],
                "paths": [sorted(set(x["stats"]["status_paths"].values())) for x in rows],
                "peers_used": [len(x["from"]) for x in rows],
                "piece_mib": piece_mib,
            }
        )
        if matmul_s:
            time.sleep(2.5)  # the matmul loop alone again, after the transfer
            for r in range(0, k + 1):
                m.tell(r, "stop")
            samples = m.event(0, "matmul", 120)["samples"]
            alone = [ms for t, ms in samples if go - 1.8 <= t < go]
            after = [ms for t, ms in samples if last + 0.3 <= t < last + 2.0]
            during = [ms for t, ms in samples if first <= t <= last + ms / 1e3]
            med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
            out.append(
                {
                    "case": "ipc_matmul",
                    "leechers": k,
                    "alone_ms": med(alone),
                    "during_ms": med(during),
                    "during_mean_ms": sum(during) / len(during) if during else float("nan"),
                    "after_ms": med(after),
                    "slowdown": (med(during) / med(alone)) if alone and during else float("nan"),
                    "samples_alone": len(alone),
                    "samples_during": len(during),
                    "window_s": last - first,
                    "piece_mib": piece_mib,
                }
            )
    finally:
        m.close()
    return out


def run_ipc(args: Any) -> list[dict[str, Any]]:
    """The `ipc` case (see the module docstring), with ratios of the swarm to the primitive."""
    ks = args.ipc_leechers
    records: list[dict[str, Any]] = []
    for mib in args.ipc_piece_mib:
        records += _ipc_primitive(args, ks, mib)
        for k in ks:
            records += _ipc_swarm(args, k, mib)
    records += _ipc_swarm(args, min(ks), args.ipc_piece_mib[0], warm=False)
    if max(ks) > 1:
        records += _ipc_swarm(args, max(ks), args.ipc_piece_mib[0], star=True)
    records += _ipc_swarm(args, max(ks), args.ipc_piece_mib[0], matmul_s=120.0)
    prim = {(r["leechers"], r["piece_mib"]): r for r in records if r["case"] == "ipc_primitive"}
    for r in records:
        p = prim.get((r["leechers"], r.get("piece_mib")))
        if r["case"].startswith("ipc_swarm") and p is not None:
            r["transfer_vs_primitive"] = r["transfer_s"] / p["transfer_s"]
            r["slowest_leecher_vs_primitive"] = max(r["transfer_s_each"]) / p["transfer_s"]
            r["e2e_vs_primitive"] = r["e2e_s"] / p["e2e_s"]
            r["GBps_per_leecher"] = r["bytes"] / r["transfer_s"] / 1e9
    device = torch.cuda.get_device_name(0)
    for r in records:
        r["device"] = device
        print(f"record {json.dumps(r)}", flush=True)
    return records


# --- the parent ------------------------------------------------------------------------------------


def run(args: Any) -> list[dict[str, Any]]:
    world = args.gpus or torch.cuda.device_count()
    multi = ("pair", "naive", "broadcast", "transport", "serving", "binding", "swarm", "swarm_staggered")
    if world < 2 and any(c in args.cases for c in multi):
        raise SystemExit(
            f"{world} GPU(s): the cases {', '.join(c for c in args.cases if c in multi)} need at least 2 "
            "(on one GPU: --cases ipc,control)"
        )
    args.ports = [free_port() for _ in range(world)]
    inboxes = {f"r{r}": mp.get_context("spawn").Queue() for r in range(world)}
    return run_ranks(worker_main, world, inboxes, args)


def run_ranks(target: Callable[..., None], world: int, shared: Any, args: Any) -> list[dict[str, Any]]:
    """Start `target(rank, world, store_port, shared, results, args)` in one spawned process per rank
    beside a TCPStore they rendezvous on, and collect their records."""
    import torch.distributed as dist

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world + 1, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, shared, results, args)) for r in range(world)]
    for p in procs:
        p.start()
    records = collect(procs, results, world, args.timeout)
    del store
    return records


def table(records: list[dict[str, Any]]) -> str:
    pair = next((r for r in records if r.get("case") == "pair"), None)
    lines = [
        f"{'case':<16}{'k':>3}{'GB':>8}{'e2e s':>10}{'xfer s':>10}{'GB/s':>9}{'xfer/pair':>11}"
        f"{'e2e/pair':>10}  ok"
    ]
    for r in records:
        if r.get("transfer_s") is None or r.get("bytes") is None:
            continue
        gbps = r["bytes"] / r["transfer_s"] / 1e9
        rt = r["transfer_s"] / pair["transfer_s"] if pair else float("nan")
        re_ = r["e2e_s"] / pair["transfer_s"] if pair else float("nan")
        lines.append(
            f"{r['case']:<16}{r['leechers']:>3}{r['bytes'] / 1e9:>8.2f}"
            f"{r['e2e_s']:>10.4f}{r['transfer_s']:>10.4f}"
            f"{gbps:>9.1f}{rt:>11.2f}{re_:>10.2f}  {r.get('identical', '')}"
        )
    for r in records:
        if r.get("case") in ("checksum", "serving", "binding", "cpu_costs") or "error" in r:
            extra = {
                k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("device",)
            }
            lines.append(json.dumps(extra))
    keys = ("code", "device", "piece_mib", "leechers", "steady_GBps_per_leecher", "pieces_per_s_per_leecher")
    for r in records:
        if r.get("case") == "control":
            row = {k: r[k] for k in (*keys, "vs_baseline") if k in r}
            lines.append(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(ALL_CASES))
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all)")
    ap.add_argument("--model", choices=("llama8b", "small"), default="llama8b")
    ap.add_argument("--piece-mib", type=int, default=64)
    ap.add_argument("--serve-seconds", type=float, default=2.0)
    ap.add_argument(
        "--stagger-s",
        type=float,
        default=0.0,
        help="swarm_staggered: delay between leecher starts (default: 30%% of the single-leecher swarm time)",
    )
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--control-leechers", type=int, default=3, help="control: leecher processes on GPU 0")
    ap.add_argument("--control-piece-mib", default="64,256", help="control: piece sizes to try")
    ap.add_argument(
        "--control-verify", default="gpu", help="control: gpu (checksum every piece), none, or both"
    )
    ap.add_argument(
        "--sched", default="both", help="swarm cases: scheduler settings: default, nvlink, or both"
    )
    ap.add_argument("--control-sched", default="default", help="control: scheduler: default, nvlink, or both")
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="control: cpu runs it without a GPU, with a transport that moves nothing",
    )
    ap.add_argument(
        "--control-baseline",
        default="",
        metavar="DIR",
        help="control: also run it with the swarm package of this checkout (e.g. a git worktree of main), "
        "side by side, and print the ratios",
    )
    ap.add_argument("--swarm-piece-mib", default="64,256", help="swarm cases: piece sizes to try (MiB)")
    ap.add_argument(
        "--swarm-transports", default="nccl,ipc", help="swarm cases: transports to run them over (nccl, ipc)"
    )
    ap.add_argument(
        "--ipc-piece-mib", default="256,1024", help="ipc: piece sizes (MiB); the first is the default"
    )
    ap.add_argument("--ipc-rounds", type=int, default=3, help="ipc: rounds of the primitive (best kept)")
    ap.add_argument("--ipc-leechers", default="1,3", help="ipc: leecher counts")
    ap.add_argument("--timeout", type=float, default=540.0)
    ap.add_argument("--json", default="", help="write the records here ('-' for stdout)")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.control_piece_mib = [int(x) for x in str(args.control_piece_mib).split(",") if x]
    args.control_verify = ["none", "gpu"] if args.control_verify == "both" else [args.control_verify]
    args.control_sched = ["default", "nvlink"] if args.control_sched == "both" else [args.control_sched]
    args.sched = ["default", "nvlink"] if args.sched == "both" else [args.sched]
    args.swarm_piece_mib = [int(x) for x in str(args.swarm_piece_mib).split(",") if x]
    args.swarm_transports = [x for x in str(args.swarm_transports).split(",") if x]
    if not args.swarm_transports or set(args.swarm_transports) - {"nccl", "ipc"}:
        ap.error(f"--swarm-transports: nccl and/or ipc, not {args.swarm_transports}")
    args.ipc_leechers = [int(x) for x in str(args.ipc_leechers).split(",") if x]
    args.ipc_piece_mib = [int(x) for x in str(args.ipc_piece_mib).split(",") if x]
    unknown = set(args.cases) - set(ALL_CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; known: {', '.join(ALL_CASES)}")
    if args.device == "cpu" and args.cases != ["control"]:
        ap.error("--device cpu runs only the control case: add --cases control")
    if args.control_baseline and args.device != "cpu":
        # the GPU case's transport subclasses this checkout's NcclTransport: it cannot run another's swarm
        ap.error("--control-baseline needs --device cpu; on a GPU, run each checkout's bench/gpu.py in turn")
    records = []
    gpu_cases = [c for c in args.cases if c not in ("control", "ipc")]
    if gpu_cases:
        records += run(argparse.Namespace(**{**vars(args), "cases": gpu_cases}))
    if "control" in args.cases:
        records += run_control(args)
    if "ipc" in args.cases:
        records += run_ipc(args)
    out = json.dumps(records, indent=1)
    if args.json == "-":
        print(out)
    elif args.json:
        with open(args.json, "w") as f:
            f.write(out)
    print(table(records), flush=True)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
