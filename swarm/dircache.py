"""Carry a directory through the swarm: pack it, serve it, fetch it, verify it, install it.

The vLLM loader carries vLLM's compile cache with this (vllm_plugin.compile_cache); nothing here knows
vLLM. A directory travels as two swarm objects, each served by a `swarm.node.Node` holding one uint8
tensor, so the pieces are found, scheduled, authenticated and checked exactly like weight pieces:

- the *index*, key `NAME#index`: a fixed INDEX_BYTES of JSON (archive size, its SHA-256, its piece
  size). A node must know its manifest before it fetches, and a leecher does not know what a directory
  holds: the fixed-size index tells it, so the index is fetched first;
- the *archive*, key `NAME#<sha256 prefix>`: an 8-byte header length, a JSON header `[[path, size,
  executable], ...]`, then the files' bytes in that order. Fetched with a manifest built from the index;
  its size is refused above the caller's `max_bytes` before a byte of it is requested, and the whole
  archive is checked against the index's SHA-256 before anything is written.

Everything in an archive is hostile until checked (`unpack`): at most MAX_FILES entries; every path
relative, in `/`-separated components that are neither empty, `.`, `..`, nor contain NUL or `\\`; no
duplicate; sizes that add up to the body exactly. `install` writes the files into a fresh directory
next to the destination, then moves in, by `rename`, each top-level entry the destination lacks
(recursing into directories both have): an existing file or directory is never overwritten, and a
reader of the destination sees an entry either whole or not at all.

Ports: the index node of a member listens at the member's control port + INDEX_PORT_SHIFT, the archive
node at + ARCHIVE_PORT_SHIFT (through NodeConfig.port_offset, so rank r adds r as for weights; ranks
below 256 only). Static peers `host:port` and `dns:NAME:PORT` are shifted the same way, so a peer list
written for the weights finds the caches too; mDNS finds them by key, `dns:NAME` uses the shifted default
port by itself. `dns-srv:` entries name weight ports and find nothing here.

Limits: two members that publish different contents under one NAME offer two indexes for one manifest;
a leecher verifies each piece against the checksums it adopted, so it never installs a mixture, but it
may need a second try (or give up after the stall timeout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from swarm.errors import FetchError, SwarmError
from swarm.manifest import Manifest, SwarmKey, fitted_piece_size

if TYPE_CHECKING:
    from swarm.node import Node, NodeConfig


FORMAT = "dircache-1"
INDEX_BYTES = 4096
MAX_FILES = 100_000
MAX_PATH = 4096
MAX_DEPTH = 64
#: port offsets of the index and archive nodes over a member's own (its rank is added on top)
INDEX_PORT_SHIFT = 512
ARCHIVE_PORT_SHIFT = 768
MAX_RANKS = 256
_LEN = struct.Struct("<Q")


class DirCacheError(SwarmError):
    """A directory archive that is malformed, too large, or would write outside its destination."""


@dataclass(frozen=True)
class Entry:
    path: str
    data: bytes
    executable: bool = False


# --- archive ------------------------------------------------------------------------------------------


def list_files(root: Path) -> list[str]:
    """The regular files under `root` (relative, `/`-separated, sorted); symlinks and others skipped."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            full = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(full).st_mode):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def pack(root: Path, files: list[str] | None = None, *, max_bytes: int) -> bytes:
    """The archive of `files` (default: every regular file) under `root`; DirCacheError when it would
    be larger than `max_bytes`."""
    files = list_files(root) if files is None else sorted(files)
    header: list[list[Any]] = []
    body: list[bytes] = []
    total = 0
    for rel in files:
        _check_path(rel)
        full = root / rel
        data = full.read_bytes()
        total += len(data)
        if total > max_bytes:
            raise DirCacheError(f"{root} holds more than {max_bytes} bytes; not carried")
        header.append([rel, len(data), bool(full.stat().st_mode & stat.S_IXUSR)])
        body.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_LEN.pack(len(head)), head, *body])


