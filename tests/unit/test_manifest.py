"""Manifest: piece cutting, byte views, checksums, diffs and swarm keys."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import ManifestError, ManifestMismatchError
from swarm.manifest import (
    CHECKSUMS,
    Manifest,
    SwarmKey,
    TensorSpec,
    checksum,
    content_digest,
    cut_pieces,
    piece_checksums,
)

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int8,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.bool,
]


def make(sizes: list[int], dtype: torch.dtype = torch.uint8, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, n in enumerate(sizes):
        out[f"t{i}"] = (
            torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype)
            if n
            else torch.empty(0, dtype=dtype)
        )
    return out


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), max_size=30),
    piece_size=st.integers(1, 4096),
)
def test_pieces_cover_every_byte_exactly_once(sizes: list[int], piece_size: int) -> None:
    pieces = cut_pieces(sizes, piece_size)
    seen = [bytearray(n) for n in sizes]
    for i, piece in enumerate(pieces):
        assert piece.index == i
        assert 0 < piece.length <= piece_size
        assert piece.length == sum(s.length for s in piece.spans)
        for span in piece.spans:
            assert span.length > 0
            for b in range(span.start, span.start + span.length):
                seen[span.tensor][b] += 1
    assert all(all(c == 1 for c in counts) for counts in seen)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), max_size=30), piece_size=st.integers(1, 4096))
def test_small_tensors_are_never_split_and_large_ones_are_zero_copy(
    sizes: list[int], piece_size: int
) -> None:
    pieces = cut_pieces(sizes, piece_size)
    owners: dict[int, list[int]] = {}
    for piece in pieces:
        for span in piece.spans:
            owners.setdefault(span.tensor, []).append(piece.index)
            if sizes[span.tensor] > piece_size and span.start + span.length < sizes[span.tensor]:
                assert piece.zero_copy  # full pieces of a split tensor carry nothing else
    for t, where in owners.items():
        if sizes[t] <= piece_size:
            assert len(where) == 1


def test_small_tensors_are_packed() -> None:
    pieces = cut_pieces([10, 10, 10, 100, 5], 32)
    assert [[(s.tensor, s.start, s.length) for s in p.spans] for p in pieces] == [
        [(0, 0, 10), (1, 0, 10), (2, 0, 10)],
        [(3, 0, 32)],
        [(3, 32, 32)],
        [(3, 64, 32)],
        [(3, 96, 4), (4, 0, 5)],
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_any_dtype_round_trips_through_pieces(dtype: torch.dtype) -> None:
    src = OrderedDict(
        (
            f"w{i}",
            torch.randn(n, 3).to(dtype) if dtype.is_floating_point else torch.randint(0, 2, (n, 3)).to(dtype),
        )
        for i, n in enumerate([0, 5, 40, 300, 1])
    )
    m = Manifest.from_tensors(src, piece_size=256)
    dst = OrderedDict((k, torch.zeros_like(v)) for k, v in src.items())
    sv, dv = m.byte_views(src), m.byte_views(dst)
    for p in m.pieces:
        for a, b in zip(m.piece_views(sv, p.index), m.piece_views(dv, p.index), strict=True):
            b.copy_(a)
    for k in src:
        assert src[k].shape == dst[k].shape
        assert torch.equal(src[k].reshape(-1).view(torch.uint8), dst[k].reshape(-1).view(torch.uint8))
    assert piece_checksums(m, src) == piece_checksums(m, dst)


def test_non_contiguous_is_refused() -> None:
    t = torch.zeros(4, 6).t()
    with pytest.raises(ManifestError, match="not contiguous"):
        Manifest.from_tensors({"w": t})


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_checksum_detects_any_single_byte_change_and_swaps(algorithm: str) -> None:
    data = torch.randint(0, 256, (4096 + 3,), dtype=torch.uint8)
    base = checksum([data], algorithm)
    for pos in [0, 1, 2, 3, 100, 4095, 4096, 4098]:
        changed = data.clone()
        changed[pos] ^= 0x10
        assert checksum([changed], algorithm) != base, pos
    swapped = data.clone()
    swapped[0:4], swapped[4:8] = data[4:8].clone(), data[0:4].clone()
    if not torch.equal(data[0:4], data[4:8]):
        assert checksum([swapped], algorithm) != base


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=5),
    algorithm=st.sampled_from(CHECKSUMS),
)
def test_checksum_depends_on_bytes_not_on_how_they_are_split(
    data: bytes, cuts: list[int], algorithm: str
) -> None:
    whole = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    )
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    parts = [whole[a:b] for a, b in itertools.pairwise(bounds)]
    assert checksum(parts, algorithm) == checksum([whole], algorithm)


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_checksum_same_on_unaligned_views(algorithm: str) -> None:
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    assert checksum([data[1:]], algorithm) == checksum([data[1:].clone()], algorithm)


def test_checksum_algorithms_differ_and_are_part_of_the_manifest() -> None:
    src = make([100, 5000])
    a, b = Manifest.from_tensors(src, 1024), Manifest.from_tensors(src, 1024, checksum="wsum32")
    assert a.checksum == "blake3"  # CPU tensors
    assert a != b and "checksum blake3 here, wsum32 there" in (a.diff(b) or "")
    assert piece_checksums(a, src) != piece_checksums(b, src)
    with pytest.raises(ManifestError, match="unknown checksum"):
        Manifest(list(a.tensors), 1024, checksum="md5")


@pytest.mark.parametrize("algorithm", CHECKSUMS)
def test_piece_checksums_catch_corruption_in_the_right_piece(algorithm: str) -> None:
    src = make([100, 5000, 17, 4], seed=1)
    m = Manifest.from_tensors(src, piece_size=1024, checksum=algorithm)
    good = piece_checksums(m, src)
    src["t1"][3000] ^= 1
    bad = piece_checksums(m, src)
    differing = [i for i, (a, b) in enumerate(zip(good, bad, strict=True)) if a != b]
    assert len(differing) == 1
    assert any(s.tensor == 1 and s.start <= 3000 < s.start + s.length for s in m.pieces[differing[0]].spans)
    assert content_digest(good) != content_digest(bad)


def test_diff_names_first_differing_tensor() -> None:
    a = Manifest([TensorSpec("a", "bfloat16", (4, 4), 32), TensorSpec("b", "bfloat16", (8,), 16)], 64)
    b = Manifest([TensorSpec("a", "bfloat16", (4, 4), 32), TensorSpec("b", "float16", (8,), 16)], 64)
    assert a.diff(a) is None and a == Manifest(list(a.tensors), 64)
    assert a.diff(b) == "tensor #1: expected b bfloat16[8], peer has b float16[8]"
    c = Manifest(list(a.tensors)[:1], 64)
    assert "first extra: b bfloat16[8] (only expected here)" in (a.diff(c) or "")
    assert "piece size" in (a.diff(Manifest(list(a.tensors), 32)) or "")
    with pytest.raises(ManifestMismatchError, match="tensor #1"):
        a.require_same(b)
    assert a.digest != b.digest


def test_diff_wire_matches_diff_without_cutting_the_other() -> None:
    a = Manifest([TensorSpec("a", "bfloat16", (4, 4), 32), TensorSpec("b", "bfloat16", (8,), 16)], 64)
    others = [
        a,
        Manifest([TensorSpec("a", "bfloat16", (4, 4), 32), TensorSpec("b", "float16", (8,), 16)], 64),
        Manifest(list(a.tensors)[:1], 64),
        Manifest([*a.tensors, TensorSpec("c", "uint8", (3,), 3)], 64),
        Manifest(list(a.tensors), 32),
    ]
    for other in others:
        assert a.diff_wire(other.to_wire()) == a.diff(other)
    # Only this manifest's length + 1 rows are read: what follows is never looked at, however long.
    wire = a.to_wire()
    wire["tensors"] = [*wire["tensors"], ["c", "uint8", [1 << 20], 1 << 20], *(["garbage"] * 1000)]
    assert "2 tensors expected, peer has 1003; first extra: c uint8" in (a.diff_wire(wire) or "")
    with pytest.raises(ManifestError, match="malformed tensor entry"):
        a.diff_wire({**a.to_wire(), "tensors": ["garbage"]})
    with pytest.raises(ManifestError, match="piece size"):
        a.diff_wire({**a.to_wire(), "piece_size": 0})


def test_byte_views_check_tensors_against_manifest() -> None:
    src = make([10, 20])
    m = Manifest.from_tensors(src, 16)
    with pytest.raises(ManifestError, match="missing"):
        m.byte_views({"t0": src["t0"]})
    with pytest.raises(ManifestMismatchError, match="t1"):
        m.byte_views({"t0": src["t0"], "t1": torch.zeros(21, dtype=torch.uint8)})


def test_manifest_wire_round_trip_and_validation() -> None:
    m = Manifest.from_tensors(make([10, 2000, 0]), 512)
    assert Manifest.from_wire(m.to_wire()) == m
    for bad in [{}, {"piece_size": 0, "tensors": []}, {"piece_size": 8, "tensors": [["x", "f", [-1], 4]]}]:
        with pytest.raises(ManifestError):
            Manifest.from_wire(bad)


def test_swarm_key_equality_and_digest() -> None:
    k = SwarmKey("llama@abc", "bfloat16", "", "vllm-0.32.0", tp_size=2, tp_rank=1)
    assert k == SwarmKey.from_wire(k.to_wire()) and k.digest == SwarmKey.from_wire(k.to_wire()).digest
    assert len(k.digest) == 16
    for change in [
        {"model_id": "llama@abd"},
        {"dtype": "float16"},
        {"quantization": "fp8"},
        {"engine": "vllm-0.33.0"},
        {"tp_rank": 0},
        {"pp_size": 2},
    ]:
        other = SwarmKey(**{**k.to_wire(), **change})
        assert other != k and other.digest != k.digest, change
    with pytest.raises(ManifestError):
        SwarmKey("m", "bf16", tp_size=2, tp_rank=2)
    with pytest.raises(ManifestError):
        SwarmKey.from_wire({**k.to_wire(), "tp_size": "2"})
    with pytest.raises(ManifestError):
        SwarmKey.from_wire({"bogus": 1})
