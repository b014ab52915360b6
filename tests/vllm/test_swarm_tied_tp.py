"""Real vLLM instances (CPU): a model with tied input/output embeddings (Qwen2 style), and tensor
parallel size 2 (each rank its own swarm). Two servers at a time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vllm.conftest import PROMPTS, Servers, swarm_opts, swarm_status
from tests.vllm.server import free_port

pytestmark = pytest.mark.vllm

#: vLLM 0.32's CPU build kills its worker (SIGILL) on this tiny Qwen2 for some inputs: in bf16 always, in
#: float32 for a 4-token prompt ("red green blue sky"), with the default loader as with this one. These
#: two prompts run.
QWEN_PROMPTS = PROMPTS[:2]


def test_tied_embeddings_qwen2(servers: Servers, models: dict[str, Path]) -> None:
    pa, pb = free_port(), free_port()
    # float32: vLLM's CPU build picks bf16 for float32 checkpoints, and dies with SIGILL on a bf16 Qwen2
    f32 = {"extra_args": ["--dtype", "float32"]}
    a = servers.start(
        "Q1", models["tiny-qwen2"], swarm=swarm_opts(pa, piece_size="64KiB"), **f32
    ).wait_ready()
    reference = [a.complete(p) for p in QWEN_PROMPTS]
    b = servers.start("Q2", models["tiny-qwen2:leech"], swarm=swarm_opts(pb, [pa], piece_size="64KiB"), **f32)
    b.wait_ready()
    try:
        assert [b.complete(p) for p in QWEN_PROMPTS] == reference
        log = b.log()
        # the output head is the embedding: served once, under the embedding's name
        assert "swarm: tied tensors (served once): lm_head.weight -> model.embed_tokens.weight" in log
        assert re.search(r"swarm: loaded [\d.]+ MB from 1 peer\(s\) .* 0 bytes from disk", log), log[-3000:]
        (row,) = swarm_status([pb])
        assert row["role"] == "seed" and sum(row["from"].values()) == row["bytes"]
    finally:
        servers.close()


def test_tensor_parallel_2(servers: Servers, models: dict[str, Path]) -> None:
    """TP=2 on CPU needs one core per rank (VLLM_CPU_OMP_THREADS_BIND). Each rank is its own swarm (the
    key holds the rank); a node's control port is the option's port plus its rank."""
    pa, pb = free_port(), free_port()
    while pa + 1 == pb or pb + 1 == pa:
        pb = free_port()
    tp = {"extra_args": ["--tensor-parallel-size", "2"], "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}
    a = servers.start("T1", models["tiny-llama"], swarm=swarm_opts(pa, piece_size="64KiB"), **tp).wait_ready()
    reference = [a.complete(p) for p in PROMPTS]
    b = servers.start(
        "T2", models["tiny-llama:leech"], swarm=swarm_opts(pb, [pa, pa + 1], piece_size="64KiB"), **tp
    )
    b.wait_ready()
    try:
        assert [b.complete(p) for p in PROMPTS] == reference
        log = b.log()
        assert len(re.findall(r"swarm: loaded [\d.]+ MB from 1 peer\(s\) .* 0 bytes from disk", log)) == 2
        rows = swarm_status([pa, pa + 1, pb, pb + 1])
        assert sorted((r["rank"], r["role"]) for r in rows) == [
            ("tp0/2,pp0/1", "seed"),
            ("tp0/2,pp0/1", "seed"),
            ("tp1/2,pp0/1", "seed"),
            ("tp1/2,pp0/1", "seed"),
        ]
        for r in rows:
            if r["port"] in (pb, pb + 1):
                assert sum(r["from"].values()) == r["bytes"], r
    finally:
        servers.close()