def unpack(blob: bytes, *, max_files: int = MAX_FILES) -> list[Entry]:
    """The entries of an archive, every name and size checked (see the module docstring)."""
    if len(blob) < _LEN.size:
        raise DirCacheError("archive shorter than its header length")
    (head_len,) = _LEN.unpack_from(blob)
    if head_len > len(blob) - _LEN.size:
        raise DirCacheError(f"archive header length {head_len} exceeds the archive")
    try:
        header = json.loads(blob[_LEN.size : _LEN.size + head_len])
    except (ValueError, UnicodeDecodeError) as e:
        raise DirCacheError(f"archive header is not JSON: {e}") from None
    if not isinstance(header, list) or len(header) > max_files:
        raise DirCacheError(f"archive header is not a list of at most {max_files} entries")
    offset = _LEN.size + head_len
    seen: set[str] = set()
    out: list[Entry] = []
    for row in header:
        if (
            not isinstance(row, list)
            or len(row) != 3
            or not isinstance(row[0], str)
            or isinstance(row[1], bool)
            or not isinstance(row[1], int)
            or not isinstance(row[2], bool)
            or row[1] < 0
        ):
            raise DirCacheError(f"malformed archive entry {row!r:.100}")
        path, size, executable = row
        _check_path(path)
        if path in seen:
            raise DirCacheError(f"archive names {path!r} twice")
        seen.add(path)
        if offset + size > len(blob):
            raise DirCacheError(f"archive entry {path!r} runs past the archive's end")
        out.append(Entry(path, blob[offset : offset + size], executable))
        offset += size
    if offset != len(blob):
        raise DirCacheError(f"archive has {len(blob) - offset} bytes that no entry names")
    # a file may not also be a directory of another entry (a/b and a/b/c)
    dirs = {p.rsplit("/", 1)[0] for p in seen if "/" in p}
    dirs |= {d.rsplit("/", i)[0] for d in list(dirs) for i in range(1, d.count("/") + 1)}
    clash = seen & dirs
    if clash:
        raise DirCacheError(f"archive names {sorted(clash)[0]!r} as a file and as a directory")
    return out


