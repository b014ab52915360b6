"""Prometheus metrics of swarm members (prometheus_client), and `swarm status --prometheus`.

What every node exports (labels `model` and `rank` on each; names as a scrape shows them):

| metric | type | labels | meaning |
| --- | --- | --- | --- |
| `swarm_received_bytes_total` | counter | path, peer_role | verified piece bytes received |
| `swarm_sent_bytes_total` | counter | path, peer_role | piece bytes sent (seed egress) |
| `swarm_pieces_verified_total` | counter | | pieces received whose checksum matched |
| `swarm_pieces_failed_total` | counter | reason | pieces that failed (`bad_checksum`, `error`) |
| `swarm_peers` | gauge | state | members by state: dialing, handshaking, accepted, refused |
| `swarm_seeding_uptime_seconds` | gauge | | seconds since this rank holds the whole model (0: not yet) |
| `swarm_load_seconds` | histogram | source, reason | time to get the weights in place (see below) |
| `swarm_loaded_bytes_total` | counter | source | bytes loaded, by source |

`swarm_load_seconds` counts from the start of a rank's load to its weights in place, by where they came
from (`source`: swarm, disk) and, for disk, why the swarm was not used (`reason`: FALLBACK_REASONS).
`path` is how the bytes moved (`tcp`, `nccl`, `ipc`: the transport's choice for that peer);
`peer_role` is the peer's role when it said hello (`seed`, `leecher`). CUDA IPC reads are one-sided: the
reader counts them as received, the seed does not see them, so they are not in its sent bytes.

Where to read them: `serve(host, port)` (SWARM_METRICS_PORT; a node starts it itself) answers
`GET /metrics` with prometheus_client's default registry (these metrics plus the process's). In vLLM,
whose weights load in worker processes, they reach vLLM's own `/metrics` only in prometheus_client's
multiprocess mode: start vLLM with PROMETHEUS_MULTIPROC_DIR set to an empty directory (vLLM 0.32 then
aggregates every process's metrics files, its own included); the gauges here declare their multiprocess
mode for that. vLLM sets that directory itself only with `--api-server-count` > 1.

Several nodes in one process (tests, benchmarks) with the same labels add up (counters, peers) or show
the longest (uptime). Label values are bounded sets; model and rank are the node's own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LABELS = ("model", "rank")
ROLES = ("seed", "leecher")
PEER_STATES = ("dialing", "handshaking", "accepted", "refused")
FAIL_REASONS = ("bad_checksum", "error")
SOURCES = ("swarm", "disk")
#: Why a load used the disk (the `reason` label of swarm_load_seconds{source="disk"}).
FALLBACK_REASONS = ("no_seed", "manifest_mismatch", "stall", "node_start", "not_swarmable", "error")

RECEIVED = Counter("swarm_received_bytes", "Verified piece bytes received", [*_LABELS, "path", "peer_role"])
SENT = Counter("swarm_sent_bytes", "Piece bytes sent to peers", [*_LABELS, "path", "peer_role"])
VERIFIED = Counter("swarm_pieces_verified", "Pieces received whose checksum matched", _LABELS)
FAILED = Counter("swarm_pieces_failed", "Pieces that failed (checksum or transfer)", [*_LABELS, "reason"])
PEERS = Gauge(
    "swarm_peers", "Swarm members this node knows, by state", [*_LABELS, "state"], multiprocess_mode="livesum"
)
SEEDING = Gauge(
    "swarm_seeding_uptime_seconds",
    "Seconds since this rank holds the whole model and serves it (0: not yet)",
    _LABELS,
    multiprocess_mode="livemax",
)
LOAD = Histogram(
    "swarm_load_seconds",
    "Time to get a rank's weights in place, by source (swarm or disk) and fallback reason",
    [*_LABELS, "source", "reason"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, math.inf),
)
LOADED = Counter("swarm_loaded_bytes", "Weight bytes loaded, by source", [*_LABELS, "source"])


def _bounded(value: str, allowed: Iterable[str], other: str = "other") -> str:
    return value if value in allowed else other


def fallback_reason(error: BaseException | None) -> str:
    """The `reason` label for a load that fell back to disk because of `error` (a bounded set)."""
    from swarm.errors import ConfigError, ManifestError, ManifestMismatchError, NoSeedError, StallError

    if isinstance(error, NoSeedError):
        return "no_seed"
    if isinstance(error, ManifestMismatchError):
        return "manifest_mismatch"
    if isinstance(error, StallError):
        return "stall"
    if isinstance(error, ManifestError):
        return "not_swarmable"
    if isinstance(error, (ConfigError, OSError, RuntimeError)):
        return "node_start"
    return "error"


def record_load(
    *, model: str, rank: str, source: str, seconds: float, nbytes: int = 0, reason: str = ""
) -> None:
    """One rank's weights are in place: from `source` ("swarm" or "disk") after `seconds` (from the
    start of the load, the swarm attempt included); `reason` (FALLBACK_REASONS) says why disk."""
    src = _bounded(source, SOURCES)
    why = "" if src == "swarm" else _bounded(reason, FALLBACK_REASONS, "error")
    LOAD.labels(model, rank, src, why).observe(max(seconds, 0.0))
    if nbytes > 0:
        LOADED.labels(model, rank, src).inc(nbytes)


class LoadTimer:
    """Times one rank's load from its creation: `done("swarm", nbytes)` or `done("disk", nbytes, reason)`
    records it once (later calls are ignored)."""

    def __init__(self, *, model: str, rank: str) -> None:
        self.model, self.rank = model, rank
        self.started = time.monotonic()
        self.recorded = False

    def done(self, source: str, nbytes: int = 0, reason: str = "") -> None:
        if self.recorded:
            return
        self.recorded = True
        seconds = time.monotonic() - self.started
        record_load(
            model=self.model, rank=self.rank, source=source, seconds=seconds, nbytes=nbytes, reason=reason
        )


# --- per node -----------------------------------------------------------------------------------------

_LIVE: set[NodeMetrics] = set()
_LIVE_LOCK = threading.Lock()


class NodeMetrics:
    """The metrics of one node: counters as events happen, gauges published from `update` (called from
    the node's housekeeping), the node's share withdrawn at `close`."""

    def __init__(self, model: str, rank: str) -> None:
        self.labels = (model[:100], rank[:100])
        self._children: dict[tuple[Any, ...], Any] = {}
        self.peers: dict[str, int] = dict.fromkeys(PEER_STATES, 0)
        self.seeding_since: float | None = None
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _child(self, metric: Any, *extra: str) -> Any:
        key = (id(metric), *extra)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*self.labels, *extra)
        return child

    def received(self, path: str, peer_role: str, nbytes: int) -> None:
        self._child(RECEIVED, path, _bounded(peer_role, ROLES)).inc(nbytes)
        self._child(VERIFIED).inc()

    def sent(self, path: str, peer_role: str, nbytes: int) -> None:
        self._child(SENT, path, _bounded(peer_role, ROLES)).inc(nbytes)

    def failed(self, reason: str) -> None:
        self._child(FAILED, _bounded(reason, FAIL_REASONS)).inc()

    def update(self, peers: Mapping[str, int], seeding_since: float | None) -> None:
        self.peers = {s: int(peers.get(s, 0)) for s in PEER_STATES}
        self.seeding_since = seeding_since
        _publish(self.labels)

    def close(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)
        _publish(self.labels)


def _publish(labels: tuple[str, str]) -> None:
    """Set the gauges of `labels` from every live node that has them (several nodes in one process)."""
    now = time.monotonic()
    with _LIVE_LOCK:
        nodes = [n for n in _LIVE if n.labels == labels]
        for state in PEER_STATES:
            PEERS.labels(*labels, state).set(sum(n.peers[state] for n in nodes))
        since = [n.seeding_since for n in nodes if n.seeding_since is not None]
        SEEDING.labels(*labels).set(now - min(since) if since else 0.0)


# --- the HTTP endpoint --------------------------------------------------------------------------------


class MetricsServer:
    """`GET /metrics` on host:port in a thread of its own; `close()` stops it and frees the port."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def serve(host: str, port: int) -> MetricsServer:
    """Serve this process's metrics on host:port (raises ConfigError when the port is taken)."""
    from swarm.errors import ConfigError

    try:
        return MetricsServer(host, port)
    except OSError as e:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {e.strerror}",
            hint="choose another SWARM_METRICS_PORT (rank r of a vLLM instance uses the port + r)",
        ) from None


