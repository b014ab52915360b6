"""A real swarm on loopback: one seed and several leechers as separate processes, over ZMQ and TCP."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Procs, free_port, status, wait_until

SIZE = "24MB"
COMMON = ["--synthetic", SIZE, "--piece-size", "512KB", "--no-mdns", "--host", "127.0.0.1"]


@pytest.mark.timeout(180)
def test_seed_and_three_leechers_end_byte_identical(procs: Procs) -> None:
    port = free_port()
    seed = procs.start("seed", *COMMON, "--port", str(port), name="seed")
    wait_until(lambda: status(f"127.0.0.1:{port}"), 30, "the seed to answer status")
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
    wait_until(lambda: status(peers), 30, "the seed to answer status")
    first_port = free_port()
    procs.start("fetch", *COMMON, "--peers", peers, "--port", str(first_port), "--quiet", name="first")
    all_peers = f"{peers},127.0.0.1:{first_port}"

    def first_is_seed() -> bool:
        return any(r["role"] == "seed" and r["port"] == first_port for r in status(all_peers))

    wait_until(first_is_seed, 60, "the first leecher to complete")
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

    wait_until(later_done, 60, "the later leecher to complete")
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
