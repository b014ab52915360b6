"""The GPU bench's command line parses on a machine without a GPU (CI), so a broken option is found
here rather than on a lent GPU machine (it once referenced an option that was never declared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_options_parse_and_unknown_cases_are_named() -> None:
    r = subprocess.run(
        [sys.executable, "bench/gpu.py", "--cases", "bogus", "--swarm-piece-mib", "64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "unknown cases ['bogus']" in r.stderr and "Traceback" not in r.stderr