# --- `swarm status --prometheus` ------------------------------------------------------------------------

#: status field -> (metric, type, help)
_STATUS_FIELDS = {
    "progress": ("swarm_member_progress_ratio", "gauge", "Share of the model's bytes the member holds"),
    "pieces": ("swarm_member_pieces", "gauge", "Pieces the member holds"),
    "pieces_total": ("swarm_member_pieces_total_count", "gauge", "Pieces of the member's model rank"),
    "bytes": ("swarm_member_model_bytes", "gauge", "Bytes of the member's model rank"),
    "bytes_in": ("swarm_member_received_bytes", "counter", "Piece bytes the member received"),
    "bytes_out": ("swarm_member_sent_bytes", "counter", "Piece bytes the member sent"),
    "down_Bps": ("swarm_member_download_bytes_per_second", "gauge", "Recent download rate"),
    "up_Bps": ("swarm_member_upload_bytes_per_second", "gauge", "Recent upload rate"),
    "peers": ("swarm_member_peers", "gauge", "Peers the member has accepted"),
    "uptime_s": ("swarm_member_uptime_seconds", "gauge", "Seconds since the member started"),
}
_MEMBER_LABELS = ("instance", "host", "port", "model", "rank", "role", "transport")


class _StatusCollector(Collector):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def collect(self) -> Iterable[Any]:
        up = GaugeMetricFamily("swarm_members", "Members that answered `swarm status`")
        up.add_metric([], len(self.rows))
        yield up
        for key, (name, kind, text) in _STATUS_FIELDS.items():
            family: Any = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=_MEMBER_LABELS
            )
            for row in self.rows:
                value = _number(row.get(key))
                if value is not None:
                    family.add_metric([str(row.get(k, ""))[:100] for k in _MEMBER_LABELS], value)
            yield family


def _number(value: Any) -> float | None:
    """A status value from the network as a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def status_exposition(rows: list[dict[str, Any]]) -> str:
    """Every member's status (cli.collect_status rows) in Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(rows))
    return generate_latest(registry).decode()
