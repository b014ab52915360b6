"""The Grafana dashboard and docs/operations.md name only metrics that swarm.metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import swarm.metrics  # noqa: F401  (registers the families)

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bswarm_[a-z_]+")


def exported() -> set[str]:
    """Every sample name swarm.metrics' families can have (also before their first use)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("swarm_"):
            names |= {family.name, *(family.name + s for s in ("_total", "_bucket", "_sum", "_count"))}
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used and used <= exported(), used - exported()
    for panel in ("Load time per instance", "Swarm vs disk", "Bytes received per path", "Seed egress"):
        assert any(p["title"].startswith(panel) for p in dash["panels"]), panel


def test_operations_doc_lists_every_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Metrics") : text.index("## Kubernetes")]
    documented = {n for n in NAME.findall(section) if not n.startswith("swarm_member")}
    families = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in REGISTRY.collect()
        if f.name.startswith("swarm_")
    }
    assert families <= documented, families - documented
