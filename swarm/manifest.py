"""What one rank holds, cut into pieces: tensor specs, piece layout, checksums, and the swarm key.

A *manifest* lists the tensors of one rank in a fixed order (name, dtype, shape, bytes) and cuts the
concatenation of their bytes into *pieces*. Every byte of every tensor is in exactly one piece.

Cutting rules (so that most pieces move zero-copy, straight between parameter memories):

- a tensor no larger than the piece size is never split: consecutive small tensors are packed into one
  piece while they fit, so a piece of packed tensors needs a staging buffer on the wire;
- a tensor larger than the piece size is split into full pieces, each one contiguous byte range of that
  tensor (zero-copy); its tail starts a new piece that later small tensors may join;
- every piece is at most `piece_size` bytes; empty tensors take no bytes and no piece.

Default piece size: 64 MiB. On NVLink (366 GB/s a pair, DESIGN.md) a 64 MiB piece takes ~0.18 ms, about
ten times NCCL's per-operation overhead and the control plane's per-piece cost (a few hundred
microseconds of Python per piece is hidden behind pipelined requests); a 16 GB model is ~250 pieces, so
the pipelining term of the cooperative lower bound (k + log2(N+1) - 1) / k stays under 1.01 for small
swarms. Over TCP at ~1 GB/s a piece is ~64 ms, small enough for fair sharing between peers. Models of a
few MB (tests, demos) should pass a smaller `piece_size`.

Checksums (the algorithm is part of the manifest, so nodes that would compute different values for the
same bytes see different manifests and say so, instead of calling each other's bytes wrong):

- ``wsum32`` (tensors on a GPU): two 64-bit sums over the piece's bytes read as little-endian int32 words
  `x_j` (zero-padded to a whole word): `s1 = sum(x_j)` and `s2 = sum(x_j * w_j)`, with `w_j` a fixed
  pseudo-random odd weight of the word's position (a 32-bit integer hash, identical on every device).
  Integer addition is exact and associative, so the value does not depend on the device or the
  reduction order. It runs with torch on the tensor's own device and only the 16-byte result crosses to
  the host. It detects any single changed word, swapped words and random corruption (a 2^-64-ish chance
  to miss). Cost on a GPU: a few memory passes over the piece (figure in docs/benchmarks.md).
- ``blake3`` (tensors in host memory): BLAKE3 truncated to 128 bits, fed the spans' memory without a
  copy. On the 2-core CPUs here it hashes ~2 GB/s where torch's integer reductions that `wsum32` needs
  reach 0.2-0.3 GB/s: on the CPU the weighted sum would be slower than a 1 GB/s link.

Neither is a defence against a malicious peer: that comes from the authenticated control plane
(cluster token). The checksum guards against corruption and bugs.

Swarm key: what must match for two ranks' pieces to be interchangeable (model identity, dtype,
quantization, engine version, parallel layout and rank). Two keys are equal only when every field is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from swarm.errors import ManifestError, ManifestMismatchError

DEFAULT_PIECE_SIZE = 64 * 1024 * 1024
#: The smallest piece `fitted_piece_size` goes down to.
MIN_FITTED_PIECE = 64 << 10


def fitted_piece_size(total_bytes: int, largest: int) -> int:
    """`largest`, halved while `total_bytes` would make fewer than ~16 pieces (so that even a small
    object spreads over several peers), down to MIN_FITTED_PIECE. A function of the size alone, so every
    member of a swarm computes the same value."""
    size = largest
    while size > MIN_FITTED_PIECE and total_bytes < 16 * size:
        size //= 2
    return size


#: Manifests larger than this are refused on the wire; 1M pieces of 64 MiB is 64 TiB per rank.
MAX_PIECES = 1 << 20
MAX_TENSORS = 1 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class Span:
    """A byte range [start, start + length) of tensor number `tensor`."""

    tensor: int
    start: int
    length: int


@dataclass(frozen=True)
class Piece:
    index: int
    spans: tuple[Span, ...]
    length: int

    @property
    def zero_copy(self) -> bool:
        """True when the piece is one contiguous byte range of one tensor (no staging needed)."""
        return len(self.spans) == 1


def cut_pieces(sizes: Sequence[int], piece_size: int) -> tuple[Piece, ...]:
    """Cut tensors of the given byte sizes into pieces by the rules in the module docstring."""
    if piece_size <= 0:
        raise ManifestError(f"piece size must be positive, got {piece_size}")
    pieces: list[Piece] = []
    spans: list[Span] = []
    used = 0

    def close() -> None:
        nonlocal spans, used
        if spans:
            pieces.append(Piece(len(pieces), tuple(spans), used))
        spans, used = [], 0

    for t, size in enumerate(sizes):
        if size == 0:
            continue
        if size <= piece_size:
            if used + size > piece_size:
                close()
            spans.append(Span(t, 0, size))
            used += size
            continue
        close()
        start = 0
        while size - start > piece_size:
            pieces.append(Piece(len(pieces), (Span(t, start, piece_size),), piece_size))
            start += piece_size
        spans.append(Span(t, start, size - start))
        used = size - start
    close()
    return tuple(pieces)


class Manifest:
    """The ordered tensors of one rank and their pieces. Immutable; equal when the digests are."""

    def __init__(
        self, tensors: Sequence[TensorSpec], piece_size: int = DEFAULT_PIECE_SIZE, checksum: str = "blake3"
    ) -> None:
        if checksum not in CHECKSUMS:
            raise ManifestError(
                f"unknown checksum algorithm {checksum!r}", hint=f"one of {', '.join(CHECKSUMS)}"
            )
        self.checksum = checksum
        if len(tensors) > MAX_TENSORS:
            raise ManifestError(f"{len(tensors)} tensors is more than the supported {MAX_TENSORS}")
        names = set()
        for spec in tensors:
            if spec.name in names:
                raise ManifestError(f"tensor name {spec.name!r} appears twice")
            names.add(spec.name)
        self.tensors: tuple[TensorSpec, ...] = tuple(tensors)
        self.piece_size = piece_size
        self.pieces = cut_pieces([t.nbytes for t in self.tensors], piece_size)
        if len(self.pieces) > MAX_PIECES:
            raise ManifestError(
                f"{len(self.pieces)} pieces is more than the supported {MAX_PIECES}",
                hint="use a larger piece size",
            )
        self.total_bytes = sum(t.nbytes for t in self.tensors)
        self._wire = self.to_wire()
        self.digest = hashlib.sha256(_canonical(self._wire)).hexdigest()

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        piece_size: int = DEFAULT_PIECE_SIZE,
        checksum: str | None = None,
    ) -> Manifest:
        """Describe an ordered mapping of tensors. Non-contiguous tensors are refused, not copied.
        The checksum algorithm defaults to the one suited to the tensors' device."""
        specs = []
        device = torch.device("cpu")
        for name, t in tensors.items():
            _require_contiguous(name, t)
            specs.append(TensorSpec(name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size()))
            device = t.device
        return cls(specs, piece_size, checksum or default_checksum(device))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return (
            f"Manifest({len(self.tensors)} tensors, {self.total_bytes} bytes, "
            f"{len(self.pieces)} pieces of <= {self.piece_size} bytes, digest {self.digest[:12]})"
        )

    # --- comparison -------------------------------------------------------------------------------

    def diff(self, other: Manifest) -> str | None:
        """None when equal, else a readable description of the first difference."""
        return self._diff(other.piece_size, other.checksum, other.tensors)

    def diff_wire(self, data: Mapping[str, Any]) -> str | None:
        """`diff` against a manifest in wire form, without cutting it into pieces and reading no more of
        its tensor list than this manifest's length + 1: the work is bounded by this manifest, whatever
        the other claims. Malformed data raises ManifestError."""
        if data == self._wire:
            return None
        rows, piece_size, algorithm = _wire_header(data)
        n = min(len(rows), len(self.tensors) + 1)
        return self._diff(piece_size, algorithm, [_spec_from_row(r) for r in rows[:n]], len(rows)) or (
            "another manifest with the same tensors"
        )

    def _diff(
        self, piece_size: int, checksum: str, tensors: Sequence[TensorSpec], count: int | None = None
    ) -> str | None:
        """The first difference; `tensors` may be the first of `count` tensors (all when None)."""
        count = len(tensors) if count is None else count
        if self.piece_size != piece_size:
            return f"piece size {self.piece_size} here, {piece_size} there"
        if self.checksum != checksum:
            return f"checksum {self.checksum} here, {checksum} there (tensors on another kind of device?)"
        for i, (a, b) in enumerate(zip(self.tensors, tensors, strict=False)):
            if a != b:
                return f"tensor #{i}: expected {a.describe()}, peer has {b.describe()}"
        if len(self.tensors) != count:
            n = min(len(self.tensors), count)
            extra = (self.tensors if len(self.tensors) > n else tensors)[n]
            where = "only expected here" if len(self.tensors) > n else "only on the peer"
            return (
                f"{len(self.tensors)} tensors expected, peer has {count}; "
                f"first extra: {extra.describe()} ({where})"
            )
        return None

    def require_same(self, other: Manifest, peer: str = "peer") -> None:
        difference = self.diff(other)
        if difference is not None:
            raise ManifestMismatchError(
                f"{peer} holds a different manifest",
                difference=difference,
                hint="the peer runs another model, dtype, quantization or parallel layout",
            )

    # --- wire form --------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "piece_size": self.piece_size,
            "checksum": self.checksum,
            "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes] for t in self.tensors],
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of `to_wire`; validates types and sizes (the caller bounded the message size)."""
        specs, piece_size, algorithm = _specs_from_wire(data)
        return cls(specs, piece_size, algorithm)

    # --- tensor memory ----------------------------------------------------------------------------

    def byte_views(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Flat uint8 views (no copies) of `tensors`, in manifest order, checked against the specs."""
        views = []
        for spec in self.tensors:
            t = tensors.get(spec.name)
            if t is None:
                raise ManifestError(f"tensor {spec.name!r} of the manifest is missing")
            _require_contiguous(spec.name, t)
            actual = TensorSpec(spec.name, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size())
            if actual != spec:
                raise ManifestMismatchError(
                    "tensor does not match the manifest",
                    difference=f"expected {spec.describe()}, got {actual.describe()}",
                )
            views.append(as_bytes(t))
        return views

    def piece_views(self, views: Sequence[torch.Tensor], index: int) -> list[torch.Tensor]:
        """The uint8 views (no copies) that make up piece `index`, in order."""
        return [views[s.tensor][s.start : s.start + s.length] for s in self.pieces[index].spans]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor of any dtype (fp8 and bf16 included), without copying."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return flat.view(torch.uint8)


