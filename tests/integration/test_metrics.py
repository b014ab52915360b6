"""Prometheus metrics of real members on loopback, scraped over HTTP (real sockets), and
`swarm status --prometheus`."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm import cli, metrics
from swarm.errors import ConfigError
from swarm.node import Node, NodeConfig
from swarm.synthetic import synthetic_key, synthetic_tensors
from tests.integration.conftest import Procs
from tests.loopback import free_port, wait_until

SIZE = 2_000_000
PIECE = 65536


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture
def seed_process(procs: Procs) -> Iterator[tuple[int, int]]:
    port, mport = free_port(), free_port()
    procs.start(
        "seed", "--synthetic", str(SIZE), "--piece-size", str(PIECE), "--no-mdns", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(mport), name="seed",
    )  # fmt: skip
    wait_until(lambda: _answers(mport), 60, "the seed's metrics endpoint")
    yield port, mport


def _answers(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def test_a_fetch_shows_in_both_members_metrics(seed_process: tuple[int, int]) -> None:
    port, seed_metrics = seed_process
    before = scrape(seed_metrics)
    assert value(before, "swarm_seeding_uptime_seconds") > 0  # a seed from the start
    assert value(before, "swarm_sent_bytes_total") == 0

    leech_metrics = free_port()
    cfg = NodeConfig(
        host="127.0.0.1", control_port=0, mdns=False, peers=f"127.0.0.1:{port}", piece_size=PIECE,
        metrics_port=leech_metrics, model_name="leech-metrics-test",
    )  # fmt: skip
    tensors = synthetic_tensors(SIZE, fill=False)
    with Node(synthetic_key(SIZE), tensors, cfg, complete=False) as node:
        mine = scrape(leech_metrics)
        assert value(mine, "swarm_seeding_uptime_seconds", model="leech-metrics-test") == 0
        report = node.fetch()
        total = node.manifest.total_bytes
        assert report.total_bytes == total
        # the report (and so the loader's "loaded ... from" line) names each peer's path
        assert list(report.peer_paths.values()) == ["tcp"]
        assert "(tcp): " in report.describe()
        wait_until(
            lambda: (
                value(scrape(leech_metrics), "swarm_peers", model="leech-metrics-test", state="accepted") == 1
            ),
            10,
            "the leecher's peer gauge",
        )
        mine = scrape(leech_metrics)
        labels = {"model": "leech-metrics-test", "path": "tcp", "peer_role": "seed"}
        assert value(mine, "swarm_received_bytes_total", **labels) == total
        assert value(mine, "swarm_pieces_verified_total", model="leech-metrics-test") == len(
            node.manifest.pieces
        )
        assert value(mine, "swarm_pieces_failed_total", model="leech-metrics-test") == 0
        wait_until(
            lambda: (
                value(scrape(leech_metrics), "swarm_seeding_uptime_seconds", model="leech-metrics-test") > 0
            ),
            10,
            "the leecher to count itself a seed",
        )
        # the seed, another process, counts the same bytes as sent to a leecher over TCP
        wait_until(
            lambda: (
                value(scrape(seed_metrics), "swarm_sent_bytes_total", path="tcp", peer_role="leecher")
                == total
            ),
            10,
            "the seed's sent bytes",
        )
        # `swarm status --prometheus` sees both members
        code = cli.main(
            [
                "status",
                "--prometheus",
                "--no-mdns",
                "--peers",
                f"127.0.0.1:{port},127.0.0.1:{node.control_port}",
            ]
        )
        assert code == 0
    # the node's endpoint is gone with the node
    assert not _answers(leech_metrics)


def test_status_prometheus_output(seed_process: tuple[int, int], capsys: pytest.CaptureFixture[str]) -> None:
    port, _ = seed_process
    capsys.readouterr()
    assert (
        cli.main(["status", "--prometheus", "--no-mdns", "--peers", f"127.0.0.1:{port}", "--timeout", "0.5"])
        == 0
    )
    out = capsys.readouterr().out
    samples = {
        (s.name, s.labels.get("role", "")): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
    }
    assert samples[("swarm_members", "")] == 1
    assert samples[("swarm_member_progress_ratio", "seed")] == 1.0
    expected = sum(t.numel() * t.element_size() for t in synthetic_tensors(SIZE, fill=False).values())
    assert samples[("swarm_member_model_bytes", "seed")] == expected


def test_status_exposition_ignores_hostile_values() -> None:
    rows = [
        {"instance": "x" * 500, "progress": "1; drop", "pieces": float("nan"), "peers": True, "uptime_s": 3}
    ]
    out = metrics.status_exposition(rows)
    names = {s.name for f in text_string_to_metric_families(out) for s in f.samples}
    assert "swarm_member_uptime_seconds" in names
    assert "swarm_member_progress_ratio" not in names and "swarm_member_peers" not in names


def test_a_taken_metrics_port_is_a_config_error() -> None:
    server = metrics.serve("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="SWARM_METRICS_PORT"):
            metrics.serve("127.0.0.1", server.port)
    finally:
        server.close()


def test_record_load_labels_are_bounded() -> None:
    metrics.record_load(model="m-load", rank="tp0/1", source="disk", seconds=1.5, nbytes=10, reason="no_seed")
    metrics.record_load(model="m-load", rank="tp0/1", source="disk", seconds=1.0, reason="something new")
    metrics.record_load(
        model="m-load", rank="tp0/1", source="swarm", seconds=0.5, nbytes=20, reason="ignored"
    )
    from prometheus_client import REGISTRY

    def get(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": "m-load", "rank": "tp0/1", **labels})

    assert get("swarm_load_seconds_count", source="disk", reason="no_seed") == 1
    assert get("swarm_load_seconds_count", source="disk", reason="error") == 1
    assert get("swarm_load_seconds_sum", source="swarm", reason="") == 0.5
    assert get("swarm_loaded_bytes_total", source="swarm") == 20


def test_fallback_reasons() -> None:
    from swarm.errors import ManifestMismatchError, NoSeedError, StallError

    assert metrics.fallback_reason(NoSeedError("x")) == "no_seed"
    assert metrics.fallback_reason(ManifestMismatchError("x", difference="y")) == "manifest_mismatch"
    assert metrics.fallback_reason(StallError("x", missing=[])) == "stall"
    assert metrics.fallback_reason(OSError()) == "node_start"
    assert metrics.fallback_reason(None) == "error"


def test_load_timer_records_once() -> None:
    from prometheus_client import REGISTRY

    timer = metrics.LoadTimer(model="m-timer", rank="tp0/1")
    timer.done("disk", nbytes=5, reason="stall")
    timer.done("swarm", nbytes=7)
    labels = {"model": "m-timer", "rank": "tp0/1"}
    assert (
        REGISTRY.get_sample_value("swarm_load_seconds_count", {**labels, "source": "disk", "reason": "stall"})
        == 1
    )
    assert (
        REGISTRY.get_sample_value("swarm_load_seconds_count", {**labels, "source": "swarm", "reason": ""})
        is None
    )
