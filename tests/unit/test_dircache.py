"""swarm.dircache's archive: what a hostile archive may not do (write outside, overwrite, lie about
sizes), and that a directory survives pack, unpack and install unchanged."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from swarm.dircache import DirCacheError, Entry, install, pack, shifted_peers, unpack


def _archive(header: object, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + body


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/.",
        "",
        "a\\..\\b",
        "nul\x00byte",
        "x/" * 70 + "deep",
        "n" * 5000,
    ],
)
def test_hostile_names_are_refused(name: str, tmp_path: Path) -> None:
    blob = _archive([[name, 3, False]], b"abc")
    with pytest.raises(DirCacheError, match="refused archive path"):
        unpack(blob)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("header", "body", "why"),
    [
        ([["a", 4, False]], b"abc", "runs past"),
        ([["a", 2, False]], b"abc", "no entry names"),
        ([["a", 1, False], ["a", 2, False]], b"abc", "twice"),
        ([["a", 1, False], ["a/b", 2, False]], b"abc", "as a file and as a directory"),
        ([["a", -1, False]], b"", "malformed"),
        ([["a", True, False]], b"a", "malformed"),
        ([["a", 1]], b"a", "malformed"),
        ({"a": 1}, b"", "not a list"),
    ],
)
def test_lying_archives_are_refused(header: object, body: bytes, why: str) -> None:
    with pytest.raises(DirCacheError, match=why):
        unpack(_archive(header, body))


def test_header_length_beyond_the_archive_and_too_many_files() -> None:
    with pytest.raises(DirCacheError, match="exceeds"):
        unpack(struct.pack("<Q", 1 << 40) + b"[]")
    with pytest.raises(DirCacheError, match="shorter"):
        unpack(b"\x01")
    with pytest.raises(DirCacheError, match="at most 2"):
        unpack(_archive([["a", 0, False], ["b", 0, False], ["c", 0, False]]), max_files=2)


def test_pack_unpack_install_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "h1" / "rank_0_0").mkdir(parents=True)
    (src / "h1" / "rank_0_0" / "model").write_bytes(os.urandom(1000))
    (src / "h1" / "run.sh").write_text("#!/bin/sh\n")
    (src / "h1" / "run.sh").chmod(0o755)
    (src / "top").write_bytes(b"")
    (src / "link").symlink_to("/etc/passwd")  # never carried
    blob = pack(src, max_bytes=10_000)
    dest = tmp_path / "dest"
    assert install(unpack(blob), dest) == (3, 0)
    for rel in ("h1/rank_0_0/model", "h1/run.sh", "top"):
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    assert os.access(dest / "h1" / "run.sh", os.X_OK)
    assert not (dest / "link").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_pack_refuses_more_than_the_limit(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(bytes(2000))
    with pytest.raises(DirCacheError, match="more than 1000 bytes"):
        pack(tmp_path, max_bytes=1000)


def test_install_never_overwrites(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "h1" / "rank_0_0").mkdir(parents=True)
    (dest / "h1" / "rank_0_0" / "model").write_bytes(b"mine")
    entries = [
        Entry("h1/rank_0_0/model", b"theirs"),
        Entry("h1/rank_1_0/model", b"rank1"),
        Entry("h2/model", b"new"),
    ]
    assert install(entries, dest) == (2, 1)
    assert (dest / "h1" / "rank_0_0" / "model").read_bytes() == b"mine"
    assert (dest / "h1" / "rank_1_0" / "model").read_bytes() == b"rank1"
    assert (dest / "h2" / "model").read_bytes() == b"new"


def test_install_does_not_follow_a_symlink_in_the_destination(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "h1").symlink_to(outside)
    assert install([Entry("h1/model", b"x")], dest) == (0, 1)
    assert list(outside.iterdir()) == []


def test_shifted_peers() -> None:
    peers = "10.0.0.5:47100,[fe80::1]:47100,dns:svc.ns:47100,dns:svc.ns,dns-srv:_s._tcp.svc,h:65500"
    assert shifted_peers(peers, 512) == (
        "10.0.0.5:47612,[fe80::1]:47612,dns:svc.ns:47612,dns:svc.ns,dns-srv:_s._tcp.svc"
    )
    assert shifted_peers(None, 512) is None
