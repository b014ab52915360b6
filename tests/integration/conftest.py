"""Helpers for tests that run swarm members as separate processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SWARM = [sys.executable, "-m", "swarm.cli"]


class Procs:
    """Starts swarm CLI processes and kills every one of them at the end of the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, name: str) -> subprocess.Popen[str]:
        log = open(self.tmp / f"{name}.log", "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SWARM_TOKEN", None)
        p = subprocess.Popen([*SWARM, *args], stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        p.log_path = self.tmp / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def log(self, p: subprocess.Popen[str]) -> str:
        return Path(p.log_path).read_text()  # type: ignore[attr-defined]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.close()


def status(peers: str, timeout: float = 20.0) -> list[dict[str, object]]:
    out = subprocess.run(
        [*SWARM, "status", "--json", "--no-mdns", "--peers", peers],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return json.loads(out.stdout) if out.returncode == 0 else []
