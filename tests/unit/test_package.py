"""The package installs as one distribution with its console script and vLLM entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path


def test_packages_import() -> None:
    subprocess.run([sys.executable, "-c", "import swarm, vllm_plugin, sim"], check=True, timeout=60)


def test_console_script_help() -> None:
    swarm = Path(sys.executable).parent / "swarm"
    out = subprocess.run([str(swarm), "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "vllm-swarm" in out.stdout


def test_vllm_plugin_entry_point_is_registered() -> None:
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value == "vllm_plugin:register"]
    assert eps, "entry point vllm.general_plugins -> vllm_plugin:register missing"
    eps[0].load()()


def test_swarm_never_imports_vllm_or_sim() -> None:
    banned = re.compile(r"^\s*(from|import)\s+(vllm|vllm_plugin|sim)\b", re.M)
    for path in Path(__file__).resolve().parents[2].joinpath("swarm").rglob("*.py"):
        match = banned.search(path.read_text())
        assert match is None, f"{path}: {match.group(0) if match else ''}"
