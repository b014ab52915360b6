"""The swarm's Prometheus metrics from real CPU vLLM servers with `--load-format swarm`: on each rank's
SWARM_METRICS_PORT, and in vLLM's own /metrics when vLLM runs in prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR set: the weights load in another process than the API server's)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.loopback import wait_until
from tests.vllm.conftest import Servers, free_port, swarm_opts, swarm_status

pytestmark = pytest.mark.vllm

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_swarm_metrics_of_a_seed_and_a_leecher(
    servers: Servers, models: dict[str, Path], tmp_path: Path
) -> None:
    pa, pb, ma, mb = free_port(), free_port(), free_port(), free_port()
    a = servers.start("MA", models["tiny-llama"], swarm=swarm_opts(pa, metrics_port=ma)).wait_ready()
    seed = scrape(f"http://127.0.0.1:{ma}/metrics")
    assert value(seed, "swarm_seeding_uptime_seconds", model="tiny-llama") > 0
    # A found no seed: one load, from disk, for that reason
    assert value(seed, "swarm_load_seconds_count", source="disk", reason="no_seed") == 1
    assert value(seed, "swarm_load_seconds_count", source="swarm") == 0
    # Without multiprocess mode vLLM's /metrics is the API server's alone: no swarm series there.
    assert not [k for k in scrape(a.url + "/metrics") if k[0].startswith("swarm_")]

    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    b = servers.start(
        "MB",
        models["tiny-llama:leech"],
        swarm=swarm_opts(pb, [pa], metrics_port=mb),
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
    ).wait_ready()
    (row,) = [r for r in swarm_status([pb]) if r["port"] == pb]
    total = row["bytes"]
    leech = scrape(f"http://127.0.0.1:{mb}/metrics")
    assert value(leech, "swarm_received_bytes_total", path="tcp", peer_role="seed") == total
    assert value(leech, "swarm_pieces_verified_total") == row["pieces_total"]
    assert value(leech, "swarm_pieces_failed_total") == 0
    assert value(leech, "swarm_load_seconds_count", source="swarm") == 1
    assert value(leech, "swarm_load_seconds_count", source="disk") == 0
    wait_until(
        lambda: (
            value(scrape(f"http://127.0.0.1:{ma}/metrics"), "swarm_sent_bytes_total", peer_role="leecher")
            == total
        ),
        30,
        "the seed's sent bytes",
    )
    # In multiprocess mode the same series are in vLLM's own /metrics, beside vLLM's.
    merged = scrape(b.url + "/metrics")
    assert value(merged, "swarm_received_bytes_total", path="tcp", peer_role="seed") == total
    assert value(merged, "swarm_seeding_uptime_seconds") > 0
    assert [k for k in merged if k[0].startswith("vllm:")]
