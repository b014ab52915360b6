"""A directory carried through a real swarm on loopback (swarm.dircache): real nodes, sockets, tokens.

The publisher and the fetcher run in this process, each with its own nodes, talking over TCP on
127.0.0.1 through static peers (mDNS off, so no other swarm on the machine interferes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarm.dircache import DirCacheError, fetch, install, pack, publish, unpack
from swarm.errors import ManifestMismatchError, NoSeedError, StallError
from swarm.node import NodeConfig
from tests.loopback import free_port


def _config(port: int, peers: list[int] | None = None, **kw: object) -> NodeConfig:
    return NodeConfig(
        host="127.0.0.1",
        mdns=False,
        control_port=port,
        peers=",".join(f"127.0.0.1:{p}" for p in peers) if peers else None,
        token="t" * 32,
        discovery_timeout_s=3.0,
        **kw,  # type: ignore[arg-type]
    )


def _tree(root: Path) -> None:
    (root / "h1" / "rank_0_0" / "inductor_cache").mkdir(parents=True)
    (root / "h1" / "rank_0_0" / "model").write_bytes(os.urandom(300_000))
    (root / "h1" / "rank_0_0" / "inductor_cache" / "k.py").write_text("print('kernel')\n")


@pytest.mark.timeout(60)
def test_a_directory_travels_and_installs(tmp_path: Path) -> None:
    src, dest = tmp_path / "a", tmp_path / "b" / "cache"
    _tree(src)
    blob = pack(src, max_bytes=10**6)
    pa, pb = free_port(), free_port()
    seed = publish("compile-cache/k1", "x", blob, _config(pa))
    try:
        got, fetched = fetch("compile-cache/k1", "x", _config(pb, [pa]), max_bytes=10**6, timeout_s=5.0)
        try:
            assert got == blob
            assert install(unpack(got), dest) == (2, 0)
            for rel in ("h1/rank_0_0/model", "h1/rank_0_0/inductor_cache/k.py"):
                assert (dest / rel).read_bytes() == (src / rel).read_bytes()
            # and the fetcher now serves it onward: a third member gets it from the second alone
            pc = free_port()
            again, third = fetch("compile-cache/k1", "x", _config(pc, [pb]), max_bytes=10**6, timeout_s=5.0)
            third.close()
            assert again == blob
        finally:
            fetched.close()
    finally:
        seed.close()


@pytest.mark.timeout(60)
def test_a_directory_above_the_limit_is_refused_before_its_archive_is_fetched(tmp_path: Path) -> None:
    _tree(tmp_path)
    blob = pack(tmp_path, max_bytes=10**6)
    pa, pb = free_port(), free_port()
    seed = publish("compile-cache/k2", "", blob, _config(pa))
    try:
        with pytest.raises(DirCacheError, match="more than the limit of 1000"):
            fetch("compile-cache/k2", "", _config(pb, [pa]), max_bytes=1000, timeout_s=5.0)
        archive_node = seed.nodes[1]
        assert archive_node.status()["bytes_out"] == 0
    finally:
        seed.close()


@pytest.mark.timeout(60)
def test_another_key_or_token_finds_nothing(tmp_path: Path) -> None:
    _tree(tmp_path)
    blob = pack(tmp_path, max_bytes=10**6)
    pa = free_port()
    seed = publish("compile-cache/k3", "", blob, _config(pa))
    try:
        # a member that holds another key is found and refused, never used
        with pytest.raises(ManifestMismatchError, match="other swarm key"):
            fetch("compile-cache/other", "", _config(free_port(), [pa]), max_bytes=10**6, timeout_s=1.0)
        with pytest.raises(ManifestMismatchError, match="other swarm key"):
            fetch("compile-cache/k3", "y", _config(free_port(), [pa]), max_bytes=10**6, timeout_s=1.0)
        stranger = NodeConfig(
            host="127.0.0.1",
            mdns=False,
            control_port=free_port(),
            peers=f"127.0.0.1:{pa}",
            token="u" * 32,
            discovery_timeout_s=1.0,
        )
        # another token: no session, so nothing comes from the publisher
        with pytest.raises((NoSeedError, StallError, ManifestMismatchError)):
            fetch("compile-cache/k3", "", stranger, max_bytes=10**6, timeout_s=1.0)
        assert all(n.status()["bytes_out"] == 0 for n in seed.nodes)
    finally:
        seed.close()
