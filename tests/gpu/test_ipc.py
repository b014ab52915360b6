"""The CUDA IPC transport between member processes on one GPU (tests/gpu/members.py), with real nodes,
real ZeroMQ on loopback and the path chosen per pair by swarm.transport.auto. Skipped without CUDA."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (one GPU)"),
]


@pytest.fixture
def members() -> Iterator[Any]:
    pytest.importorskip("zmq")
    from tests.gpu.members import Members
    from tests.loopback import free_port

    m = Members()
    m.ports = [free_port() for _ in range(4)]  # type: ignore[attr-defined]
    try:
        yield m
    finally:
        m.close()


def opts(m: Any, rank: int, role: str, peers: list[int], **extra: Any) -> dict[str, Any]:
    return {"rank": rank, "role": role, "ports": m.ports, "peers": peers, "piece_mib": 1, **extra}


def ids(m: Any) -> dict[int, str]:
    return {r["rank"]: r["id"] for r in m.records if r.get("event") == "ready"}


def assert_complete(done: dict[str, Any]) -> None:
    assert done["identical"], "bytes differ from the seed's"
    assert done["kernel_ok"], "the CUDA context no longer runs a kernel"
    assert sum(done["from"].values()) == done["bytes"]


def test_seed_and_three_leechers_over_ipc(members: Any) -> None:
    members.start(opts(members, 0, "seed", []))
    members.event(0, "ready")
    for r in (1, 2, 3):
        members.start(opts(members, r, "leecher", [j for j in range(4) if j != r]))
    done = [members.event(r, "done") for r in (1, 2, 3)]
    who = ids(members)
    for d in done:
        assert_complete(d)
        # Every pair of GPU members on this host chose CUDA IPC, and every piece came that way.
        assert set(d["stats"]["status_paths"].values()) == {"ipc"}, d["stats"]["status_paths"]
        assert who[0] in d["stats"]["status_paths"]
        assert d["stats"]["ipc"]["bytes_received"] == d["bytes"]
        assert d["stats"]["ipc"]["checksum"] == "fused"
        assert d["stats"]["tcp"]["bytes_received"] == 0


def test_leecher_reads_from_seed_and_from_a_leecher_at_once(members: Any) -> None:
    members.start(opts(members, 0, "seed", []))
    members.event(0, "ready")
    # Leecher 1 reads slowly, so that leecher 2 meets it while it holds only part of the model; both
    # processes are up before either starts its node.
    members.start(opts(members, 1, "leecher", [0], pace_s=0.05, wait_go=True))
    # Leecher 2 is paced too (lightly), so that it has met both holders before it is done.
    members.start(opts(members, 2, "leecher", [0, 1], pace_s=0.005, wait_go=True))
    members.event(1, "waiting")
    members.event(2, "waiting")
    members.tell(1, "go")
    members.wait(
        lambda r: r.get("rank") == 1 and r.get("event") == "progress" and r["done"] * 4 > r["total"],
        60,
        "a quarter",
    )
    members.tell(2, "go")
    d2 = members.event(2, "done")
    d1 = members.event(1, "done")
    who = ids(members)
    assert_complete(d2)
    assert_complete(d1)
    assert d2["from"].get(who[0], 0) > 0 and d2["from"].get(who[1], 0) > 0, d2["from"]
    assert d2["stats"]["status_paths"] == {who[0]: "ipc", who[1]: "ipc"}


def test_seed_killed_mid_transfer_leecher_finishes_from_another_holder(members: Any) -> None:
    members.start(opts(members, 0, "seed", []))
    members.event(0, "ready")
    members.start(opts(members, 1, "leecher", [0]))
    members.event(1, "done")
    members.start(opts(members, 2, "leecher", [0, 1], pace_s=0.04, node={"peer_timeout_s": 1.5}))
    members.wait(
        lambda r: r.get("rank") == 2 and r.get("event") == "progress" and r["done"] * 5 > r["total"],
        60,
        "a fifth",
    )
    members.kill(0)  # SIGKILL while leecher 2 has copies out of the seed's memory queued
    done = members.event(2, "done", timeout=120)
    who = ids(members)
    assert_complete(done)  # byte-identical, and a kernel ran afterwards
    assert done["from"].get(who[1], 0) > 0, done["from"]


def test_corrupt_bytes_are_caught_by_the_gpu_checksum(members: Any) -> None:
    members.start(opts(members, 0, "seed", []))
    members.start(opts(members, 1, "seed", [], corrupt_piece=-1))  # every piece wrong, checksums right
    members.event(0, "ready")
    members.event(1, "ready")
    members.start(opts(members, 2, "leecher", [0, 1], pace_s=0.01))  # paced: it meets both seeds
    done = members.event(2, "done")
    who = ids(members)
    assert_complete(done)
    assert done["stats"]["ipc"]["checksum_failures"] >= 1
    assert done["from"].get(who[1], 0) == 0  # nothing from the corrupt member was kept


def test_mixed_swarm_on_one_host(members: Any) -> None:
    members.start(opts(members, 0, "seed", []))
    members.event(0, "ready")
    members.start(opts(members, 1, "leecher", [0], device="cpu"))  # host memory: TCP only
    cpu = members.event(1, "done")
    members.start(opts(members, 2, "leecher", [0, 1], pace_s=0.01))  # paced: it meets both members
    gpu = members.event(2, "done")
    who = ids(members)
    assert cpu["identical"] and gpu["identical"] and gpu["kernel_ok"]
    assert cpu["stats"]["status_paths"] == {who[0]: "tcp"}
    assert cpu["stats"]["tcp"]["bytes_received"] == cpu["bytes"]  # GPU seed -> CPU member over TCP
    assert gpu["stats"]["status_paths"] == {who[0]: "ipc", who[1]: "tcp"}, gpu["stats"]["status_paths"]


def test_export_claiming_more_than_it_shares_is_refused_and_the_pair_uses_tcp(members: Any) -> None:
    # Every storage of the seed's export claims 1 GiB more than is mapped: reading it would fault and
    # kill the reader's CUDA context. The reader's bounds check refuses the export; the pair moves to TCP.
    members.start(opts(members, 0, "seed", [], lie_export=True))
    members.event(0, "ready")
    members.start(opts(members, 1, "leecher", [0]))
    done = members.event(1, "done")
    who = ids(members)
    assert_complete(done)  # byte-identical, and the CUDA context still runs a kernel
    assert done["stats"]["status_paths"] == {who[0]: "tcp"}
    assert done["stats"]["ipc"]["bytes_received"] == 0 and done["stats"]["ipc"]["imports"] == 0
    assert done["stats"]["tcp"]["bytes_received"] == done["bytes"]
