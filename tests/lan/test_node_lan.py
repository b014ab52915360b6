"""A real swarm on a (namespaced) LAN: one seed and three leechers on four hosts, each in its own network
namespace behind a tbf-shaped link, finding each other by real multicast mDNS only (no static peer list).

Each member is the real `swarm` CLI (`swarm seed` / `swarm fetch --synthetic`), so this covers discovery,
the ZMQ control plane, the TCP data plane and the scheduler end to end. Every leecher must end
byte-identical to the synthetic model (`swarm fetch` compares every byte before it prints "verified:
identical"), and `swarm status`, run inside one host's namespace, must list all four members.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import netns  # tests/lan is on sys.path (see conftest.py)
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SIZE = "24MB"
RATE_MBIT = 200  # 24 MiB at 200 Mbit/s: ~1 s of pure transfer per copy
TIMEOUT = 45.0  # generous bound for CI; the whole test takes ~15 s on a 2-core VM
MEMBER = ["-m", "swarm.cli", "-v"]
OPTIONS = ["--synthetic", SIZE, "--piece-size", "1MB", "--discovery-timeout", "20"]


def swarm(host: netns.Host, *args: str) -> netns.HostProcess:
    return host.python(*MEMBER, *args, pythonpath=[REPO_ROOT])


def status_rows(host: netns.Host) -> list[dict[str, object]]:
    proc = host.python("-m", "swarm.cli", "status", "--json", "--timeout", "3", pythonpath=[REPO_ROOT])
    code = proc.wait(TIMEOUT)
    out = "\n".join(proc.lines)
    assert code == 0, f"swarm status exited {code}:\n{out}\n{proc.stderr}"
    rows: list[dict[str, object]] = json.loads(out)
    return rows


@pytest.mark.timeout(120)
def test_seed_and_three_leechers_over_mdns_on_shaped_links(make_lan: Callable[..., netns.Lan]) -> None:
    lan = make_lan(4, rate_mbit=RATE_MBIT)
    seed_host, *leecher_hosts = lan.hosts
    for h in lan.hosts:  # every link really is shaped (tbf on both ends)
        assert h.qdiscs().count("tbf") == 2, h.qdiscs()

    seed = swarm(seed_host, "seed", *OPTIONS)
    seed.expect("seeding synthetic model", TIMEOUT)
    # No --peers and no SWARM_PEERS: the leechers can only find the seed (and each other) by mDNS.
    leechers = [swarm(h, "fetch", *OPTIONS) for h in leecher_hosts]
    ids = []
    for proc in leechers:
        line = proc.expect("verified:", TIMEOUT)
        assert "identical to the synthetic model" in line, line
        ids.append(line.split(":")[0])

    # The leechers keep seeding (no --exit): `swarm status` from a leecher's namespace sees all four.
    rows = status_rows(leecher_hosts[0])
    by_id = {str(r["instance"]): r for r in rows}
    assert len(rows) == 4, rows
    assert set(ids) <= set(by_id), rows
    assert {str(r["host"]) for r in rows} == {h.ip for h in lan.hosts}, rows
    assert all(r["role"] == "seed" and r["progress"] == 1.0 for r in rows), rows
    seed_row = next(r for r in rows if r["host"] == seed_host.ip)
    total = int(str(seed_row["bytes"]))
    for i in ids:
        got = by_id[i]["from"]
        assert isinstance(got, dict) and sum(got.values()) >= total, by_id[i]
    # A swarm, not a fan-out: the leechers traded pieces among themselves.
    assert sum(int(str(by_id[i]["bytes_out"])) for i in ids) > 0, rows

    for proc in [*leechers, seed]:
        proc.stop()
        assert proc.returncode == 0, "\n".join(proc.lines) + proc.stderr
