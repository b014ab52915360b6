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


def _bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/gpu.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_swarm_cases_over_a_transport_that_is_not_one_are_refused() -> None:
    r = _bench("--cases", "swarm", "--swarm-transports", "nccl,tcp")
    assert r.returncode == 2 and "--swarm-transports" in r.stderr and "Traceback" not in r.stderr


def test_multi_gpu_swarm_cases_refuse_a_machine_with_fewer_than_two_gpus() -> None:
    """The swarm cases (NCCL and CUDA IPC between GPUs) need two GPUs; with fewer they say so instead of
    running no leecher at all (this machine has none; --gpus 1 stands for a one-GPU machine)."""
    for gpus in ("0", "1"):
        r = _bench("--cases", "swarm,swarm_staggered", "--swarm-transports", "ipc", "--gpus", gpus)
        assert r.returncode != 0, r.stdout
        assert "need at least 2" in r.stderr and "swarm, swarm_staggered" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