def _check_path(path: str) -> None:
    parts = path.split("/")
    if (
        not path
        or len(path) > MAX_PATH
        or len(parts) > MAX_DEPTH
        or "\x00" in path
        or "\\" in path
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise DirCacheError(f"refused archive path {path!r:.200}: not a plain relative path")


def install(entries: list[Entry], dest: Path) -> tuple[int, int]:
    """Write `entries` under `dest` (created if missing) without overwriting anything there: built in a
    fresh directory beside `dest`, then each entry `dest` lacks is renamed into place. Returns (entries
    installed, entries skipped because `dest` already had them)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.swarm-", dir=dest.parent))
    try:
        for e in entries:
            target = tmp.joinpath(*e.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as f:
                f.write(e.data)
            if e.executable:
                target.chmod(0o755)
        if not dest.exists():
            os.rename(tmp, dest)
            return len(entries), 0
        moved = _merge(tmp, dest)
        return moved, len(entries) - moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge(src: Path, dest: Path) -> int:
    """Rename what `dest` lacks from `src` into it; count the files that moved."""
    moved = 0
    for child in sorted(src.iterdir()):
        there = dest / child.name
        if there.is_symlink() or (there.exists() and not (there.is_dir() and child.is_dir())):
            continue
        if there.is_dir():
            moved += _merge(child, there)
            continue
        count = sum(1 for p in child.rglob("*") if p.is_file()) if child.is_dir() else 1
        try:
            os.rename(child, there)
        except OSError:  # appeared meanwhile (another rank of this host): theirs stays
            continue
        moved += count
    return moved


# --- through the swarm --------------------------------------------------------------------------------


def _key(name: str, part: str, extra: str) -> SwarmKey:
    return SwarmKey(model_id=f"{name}#{part}", dtype="uint8", engine=FORMAT, extra=extra)


def shifted_peers(peers: str | None, shift: int) -> str | None:
    """A peer list with every `host:port` and `dns:NAME:PORT` moved by `shift` ports."""
    if not peers:
        return peers
    out = []
    for raw in peers.split(","):
        entry = raw.strip()
        head, sep, port = entry.rpartition(":")
        if entry.startswith("dns-srv:") or not sep or not port.isdigit() or head in ("dns", ""):
            out.append(entry)  # dns:NAME (shifted default port, by port_offset) or dns-srv: (unmapped)
            continue
        moved = int(port) + shift
        if moved > 65535:
            continue
        out.append(f"{head}:{moved}")
    return ",".join(e for e in out if e) or None


def node_config(
    config: NodeConfig, shift: int, *, name: str, piece_size: int, timeout_s: float
) -> NodeConfig:
    """The config of a directory node derived from a member's own: shifted ports and peers, one piece
    size, `timeout_s` to find a peer, no metrics port of its own."""
    if config.port_offset >= MAX_RANKS:
        raise DirCacheError(
            f"rank {config.port_offset} is beyond the {MAX_RANKS} ranks a directory cache serves"
        )
    return dataclasses.replace(
        config,
        port_offset=config.port_offset + shift,
        peers=shifted_peers(config.peers, shift),
        piece_size=piece_size,
        discovery_timeout_s=timeout_s,
        stall_timeout_s=min(config.stall_timeout_s, max(timeout_s, 10.0)),
        metrics_port=None,
        # a directory is host memory: a forced GPU transport could not carry it, "auto" picks TCP
        transport="auto" if config.transport in ("ipc", "nccl") else config.transport,
        model_name=name,
        seed=None,
        scheduler=None,
    )


def archive_piece_size(size: int) -> int:
    """1 MiB pieces, smaller for a small archive (at least 64 KiB): about 16 or more pieces to spread."""
    return fitted_piece_size(size, 1 << 20)


def _index(size: int, sha256: str) -> bytes:
    text = json.dumps(
        {"format": FORMAT, "size": size, "sha256": sha256, "piece_size": archive_piece_size(size)}
    ).encode()
    return text.ljust(INDEX_BYTES, b" ")


def _read_index(raw: bytes, max_bytes: int) -> tuple[int, str, int]:
    try:
        data = json.loads(raw.decode().strip())
        size, sha, piece = int(data["size"]), str(data["sha256"]), int(data["piece_size"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DirCacheError(f"malformed directory index: {e}") from None
    if data.get("format") != FORMAT or len(sha) != 64 or piece != archive_piece_size(size):
        raise DirCacheError("malformed directory index")
    if not 0 < size <= max_bytes:
        raise DirCacheError(f"the published directory is {size} bytes, more than the limit of {max_bytes}")
    return size, sha, piece


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DirSeed:
    """The two nodes that serve one directory's index and archive; `close()` ends both."""

    def __init__(self, nodes: list[Node], size: int, sha256: str) -> None:
        self.nodes = nodes
        self.size = size
        self.sha256 = sha256

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def status(self) -> list[dict[str, Any]]:
        return [n.status() for n in self.nodes]


def publish(name: str, extra: str, blob: bytes, config: NodeConfig) -> DirSeed:
    """Serve `blob` (an archive from `pack`) under `name` until the returned seed is closed."""
    from swarm.node import Node

    sha = hashlib.sha256(blob).hexdigest()
    index = _index(len(blob), sha)
    nodes: list[Node] = []
    try:
        for part, shift, data, piece in (
            ("index", INDEX_PORT_SHIFT, index, INDEX_BYTES),
            (sha[:16], ARCHIVE_PORT_SHIFT, blob, archive_piece_size(len(blob))),
        ):
            cfg = node_config(
                config, shift, name=name, piece_size=piece, timeout_s=config.discovery_timeout_s
            )
            nodes.append(Node(_key(name, part, extra), {"data": _tensor(data)}, cfg, complete=True).start())
    except BaseException:
        for n in nodes:
            n.close()
        raise
    return DirSeed(nodes, len(blob), sha)


def fetch(
    name: str, extra: str, config: NodeConfig, *, max_bytes: int, timeout_s: float
) -> tuple[bytes, DirSeed]:
    """Fetch the archive published under `name`: the index (looking for a seed for `timeout_s`), then
    the archive it names, checked against the index's SHA-256. Returns the archive and the two nodes,
    now seeds of it (the caller closes them, or keeps them serving). Raises a SwarmError (NoSeedError
    when nobody publishes `name`)."""
    from swarm.node import Node

    nodes: list[Node] = []
    try:
        cfg = node_config(config, INDEX_PORT_SHIFT, name=name, piece_size=INDEX_BYTES, timeout_s=timeout_s)
        index = torch.zeros(INDEX_BYTES, dtype=torch.uint8)
        nodes.append(Node(_key(name, "index", extra), {"data": index}, cfg, complete=False).start())
        nodes[0].fetch()
        size, sha, piece = _read_index(index.numpy().tobytes(), max_bytes)
        cfg = node_config(config, ARCHIVE_PORT_SHIFT, name=name, piece_size=piece, timeout_s=timeout_s)
        archive = torch.zeros(size, dtype=torch.uint8)
        manifest = Manifest.from_tensors({"data": archive}, piece)
        nodes.append(
            Node(
                _key(name, sha[:16], extra), {"data": archive}, cfg, complete=False, manifest=manifest
            ).start()
        )
        nodes[1].fetch()
        blob = archive.numpy().tobytes()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise FetchError(f"the archive of {name} does not match its index's SHA-256")
    except BaseException:
        for n in nodes:
            n.close()
        raise
    return blob, DirSeed(nodes, size, sha)
