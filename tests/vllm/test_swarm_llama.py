"""Real vLLM instances (CPU) on a tiny Llama: A from disk seeds, B and C load from the swarm with no weight
files, a different model under the same key is refused with a readable difference, and a leecher with
neither seed nor weights fails with a plain message.

One module, servers shared in order (A, then B, then C, ...); each test only reads what the servers did.
At most three servers run at once (C pulls from A and B while both serve), and only while C starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vllm.conftest import PROMPTS, Servers, swarm_opts, swarm_status
from tests.vllm.server import VllmServer, free_port

pytestmark = pytest.mark.vllm

#: 5.2 MB model in 64 KiB pieces: 81 pieces, enough for C to take some from each of A and B.
PIECE = "64KiB"
PORTS = {name: free_port() for name in ("A", "B", "C", "D", "D2")}


def _opts(name: str, peers: str = "", **kw: object) -> dict[str, object]:
    return swarm_opts(PORTS[name], [PORTS[p] for p in peers], piece_size=PIECE, **kw)


@pytest.fixture(scope="module")
def seed_a(servers: Servers, models: dict[str, Path]) -> VllmServer:
    """A: has the weights, runs --load-format swarm, finds no seed, loads from disk, then seeds."""
    return servers.start("A", models["tiny-llama"], swarm=_opts("A")).wait_ready()


@pytest.fixture(scope="module")
def reference(seed_a: VllmServer) -> list[list[int]]:
    return [seed_a.complete(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def leech_b(servers: Servers, models: dict[str, Path], seed_a: VllmServer) -> VllmServer:
    return servers.start("B", models["tiny-llama:leech"], swarm=_opts("B", "A")).wait_ready()


@pytest.fixture(scope="module")
def leech_c(servers: Servers, models: dict[str, Path], seed_a: VllmServer, leech_b: VllmServer) -> VllmServer:
    return servers.start("C", models["tiny-llama:leech"], swarm=_opts("C", "AB")).wait_ready()


def _status(name: str) -> dict[str, object]:
    rows = swarm_status([PORTS[name]])
    assert len(rows) == 1, rows
    return rows[0]


def test_a_falls_back_to_disk_within_deadline_then_seeds(seed_a: VllmServer) -> None:
    log = seed_a.log()
    assert "swarm: no seed found" in log
    assert "loading from disk instead" in log
    assert "swarm: loaded from disk; now seeding" in log
    # the fallback came within the discovery time (3 s) of the node starting, plus slack for the log clock
    start = _log_time(log, "listening on")
    fell_back = _log_time(log, "swarm: no seed found")
    assert 0 <= fell_back - start <= 3 + 2, (start, fell_back)
    st = _status("A")
    assert st["role"] == "seed" and st["progress"] == 1.0
    assert st["model"] == "tiny-llama" and st["rank"] == "tp0/1,pp0/1"


def test_b_loads_everything_from_the_swarm_with_identical_outputs(
    leech_b: VllmServer, reference: list[list[int]], models: dict[str, Path]
) -> None:
    assert not list(models["tiny-llama:leech"].glob("*.safetensors"))
    assert [leech_b.complete(p) for p in PROMPTS] == reference
    log = leech_b.log()
    assert "loading from disk" not in log
    m = re.search(
        r"swarm: loaded ([\d.]+ MB) from 1 peer\(s\) in [\d.]+ s \([\d.]+ GB/s\), 0 bytes from disk", log
    )
    assert m, log[-3000:]
    st = _status("B")
    a = _status("A")
    assert st["role"] == "seed"
    assert st["from"] == {a["instance"]: st["bytes"]}, st


def test_c_pulls_from_both_a_and_b(leech_c: VllmServer, reference: list[list[int]]) -> None:
    assert [leech_c.complete(p) for p in PROMPTS] == reference
    st = _status("C")
    a, b = _status("A"), _status("B")
    got = st["from"]
    assert isinstance(got, dict)
    assert set(got) == {a["instance"], b["instance"]}, got
    assert sum(got.values()) == st["bytes"]
    assert "from 2 peer(s)" in leech_c.log()


def test_swarm_status_lists_the_vllm_instances(leech_c: VllmServer) -> None:
    rows = swarm_status([PORTS[n] for n in "ABC"])
    assert len(rows) == 3
    assert {(r["model"], r["rank"], r["role"]) for r in rows} == {("tiny-llama", "tp0/1,pp0/1", "seed")}


def test_a_seed_with_another_manifest_is_refused_with_the_difference(
    servers: Servers, models: dict[str, Path], seed_a: VllmServer
) -> None:
    """D runs the same model with another piece size (a misconfigured SWARM_PIECE_SIZE): same swarm key,
    different manifest. D says where they differ, loads from disk, and seeds."""
    for s in servers.servers:
        if s.name in ("B", "C"):
            servers.stop(s)
    d = servers.start(
        "D", models["tiny-llama"], swarm={**_opts("D", "A"), "piece_size": "128KiB"}
    ).wait_ready()
    log = d.log()
    assert "holds a different manifest: piece size 131072 here, 65536 there" in log, log[-3000:]
    assert "loading from disk instead" in log
    assert "swarm: loaded from disk; now seeding" in log
    assert d.complete(PROMPTS[0])
    servers.stop(d)


def test_a_seed_of_another_model_is_refused(
    servers: Servers, models: dict[str, Path], seed_a: VllmServer
) -> None:
    """D2 runs another model (hidden size 128), so another swarm key, and is pointed at A: it must not
    take A's pieces; it loads from disk and seeds."""
    d = servers.start("D2", models["tiny-llama-narrow"], swarm=_opts("D2", "A")).wait_ready()
    log = d.log()
    servers.stop(d)
    assert "swarm: loaded from disk; now seeding" in log
    assert "swarm: loaded " not in log.replace("swarm: loaded from disk", "")
    assert "other swarm key: tiny-llama@" in log, log[-3000:]


def test_no_seed_and_no_weights_fails_plainly(servers: Servers, models: dict[str, Path]) -> None:
    e = servers.start("E", models["tiny-llama:leech"], swarm=swarm_opts(free_port(), discovery_timeout_s=1.0))
    rc = e.wait_exit(240)
    assert rc != 0
    log = e.log()
    assert "no seed found" in log
    assert "the model directory has no weight files to fall back to" in log, log[-3000:]


def _log_time(log: str, needle: str) -> int:
    for line in log.splitlines():
        if needle in line:
            m = re.search(r"(\d\d):(\d\d):(\d\d)", line)
            assert m, line
            h, mi, s = map(int, m.groups())
            return h * 3600 + mi * 60 + s
    raise AssertionError(f"{needle!r} not in the log")


@pytest.fixture(autouse=True, scope="module")
def _stop_all(servers: Servers) -> Iterator[None]:
    yield
    servers.close()
