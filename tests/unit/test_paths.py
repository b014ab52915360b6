"""swarm.transport.paths: the data path of a pair, for every combination of host, GPU and NCCL."""

from __future__ import annotations

import itertools

import pytest

from swarm.transport.paths import Offer, choose_path, host_identity

HOST_A, HOST_B = "boot-a/node1", "boot-b/node2"


def member(host: str, gpu: str, *, nccl: bool, peers: tuple[str, ...] = ()) -> Offer:
    transports = {"tcp"}
    if gpu:
        transports.add("ipc")
    if gpu and nccl:
        transports.add("nccl")
    return Offer(host=host, gpu=gpu, peer_gpus=frozenset(peers), transports=frozenset(transports))


# Same host or not x each side's memory (host, GPU 0, GPU 1 reachable by peer access, GPU 2 not) x
# NCCL on each side: every combination, with the path the issue asks for.
GPUS = ("", "GPU-0", "GPU-1", "GPU-2")
PEER_ACCESS = {"GPU-0": ("GPU-1",), "GPU-1": ("GPU-0",), "GPU-2": ()}


def expected(same_host: bool, ga: str, gb: str, na: bool, nb: bool) -> str:
    if not (ga and gb):
        return "tcp"  # host memory on either side
    if same_host and (ga == gb or gb in PEER_ACCESS[ga]):
        return "ipc"  # one host, the same GPU or peer GPUs
    if na and nb and not (same_host and ga == gb):
        return "nccl"  # GPUs that IPC cannot join (other hosts, or GPUs without peer access)
    return "tcp"


CASES = [
    (same_host, ga, gb, na, nb)
    for same_host, ga, gb, na, nb in itertools.product(
        (True, False), GPUS, GPUS, (True, False), (True, False)
    )
    if same_host or (ga != gb or not ga)  # a GPU UUID names one GPU of one host
]


@pytest.mark.parametrize(("same_host", "ga", "gb", "na", "nb"), CASES)
def test_every_combination(same_host: bool, ga: str, gb: str, na: bool, nb: bool) -> None:
    a = member(HOST_A, ga, nccl=na, peers=PEER_ACCESS.get(ga, ()))
    b = member(HOST_A if same_host else HOST_B, gb, nccl=nb, peers=PEER_ACCESS.get(gb, ()))
    want = expected(same_host, ga, gb, na, nb)
    assert choose_path(a, b) == want
    assert choose_path(b, a) == want  # both ends agree without a message


def test_the_table_covers_every_path() -> None:
    seen = {expected(*c) for c in CASES}
    assert seen == {"ipc", "nccl", "tcp"}
    assert len(CASES) > 100


def test_peer_access_must_hold_both_ways() -> None:
    a = Offer(HOST_A, "GPU-0", frozenset({"GPU-1"}), frozenset({"ipc", "tcp"}))
    b = Offer(HOST_A, "GPU-1", frozenset(), frozenset({"ipc", "tcp"}))
    assert choose_path(a, b) == choose_path(b, a) == "tcp"


def test_unknown_host_never_shares_one() -> None:
    a = Offer("", "GPU-0", frozenset(), frozenset({"ipc", "tcp"}))
    b = Offer("", "GPU-0", frozenset(), frozenset({"ipc", "tcp"}))
    assert choose_path(a, b) == "tcp"


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ({"tcp"}, {"tcp"}, "tcp"),
        ({"ipc"}, {"ipc"}, "ipc"),
        ({"nccl"}, {"nccl"}, None),  # NCCL cannot join two ranks of one GPU
        ({"ipc"}, {"tcp"}, None),
        ({"nccl"}, {"tcp", "ipc"}, None),
        ({"tcp", "ipc", "nccl"}, {"tcp"}, "tcp"),
    ],
)
def test_single_transport_offers_on_one_gpu(a: set[str], b: set[str], want: str | None) -> None:
    oa = Offer(HOST_A, "GPU-0", frozenset(), frozenset(a))
    ob = Offer(HOST_A, "GPU-0", frozenset(), frozenset(b))
    assert choose_path(oa, ob) == choose_path(ob, oa) == want


def test_wire_round_trip() -> None:
    o = Offer(HOST_A, "GPU-0", frozenset({"GPU-1"}), frozenset({"ipc", "tcp", "nccl"}))
    assert Offer.from_wire(o.to_wire()) == o


@pytest.mark.parametrize(
    "data",
    [
        None,
        "ipc",
        {"host": 5, "gpu": ["x"], "peer_gpus": "GPU-1", "transports": {"ipc": 1}},
        {"transports": ["carrier-pigeon", 7, None]},
        {"peer_gpus": ["G"] * 10_000, "host": "h" * 100_000},
    ],
)
def test_hostile_offers_are_bounded_and_safe(data: object) -> None:
    o = Offer.from_wire(data, fallback="tcp")
    assert o.transports <= {"tcp", "ipc", "nccl"}
    assert len(o.host) <= 128 and len(o.peer_gpus) <= 64
    mine = Offer(HOST_A, "GPU-0", frozenset(), frozenset({"tcp", "ipc", "nccl"}))
    assert choose_path(mine, o) in (None, "tcp")


def test_an_older_member_without_an_offer_uses_its_named_transport() -> None:
    assert Offer.from_wire(None, fallback="tcp").transports == {"tcp"}
    assert Offer.from_wire(None, fallback="nccl").transports == {"nccl"}
    assert Offer.from_wire(None, fallback="zmq").transports == frozenset()


def test_host_identity_is_stable_and_names_the_host() -> None:
    assert host_identity() == host_identity()
    assert "/" in host_identity()


def test_a_forced_transport_is_used_with_every_peer_that_runs_it() -> None:
    from swarm.transport.nccl import NcclTransport
    from swarm.transport.tcp import TcpTransport

    t = TcpTransport()
    assert t.choose("p", Offer(HOST_A, "", frozenset(), frozenset({"tcp", "ipc"}))) == "tcp"
    assert t.choose("p", Offer(HOST_B, "GPU-1", frozenset(), frozenset({"nccl"}))) is None
    # Two members forced to NCCL on one GPU (tests/gpu/test_node_loopback.py runs such a pair through
    # a loopback stand-in for libnccl): the forced transport is used, not second-guessed.
    assert NcclTransport().choose("p", Offer(HOST_A, "GPU-0", frozenset(), frozenset({"nccl"}))) == "nccl"