def _require_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ManifestError(
            f"tensor {name!r} is not contiguous (shape {list(t.shape)}, stride {list(t.stride())})",
            hint="pass a contiguous tensor; vllm-swarm never copies parameters silently",
        )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --- checksums ------------------------------------------------------------------------------------

CHECKSUMS = ("blake3", "wsum32")


def default_checksum(device: torch.device) -> str:
    return "wsum32" if device.type == "cuda" else "blake3"


_weights: dict[torch.device, torch.Tensor] = {}


def _position_weights(words: int, device: torch.device) -> torch.Tensor:
    """Odd int32 weights of word positions 0..words-1 (a 32-bit integer hash), cached per device."""
    cached = _weights.get(device)
    if cached is not None and cached.numel() >= words:
        return cached[:words]
    n = max(words, 1 << 16, 2 * (cached.numel() if cached is not None else 0))
    mask = 0xFFFFFFFF
    h = ((torch.arange(n, dtype=torch.int64, device=device) + 1) * 0x9E3779B1) & mask
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    w = ((h & 0x7FFFFFFF) | 1).to(torch.int32)
    _weights[device] = w
    return w[:words]


def _words(b: torch.Tensor) -> torch.Tensor | None:
    """An int32 view of a uint8 tensor when its length and address allow one, else None."""
    if b.numel() % 4 or b.data_ptr() % 4:
        return None
    return b.view(torch.int32)


