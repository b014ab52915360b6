"""vllm_plugin.compile_cache without vLLM: a watcher publishes what appears in a cache root once vLLM's
end marker is there (files laid out as vLLM 0.32 writes them), and a fetch on another root installs
exactly that: this rank's files and the shared ones, not another rank's, not what was there before.
Real nodes on loopback (static peers, mDNS off)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarm import dircache
from swarm.node import NodeConfig
from tests.loopback import free_port, wait_until
from vllm_plugin import compile_cache as cc

H = "torch_aot_compile/ad396fc9"


def _config(port: int, peers: list[int] | None = None, token: str | None = "t" * 32) -> NodeConfig:
    return NodeConfig(
        host="127.0.0.1",
        mdns=False,
        control_port=port,
        peers=",".join(f"127.0.0.1:{p}" for p in peers) if peers else None,
        token=token,
        discovery_timeout_s=3.0,
    )


def _write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def test_the_end_marker_of_either_backend_marks_a_complete_cache() -> None:
    assert cc.complete([f"{H}/inductor_cache/a.so", f"{H}/rank_0_0/model"], "rank_0_0")
    assert cc.complete(["0123456789/rank_0_0/backbone/vllm_compile_cache.py"], "rank_0_0")
    assert not cc.complete([f"{H}/inductor_cache/a.so", f"{H}/rank_1_0/model"], "rank_0_0")
    assert not cc.complete([f"{H}/inductor_cache/model"], "rank_0_0")


def test_cache_root_follows_vllm(tmp_path: Path) -> None:
    assert cc.cache_root({"VLLM_CACHE_ROOT": str(tmp_path)}) == tmp_path / "torch_compile_cache"
    assert cc.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "vllm" / "torch_compile_cache"


@pytest.mark.timeout(120)
def test_published_when_complete_and_installed_elsewhere(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "older/rank_0_0/model", b"from an earlier run")
    pa, pb = free_port(), free_port()
    watcher = cc.CacheWatcher(a, cc.snapshot(a), "rank_0_0", "compile-cache/t1", _config(pa), max_bytes=10**7)
    watcher.start()
    try:
        _write(a, f"{H}/inductor_cache/k1/kernel.so", b"\x7fELF" * 1000)
        _write(a, f"{H}/rank_1_0/model", b"another rank's")
        time.sleep(cc.QUIET_S + 1)
        assert watcher.seed is None  # no end marker yet: still compiling
        _write(a, f"{H}/rank_0_0/model", b"aot artifact")
        wait_until(lambda: watcher.seed is not None, 30, "the cache to be published", step=0.2)
        fetch = cc.CacheFetch(b, "compile-cache/t1", _config(pb, [pa]), max_bytes=10**7, timeout_s=5.0)
        seed = fetch.start().join()
        assert seed is not None, fetch.error
        seed.close()
    finally:
        watcher.close()
    got = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert got == [f"{H}/inductor_cache/k1/kernel.so", f"{H}/rank_0_0/model"]
    assert (b / H / "rank_0_0" / "model").read_bytes() == b"aot artifact"


@pytest.mark.timeout(60)
def test_nothing_published_means_one_line_and_no_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fetch = cc.CacheFetch(
        tmp_path / "b",
        "compile-cache/none",
        _config(free_port(), [free_port()]),
        max_bytes=10**7,
        timeout_s=1.0,
    )
    with caplog.at_level("INFO", logger="vllm.swarm"):
        assert fetch.start().join() is None
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.swarm"]
    assert len(lines) == 1 and "not carried: none published" in lines[0] and "vLLM compiles" in lines[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.timeout(60)
def test_an_open_swarm_neither_fetches_nor_publishes_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compile cache is code vLLM runs: without a token nobody could be sure who published it."""
    a, b = tmp_path / "a", tmp_path / "b"
    pa = free_port()
    watcher = cc.CacheWatcher(
        a, set(), "rank_0_0", "compile-cache/open", _config(pa, token=None), max_bytes=10**7
    )
    _write(a, f"{H}/rank_0_0/model", b"aot artifact")
    watcher.start()
    try:
        time.sleep(cc.QUIET_S + 2 * cc.POLL_S)
        assert watcher.seed is None
        # and an authenticated publisher's cache is not fetched by a member without the token either
        seed = dircache.publish("compile-cache/open", "", dircache.pack(a, max_bytes=10**7), _config(pa))
        try:
            fetch = cc.CacheFetch(
                b,
                "compile-cache/open",
                _config(free_port(), [pa], token=None),
                max_bytes=10**7,
                timeout_s=2.0,
            )
            with caplog.at_level("INFO", logger="vllm.swarm"):
                assert fetch.start().join() is None
            assert all(n.status()["bytes_out"] == 0 for n in seed.nodes)
        finally:
            seed.close()
    finally:
        watcher.close()
    assert any("the swarm is open (no token)" in r.getMessage() for r in caplog.records)
    assert not b.exists()


def test_nothing_to_carry_when_vllm_does_not_compile() -> None:
    from types import SimpleNamespace as NS

    compiling = NS(compilation_config=NS(mode=3, cache_dir=""), model_config=NS(enforce_eager=False))
    assert cc.compiles(compiling) is None
    assert "does not compile" in str(cc.compiles(NS(compilation_config=NS(mode=0, cache_dir=""))))
    eager = NS(compilation_config=NS(mode=3, cache_dir=""), model_config=NS(enforce_eager=True))
    assert "does not compile" in str(cc.compiles(eager))
    assert "cache_dir is set" in str(cc.compiles(NS(compilation_config=NS(mode=3, cache_dir="/x"))))
