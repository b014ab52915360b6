"""The NCCL transport's engine on one GPU: two transports in one process joined by tests/gpu/loopback.py
(NCCL itself refuses two ranks on one GPU), plus the ctypes binding against the real libnccl with a
one-rank communicator. Control messages go through swarm.protocol's codec. Skipped without CUDA."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (one GPU)"),
]

PIECE = 1 << 20


class Pair:
    """A seed "S" and a leecher "L" on cuda:0, wired to each other through the loopback."""

    def __init__(self, **kw: Any) -> None:
        from bench.gpu import make_model, small_spec
        from swarm.manifest import Manifest, piece_checksums
        from swarm.protocol import decode_payload, pack
        from swarm.transport.base import Events
        from swarm.transport.nccl import NcclTransport
        from tests.gpu.loopback import LoopbackNccl

        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        self.seed_t = make_model(small_spec(), dev, random=True, seed=11)
        self.leech_t = make_model(small_spec(), dev, random=False)
        self.manifest = Manifest.from_tensors(self.seed_t, piece_size=PIECE)
        self.sums = piece_checksums(self.manifest, self.seed_t)
        self.nccl = LoopbackNccl()
        self.cond = threading.Condition()
        self.events: list[tuple[Any, ...]] = []
        self.drop_opens = 0  # control messages "open" to lose on the way (a lossy control plane)
        self.old_receiver = False  # strip "batch" from opens: a receiver that reads one signal a piece
        self.signals: list[dict[str, Any]] = []  # the seed's piece signals, as sent
        opts = {"op_timeout": 5.0, "init_timeout": 10.0} | kw
        self.seed = NcclTransport(dev, nccl=self.nccl, **opts)  # type: ignore[arg-type]
        self.leech = NcclTransport(dev, nccl=self.nccl, **opts)  # type: ignore[arg-type]

        def wire(me: str, other: Callable[[], Any]) -> Events:
            def note(*e: Any) -> None:
                with self.cond:
                    self.events.append((me, *e))
                    self.cond.notify_all()

            def deliver(peer: str, msg: Any) -> None:
                params = getattr(msg, "params", {})
                if self.drop_opens and params.get("op") == "open":
                    self.drop_opens -= 1
                    return
                if self.old_receiver and params.get("op") == "open":
                    msg = type(msg)(msg.transport, {k: v for k, v in params.items() if k != "batch"})
                if me == "S" and params.get("op") in ("piece", "pieces"):
                    self.signals.append(dict(params))
                other().on_message(me, decode_payload(pack(msg)))

            return Events(
                received=lambda peer, p: note("received", peer, p),
                failed=lambda peer, p, why: note("failed", peer, p, why),
                sent=lambda peer, p, ok: note("sent", peer, p, ok),
                closed=lambda peer, why: note("closed", peer, why),
                notify=deliver,
            )

        self.seed.bind(self.manifest, self.seed_t, wire("S", lambda: self.leech))
        self.leech.bind(self.manifest, self.leech_t, wire("L", lambda: self.seed))
        self.seed.set_checksums(self.sums)
        self.leech.set_checksums(self.sums)
        self.seed.open("127.0.0.1")
        self.leech.open("127.0.0.1")

    def count(self, who: str, kind: str, piece: int | None = None) -> int:
        return sum(
            1 for e in self.events if e[0] == who and e[1] == kind and (piece is None or e[3] == piece)
        )

    def wait(self, pred: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; events: {self.events[-10:]}"
                self.cond.wait(timeout=min(left, 0.5))

    def identical(self) -> bool:
        from swarm.manifest import as_bytes

        torch.cuda.synchronize()
        return all(torch.equal(as_bytes(self.seed_t[n]), as_bytes(self.leech_t[n])) for n in self.seed_t)

    def close(self) -> None:
        self.seed.close()
        self.leech.close()


@pytest.fixture
def pair() -> Any:
    p = Pair()
    yield p
    p.close()


def test_transfer_is_byte_identical(pair: Pair) -> None:
    n = len(pair.manifest.pieces)
    assert any(not p.zero_copy for p in pair.manifest.pieces)
    pair.leech.connect("S", {})
    for p in range(n):
        pair.seed.send("L", p)
    pair.wait(lambda: pair.count("L", "received") == n)
    pair.wait(lambda: pair.count("S", "sent") == n)
    assert pair.count("L", "failed") == 0
    assert all(e[4] for e in pair.events if e[1] == "sent")
    assert pair.leech.stats()["checksum"] == "fused"
    assert pair.identical()
    stats = pair.leech.stats()
    assert stats["pieces_received"] == n and stats["bytes_received"] == pair.manifest.total_bytes


def test_piece_signals_are_batched(pair: Pair) -> None:
    """The seed tells the receiver the pieces a channel takes in one engine turn in one message."""
    n = len(pair.manifest.pieces)
    pair.leech.connect("S", {})
    pair.wait(lambda: pair.leech.is_ready("S"))
    for p in range(n):
        pair.seed.send("L", p)
    pair.wait(lambda: pair.count("L", "received") == n)
    assert pair.identical()
    assert all(s["op"] == "pieces" for s in pair.signals)
    assert sorted(p for s in pair.signals for p in s["pieces"]) == list(range(n))
    assert len(pair.signals) < n, f"{len(pair.signals)} signals for {n} pieces"


def test_a_receiver_without_batches_gets_one_signal_a_piece(pair: Pair) -> None:
    pair.old_receiver = True
    n = len(pair.manifest.pieces)
    pair.leech.connect("S", {})
    for p in range(n):
        pair.seed.send("L", p)
    pair.wait(lambda: pair.count("L", "received") == n)
    assert pair.identical()
    assert [s["op"] for s in pair.signals] == ["piece"] * n


def test_lost_open_is_repeated(pair: Pair) -> None:
    pair.drop_opens = 1
    pair.leech.connect("S", {})
    pair.seed.send("L", 0)
    pair.wait(lambda: pair.count("L", "received") == 1, timeout=10)
    assert pair.drop_opens == 0
    assert pair.seed.stats()["channels_opened"] == 1


def test_duplicates_land_once_and_right(pair: Pair) -> None:
    z = next(p.index for p in pair.manifest.pieces if p.zero_copy)
    k = next(p.index for p in pair.manifest.pieces if not p.zero_copy)
    pair.leech.connect("S", {})
    for p in (z, z, k, k):
        pair.seed.send("L", p)
    pair.wait(lambda: pair.count("L", "received") == 4)
    from swarm.manifest import checksum

    views = pair.manifest.byte_views(pair.leech_t)
    for p in (z, k):
        assert checksum(pair.manifest.piece_views(views, p), "wsum32") == pair.sums[p]


def test_bad_checksum_fails_and_keeps_verified_bytes(pair: Pair) -> None:
    n = len(pair.manifest.pieces)
    z = next(p.index for p in pair.manifest.pieces if p.zero_copy)
    fresh = next(p.index for p in pair.manifest.pieces if p.zero_copy and p.index != z)
    bad = list(pair.sums)
    bad[fresh] = "0" * 32
    pair.leech.set_checksums(bad)
    pair.leech.connect("S", {})
    pair.seed.send("L", fresh)  # never verified before: fails
    pair.wait(lambda: pair.count("L", "failed") == 1)
    assert next(e for e in pair.events if e[1] == "failed")[4] == "bad_checksum"
    assert pair.count("L", "received") == 0
    pair.leech.set_checksums(pair.sums)
    for p in range(n):
        pair.seed.send("L", p)
    pair.wait(lambda: pair.count("L", "received") == n)
    assert pair.identical()
    bad = list(pair.sums)
    bad[z] = "0" * 32
    pair.leech.set_checksums(bad)
    pair.seed.send("L", z)  # already verified: lands in staging, fails, the parameters stay right
    pair.wait(lambda: pair.count("L", "failed") == 2)
    assert pair.identical()


def test_send_before_the_channel_and_cancel() -> None:
    pair = Pair(rate_limit=20 * PIECE)
    try:
        for p in range(6):
            pair.seed.send("L", p)  # before the leecher opened the channel: held
        pair.seed.cancel("L", 5)
        time.sleep(0.2)
        pair.leech.connect("S", {})
        pair.wait(lambda: pair.count("L", "received") == 5)
        pair.wait(lambda: len([e for e in pair.events if e[0] == "S" and e[1] == "sent"]) == 6)
        sent = [e for e in pair.events if e[0] == "S" and e[1] == "sent"]
        assert ("S", "sent", "L", 5, False) in sent
        assert sum(1 for e in sent if e[4]) == 5
    finally:
        pair.close()


def test_rate_limit_paces_sends() -> None:
    rate = 40 * PIECE
    pair = Pair(rate_limit=rate)
    try:
        pair.leech.connect("S", {})
        pair.wait(lambda: pair.leech.is_ready("S"))
        pieces = list(range(21))
        total = sum(pair.manifest.pieces[p].length for p in pieces)
        t = time.perf_counter()
        for p in pieces:
            pair.seed.send("L", p)
        pair.wait(lambda: pair.count("L", "received") == len(pieces))
        elapsed = time.perf_counter() - t
        assert elapsed >= 0.8 * (total - pair.manifest.pieces[0].length) / rate, elapsed
    finally:
        pair.close()


def test_peer_abort_is_reported_and_close_is_bounded(pair: Pair) -> None:
    pair.leech.connect("S", {})
    pair.wait(lambda: pair.leech.is_ready("S"))
    pair.seed.close()  # aborts its communicators and tells the leecher
    pair.wait(lambda: pair.count("L", "closed") == 1, timeout=10)
    t = time.perf_counter()
    pair.leech.close()
    assert time.perf_counter() - t < 10


def test_silent_peer_times_out() -> None:
    """A receive whose sender never sends (a lost signal or a dead peer) fails after op_timeout."""
    pair = Pair(op_timeout=1.0)
    try:
        pair.leech.connect("S", {})
        pair.wait(lambda: pair.leech.is_ready("S"))
        from swarm.protocol import Channel

        cid = pair.leech._recv["S"].cid
        # A forged "sending piece 0" signal with no bytes behind it: the receive cannot complete.
        pair.leech.on_message("S", Channel("nccl", {"op": "piece", "cid": cid, "seq": 1, "piece": 0}))
        pair.wait(lambda: pair.count("L", "failed") == 1 and pair.count("L", "closed") == 1, timeout=10)
    finally:
        pair.close()


@pytest.mark.parametrize("pieces", [[], ["0"], [0] * 100_000, "0"])
def test_a_malformed_batch_of_signals_closes_the_channel(pieces: Any) -> None:
    pair = Pair(op_timeout=5.0)
    try:
        pair.leech.connect("S", {})
        pair.wait(lambda: pair.leech.is_ready("S"))
        from swarm.protocol import Channel

        cid = pair.leech._recv["S"].cid
        pair.leech.on_message("S", Channel("nccl", {"op": "pieces", "cid": cid, "seq": 1, "pieces": pieces}))
        pair.wait(lambda: pair.count("L", "closed") == 1, timeout=3)
    finally:
        pair.close()


def test_binding_on_one_gpu_real_nccl() -> None:
    """The ctypes binding against the real libnccl: non-blocking init of a one-rank communicator,
    a send to itself and a receive in one group, abort."""
    from swarm.transport.nccl_binding import NCCL_IN_PROGRESS, NCCL_SUCCESS, Nccl

    nccl = Nccl.load()
    assert nccl.version >= 21800
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    comm, _ = nccl.init_rank(1, nccl.unique_id(), 0, blocking=False)
    deadline = time.monotonic() + 30
    while nccl.async_error(comm) == NCCL_IN_PROGRESS:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert nccl.async_error(comm) == NCCL_SUCCESS
    src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8, device=dev)
    dst = torch.zeros_like(src)
    s = torch.cuda.Stream(dev)
    nccl.group_start()
    nccl.send(comm, src.data_ptr(), src.numel(), 0, s.cuda_stream)
    nccl.recv(comm, dst.data_ptr(), dst.numel(), 0, s.cuda_stream)
    nccl.group_end()
    while nccl.async_error(comm) == NCCL_IN_PROGRESS:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    s.synchronize()
    assert torch.equal(src, dst)
    assert nccl.abort(comm) == NCCL_SUCCESS


def test_fused_checksum_matches_manifest() -> None:
    from bench.gpu import HAVE_TRITON
    from swarm.manifest import checksum_async
    from swarm.transport.gpu_checksum import fused_checksum_async

    if not HAVE_TRITON:
        pytest.skip("Triton is not installed")
    dev = torch.device("cuda", 0)
    for n in (4, 4096, (64 << 20) + 12, 1001):
        b = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
        cut = n // 2 // 4 * 4
        parts = [b] if n % 2 else [b[:cut], b[cut:]]
        assert torch.equal(fused_checksum_async(parts), checksum_async(parts)), n