def checksum_async(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """The checksum of the concatenated byte views as an int64 tensor [s1, s2] on their device.

    Does not synchronise; `checksum` turns it into the 32-character hex form used on the wire.
    """
    if not views:
        return torch.zeros(2, dtype=torch.int64)
    device = views[0].device
    parts = [_words(v) for v in views]
    if any(p is None for p in parts):
        # An odd-sized or unaligned span (rare: packed fp8/int8 tensors of odd length): pad one copy
        # on the device. Still no copy to the host.
        total = sum(v.numel() for v in views)
        buf = torch.zeros((total + 3) // 4 * 4, dtype=torch.uint8, device=device)
        torch.cat(list(views), out=buf[:total])
        parts = [buf.view(torch.int32)]
    out = torch.zeros(2, dtype=torch.int64, device=device)
    offset = 0
    for words in parts:
        assert words is not None
        n = words.numel()
        if n == 0:
            continue
        w = _position_weights(offset + n, device)[offset:]
        out[0] += words.sum(dtype=torch.int64)
        out[1] += torch.mul(words, w).sum(dtype=torch.int64)
        offset += n
    return out


def _blake3(views: Sequence[torch.Tensor]) -> str:
    import blake3

    h = blake3.blake3()
    for v in views:
        if v.numel():
            h.update((v if v.device.type == "cpu" else v.cpu()).numpy().data)
    return str(h.hexdigest(length=16))


def checksum(views: Sequence[torch.Tensor], algorithm: str = "blake3") -> str:
    """Checksum of the concatenated uint8 views, as 32 hex characters."""
    if algorithm == "blake3":
        return _blake3(views)
    s1, s2 = (int(v) & 0xFFFFFFFFFFFFFFFF for v in checksum_async(views).tolist())
    return f"{s1:016x}{s2:016x}"


def piece_checksums(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Checksums of every piece of `tensors` (one pass over the memory, on its device)."""
    views = manifest.byte_views(tensors)
    if manifest.checksum == "blake3":
        return [_blake3(manifest.piece_views(views, p.index)) for p in manifest.pieces]
    sums = [checksum_async(manifest.piece_views(views, p.index)) for p in manifest.pieces]
    if not sums:
        return []
    table = torch.stack(sums).cpu().tolist()
    return [f"{a & 0xFFFFFFFFFFFFFFFF:016x}{b & 0xFFFFFFFFFFFFFFFF:016x}" for a, b in table]


def _specs_from_wire(data: Mapping[str, Any]) -> tuple[list[TensorSpec], int, str]:
    """The tensors, piece size and checksum algorithm of a manifest in wire form, validated (the caller
    bounded the message size)."""
    rows, piece_size, algorithm = _wire_header(data)
    return [_spec_from_row(row) for row in rows], piece_size, algorithm


def _wire_header(data: Mapping[str, Any]) -> tuple[list[Any], int, str]:
    try:
        piece_size = data["piece_size"]
        rows = data["tensors"]
        algorithm = data["checksum"]
    except (KeyError, TypeError) as e:
        raise ManifestError(f"malformed manifest: {e}") from e
    if algorithm not in CHECKSUMS:
        raise ManifestError(f"unknown checksum algorithm {algorithm!r:.40}")
    if not isinstance(piece_size, int) or not 0 < piece_size <= 1 << 40:
        raise ManifestError(f"bad piece size {piece_size!r}")
    if not isinstance(rows, list) or len(rows) > MAX_TENSORS:
        raise ManifestError("tensor list missing or too long")
    return rows, piece_size, algorithm


def _spec_from_row(row: Any) -> TensorSpec:
    try:
        name, dtype, shape, nbytes = row
    except (TypeError, ValueError) as e:
        raise ManifestError(f"malformed tensor entry {row!r:.200}") from e
    ok = (
        isinstance(name, str)
        and isinstance(dtype, str)
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(nbytes, int)
        and 0 <= nbytes <= 1 << 48
    )
    if not ok:
        raise ManifestError(f"malformed tensor entry {row!r:.200}")
    return TensorSpec(name, dtype, tuple(shape), nbytes)


def content_digest(checksums: Sequence[str]) -> str:
    """One digest of all piece checksums: two seeds with equal content digests hold equal bytes."""
    return hashlib.sha256("".join(checksums).encode()).hexdigest()


# --- swarm key ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwarmKey:
    """What must match for pieces to be interchangeable. `model_id` is the model's identity: a name
    and revision, or a digest of its config and checkpoint headers; `extra` holds anything else an
    engine knows to matter (for example a digest of the post-processing configuration)."""

    model_id: str
    dtype: str
    quantization: str = ""
    engine: str = ""
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    extra: str = ""

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ManifestError(
                f"rank tp{self.tp_rank}/{self.tp_size} pp{self.pp_rank}/{self.pp_size} is outside its layout"
            )

    @property
    def digest(self) -> str:
        """16 hex characters; fits an mDNS TXT record."""
        return hashlib.sha256(_canonical(asdict(self))).hexdigest()[:16]

    @property
    def rank(self) -> str:
        return f"tp{self.tp_rank}/{self.tp_size},pp{self.pp_rank}/{self.pp_size}"

    def describe(self) -> str:
        q = f", {self.quantization}" if self.quantization else ""
        eng = f", {self.engine}" if self.engine else ""
        return f"{self.model_id} [{self.dtype}{q}{eng}, {self.rank}]"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SwarmKey:
        try:
            key = cls(**dict(data))
        except TypeError as e:
            raise ManifestError(f"malformed swarm key: {e}") from e
        for name, value in asdict(key).items():
            expected = int if name.endswith(("_size", "_rank")) else str
            if not isinstance(value, expected) or (isinstance(value, str) and len(value) > 512):
                raise ManifestError(f"malformed swarm key field {name}={value!r:.100}")
        return key
