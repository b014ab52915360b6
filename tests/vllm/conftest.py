"""Fixtures for tests with real vLLM servers (CPU build) on tiny models made by the tests.

Servers are shared within a module where the tests stay independent (each test only reads a running
server's outputs, logs and swarm status), and every server is killed at the end of its module, also
on failure. Swarm members find each other through static peers on 127.0.0.1 (mDNS off), so the tests
do not depend on multicast and do not see other swarms on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.server import VllmServer, free_port
from vllm_plugin.tinymodel import copy_without_weights, make_tiny_model

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("SWARM_REQUIRE_VLLM") == "1":  # scripts/test.sh: a run that must test vLLM
        raise RuntimeError("SWARM_REQUIRE_VLLM=1 but vLLM is not installed in this environment")
    pytest.skip("vLLM is not installed (pip install -e '.[cpu]')", allow_module_level=True)

PROMPTS = ["the cat saw a dog", "hello world , one two three", "red green blue sky"]


class Servers:
    """Starts vLLM servers and stops every one of them at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: list[VllmServer] = []

    def start(self, name: str, model: Path, *, swarm: dict[str, Any] | None = None, **kw: Any) -> VllmServer:
        s = VllmServer(model, self.tmp / f"{name}.log", swarm=swarm, name=name, **kw)
        self.servers.append(s)
        return s

    def stop(self, server: VllmServer) -> None:
        server.stop()

    def close(self) -> None:
        """Stop every server started so far (stopping twice is harmless)."""
        for s in self.servers:
            s.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    ss = Servers(tmp_path_factory.mktemp("servers"))
    try:
        yield ss
    finally:
        ss.close()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models: full directories (seed side) and copies without weights (leecher side), with the same
    directory names, as two machines would hold them."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for name, kind, kw in [
        ("tiny-llama", "llama", {}),
        ("tiny-qwen2", "qwen2", {}),
        ("tiny-llama-narrow", "llama", {"hidden": 128}),
    ]:
        full = make_tiny_model(root / "full" / name, kind, **kw)
        out[name] = full
        out[name + ":leech"] = copy_without_weights(full, root / "leech" / name)
    return out


def swarm_opts(port: int | None = None, peers: list[int] | None = None, **kw: Any) -> dict[str, Any]:
    """Loader options for loopback tests: static peers only, short discovery."""
    opts: dict[str, Any] = {"host": "127.0.0.1", "mdns": False, "discovery_timeout_s": 3.0, **kw}
    if port is not None:
        opts["control_port"] = port
    if peers:
        opts["peers"] = [f"127.0.0.1:{p}" for p in peers]
    return opts


def swarm_status(ports: list[int]) -> list[dict[str, Any]]:
    """`swarm status --json` over static peers (the command line a user runs)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli",
            "status",
            "--json",
            "--no-mdns",
            "--peers",
            ",".join(f"127.0.0.1:{p}" for p in ports),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert isinstance(rows, list)
    return rows


__all__ = ["PROMPTS", "Servers", "free_port", "swarm_opts", "swarm_status"]
