"""vLLM's compile cache through the swarm, with real CPU vLLM servers that compile (no --enforce-eager):
A compiles and publishes its cache; B, with an empty cache root of its own, gets A's cache through the
swarm and vLLM loads the compiled artifacts instead of compiling (its own log line says so); C, with
the compile cache off, compiles. All three answer the same greedy tokens. Slow (three compiling
starts): tests/vllm/cache_trio.py holds the sequence (shared with bench/compile_cache.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vllm.cache_trio import run_trio
from tests.vllm.server import VllmServer
from vllm_plugin.tinymodel import make_tiny_model


@pytest.mark.timeout(3000)
def test_second_instance_loads_the_carried_compile_cache(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model" / "tiny-llama", "llama")
    servers: list[VllmServer] = []
    try:
        result = run_trio(model, tmp_path, tmp_path, servers=servers)
    finally:
        for s in servers:
            s.stop()
    assert result["ok"], json.dumps(result, indent=1)
