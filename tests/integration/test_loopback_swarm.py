"""A real swarm on loopback: one seed and several leechers as separate processes, over ZMQ and TCP."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Procs, status
from tests.loopback import free_port, wait_until

SIZE = "24MB"
COMMON = ["--synthetic", SIZE, "--piece-size", "512KB", "--no-mdns", "--host", "127.0.0.1"]


@pytest.mark.timeout(180)
def test_seed_and_three_leechers_end_byte_identical(procs: Procs) -> None:
    port = free_port()
    seed = procs.start("seed", *COMMON, "--port", str(port), name="seed")
    wait_until(lambda: status(f"127.0.0.1:{port}"), 30, "the seed to answer status", step=0.2)
    peers = f"127.0.0.1:{port}"
    leechers = [
        procs.start("fetch", *COMMON, "--peers", peers, "--exit", "--quiet", name=f"leecher{i}")
        for i in range(3)
    ]
    for p in leechers:
        assert p.wait(120) == 0, procs.log(p)
        assert "verified: identical to the synthetic model" in procs.log(p)
    assert seed.poll() is None, procs.log(seed)


@pytest.mark.timeout(180)
def test_later_leecher_pulls_from_an_earlier_one(procs: Procs) -> None:
    port = free_port()
    # A slow seed (rate cap) makes the earlier leecher, once complete, the faster source.
    procs.start("seed", *COMMON, "--port", str(port), "--rate-cap", "8MB", name="seed")
    peers = f"127.0.0.1:{port}"
    wait_until(lambda: status(peers), 30, "the seed to answer status", step=0.2)
    first_port = free_port()
    procs.start("fetch", *COMMON, "--peers", peers, "--port", str(first_port), "--quiet", name="first")
    all_peers = f"{peers},127.0.0.1:{first_port}"

    def first_is_seed() -> bool:
        return any(r["role"] == "seed" and r["port"] == first_port for r in status(all_peers))

    wait_until(first_is_seed, 60, "the first leecher to complete", step=0.2)
    later_port = free_port()
    later = procs.start(
        "fetch",
        *COMMON,
        "--peers",
        peers,
        "--port",
        str(later_port),
        "--quiet",
        "--duration",
        "30",
        name="later",
    )
    rows_peers = f"{all_peers},127.0.0.1:{later_port}"

    def later_done() -> bool:
        return any(r["port"] == later_port and r["role"] == "seed" for r in status(rows_peers))

    wait_until(later_done, 60, "the later leecher to complete", step=0.2)
    rows = {r["port"]: r for r in status(rows_peers)}
    first_id = rows[first_port]["instance"]
    got = rows[later_port]["from"]
    assert isinstance(got, dict)
    # The later leecher found the first one through the seed's peer list and took pieces from it.
    assert got.get(first_id, 0) > 0, rows
    assert sum(got.values()) >= rows[later_port]["bytes"], rows
    assert rows[first_port]["to"].get(rows[later_port]["instance"], 0) > 0, rows  # type: ignore[union-attr]
    assert "verified: identical" in procs.log(later)


def test_status_with_nothing_running_says_what_to_check() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "status", "--no-mdns", "--peers", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "no swarm member answered" in out.stderr and "SWARM_PEERS" in out.stderr


def test_busy_control_port_fails_at_start_without_hanging() -> None:
    import socket

    import torch

    from swarm.errors import ConfigError
    from swarm.manifest import SwarmKey
    from swarm.node import Node, NodeConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = NodeConfig(host="127.0.0.1", control_port=port, mdns=False, piece_size=1024)
        node = Node(SwarmKey("m", "uint8"), {"w": torch.zeros(10, dtype=torch.uint8)}, cfg, complete=True)
        with pytest.raises(ConfigError, match="cannot listen"):
            node.start()


def test_a_member_of_another_swarm_is_named_in_the_error() -> None:
    import torch

    from swarm.errors import ManifestMismatchError
    from swarm.manifest import SwarmKey
    from swarm.node import Node, NodeConfig

    cfg = NodeConfig(host="127.0.0.1", mdns=False, piece_size=1024, discovery_timeout_s=1.5)
    t = {"w": torch.arange(100, dtype=torch.uint8)}
    with Node(SwarmKey("model-a", "uint8"), t, cfg, complete=True) as seed:
        leech_cfg = NodeConfig(
            host="127.0.0.1",
            mdns=False,
            piece_size=1024,
            discovery_timeout_s=1.5,
            peers=f"127.0.0.1:{seed.control_port}",
        )
        with Node(
            SwarmKey("model-b", "uint8"),
            {"w": torch.zeros(100, dtype=torch.uint8)},
            leech_cfg,
            complete=False,
        ) as leech:
            with pytest.raises(ManifestMismatchError, match="other swarm key: model-a"):
                leech.fetch()


def test_a_seed_with_another_piece_size_is_named_in_the_error() -> None:
    """Same key, another manifest (a misconfigured piece size): the leecher reads the seed's manifest to
    name the difference, although its checksum list has another length than ours (that reply was once
    dropped as malformed, and the leecher only said it found no seed)."""
    import torch

    from swarm.errors import ManifestMismatchError
    from swarm.manifest import SwarmKey
    from swarm.node import Node, NodeConfig

    key = SwarmKey("model-a", "uint8")
    t = {"w": torch.arange(200, dtype=torch.uint8).repeat(50)}
    cfg = NodeConfig(host="127.0.0.1", mdns=False, piece_size=1024, discovery_timeout_s=3.0)
    with Node(key, t, cfg, complete=True) as seed:
        leech_cfg = NodeConfig(
            host="127.0.0.1",
            mdns=False,
            piece_size=2048,
            discovery_timeout_s=3.0,
            peers=f"127.0.0.1:{seed.control_port}",
        )
        with Node(key, {"w": torch.zeros(10_000, dtype=torch.uint8)}, leech_cfg, complete=False) as leech:
            with pytest.raises(ManifestMismatchError, match="piece size 2048 here, 1024 there"):
                leech.fetch()


def test_a_seed_tells_its_leecher_every_piece_it_hands_out() -> None:
    from tests.faults.harness import closing, leecher_node, peers_of, seed_node, wrong_bytes

    with closing(seed_node()) as (seed,), closing(leecher_node(peers=peers_of(seed))) as (leech,):
        leech.fetch()
        assert wrong_bytes(dict(leech.tensors)) == 0
        k = leech.scheduler.num_pieces
        # the last hint may trail its piece by a message; one hint per piece
        wait_until(lambda: leech.scheduler.peer_stats(seed.id).handed_out == k, 10.0, "every handed-out hint")


def test_piece_events_travel_in_batches() -> None:
    """Requests and haves leave as one Batch per peer and loop turn: the seed sees every piece requested
    (some twice: a request that beats the data channel is refused and asked again) and announced
    exactly once, and the requests of one turn (a pipeline of two or more) in one frame."""
    from swarm import protocol as P
    from tests.faults.harness import closing, leecher_node, peers_of, seed_node, wrong_bytes

    with closing(seed_node()) as (seed,):
        seen: list[P.Batch] = []
        on_batch = seed._on_batch

        def recording(peer: object, msg: P.Batch, now: float) -> None:
            seen.append(msg)
            on_batch(peer, msg, now)  # type: ignore[arg-type]

        seed._on_batch = recording  # type: ignore[method-assign]
        with closing(leecher_node(peers=peers_of(seed))) as (leech,):
            leech.fetch()
            assert wrong_bytes(dict(leech.tensors)) == 0
            k = leech.scheduler.num_pieces
            wait_until(lambda: sum(len(b.have) for b in seen) == k, 10.0, "a have of every piece")
            requested = [p for b in seen for p in b.request]
            assert set(requested) == set(range(k))
            assert max(len(b.request) for b in seen) >= 2
            assert sorted(p for b in seen for p in b.have) == list(range(k))
