"""Pure parts of swarm.discovery: static peer lists, advert validation and TXT encoding, address ranking."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarm.discovery import (
    MAX_MODEL_BYTES,
    MAX_TXT_BYTES,
    Advert,
    AdvertError,
    StaticPeersError,
    format_peer,
    pick_host,
    rank_addresses,
    static_peers,
)

# ------------------------------------------------------------------------------------------ static


def test_static_peers_examples() -> None:
    assert static_peers("") == []
    assert static_peers("10.0.0.1:5555") == [("10.0.0.1", 5555)]
    assert static_peers(" a.example:1 , [fd00::1]:2,,b-2.example.:65535, ") == [
        ("a.example", 1),
        ("fd00::1", 2),
        ("b-2.example.", 65535),
    ]
    assert static_peers("h:1,h:1,h:2") == [("h", 1), ("h", 2)]  # duplicates dropped
    assert static_peers("[fe80::1%eth0]:7") == [("fe80::1%eth0", 7)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("10.0.0.1", "entry 1 '10.0.0.1': missing ':port'"),
        ("ok:1,10.0.0.1:", "entry 2 '10.0.0.1:': missing port"),
        ("h:0", "port '0' is not a number in 1..65535"),
        ("h:65536", "port '65536'"),
        ("h:+5", "port '+5'"),
        ("h:٣", "port '٣'"),
        ("fd00::1:5555", "IPv6 addresses must be written in brackets"),
        ("[fd00::1]", "missing port"),
        ("[fd00::1]5555", "bad bracketed IPv6 address"),
        ("[nonsense]:1", "'nonsense' is not a valid IPv6 address"),
        ("[10.0.0.1]:1", "is not a valid IPv6 address"),
        ("999.0.0.1:1", "not a valid IPv4 address"),
        (":80", "empty host"),
        ("bad_host!:80", "not a valid host name"),
        ("-lead.example:80", "not a valid host name"),
    ],
)
def test_static_peers_errors_name_the_entry(spec: str, message: str) -> None:
    with pytest.raises(StaticPeersError, match="static peer list") as info:
        static_peers(spec)
    assert message in str(info.value)
    assert "expected host:port or [ipv6]:port" in str(info.value)


def test_static_peers_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_PEERS", raising=False)
    assert static_peers() == []
    monkeypatch.setenv("SWARM_PEERS", "10.1.1.1:9,[::1]:10")
    assert static_peers() == [("10.1.1.1", 9), ("::1", 10)]
    monkeypatch.setenv("SWARM_PEERS", "10.1.1.1:9,oops")
    with pytest.raises(StaticPeersError, match=r"SWARM_PEERS: entry 2 'oops'"):
        static_peers()


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda s: not s.replace(".", "").isdigit()
)
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(_label, min_size=1, max_size=4).map(".".join),
)
_ports = st.integers(1, 65535)


@given(st.lists(st.tuples(_hosts, _ports), max_size=8))
def test_static_peers_round_trip(peers: list[tuple[str, int]]) -> None:
    spec = ",".join(format_peer(h, p) for h, p in peers)
    expected = list(dict.fromkeys(peers))
    assert static_peers(spec) == expected


@given(st.text(max_size=60))
def test_static_peers_fails_only_with_its_error(spec: str) -> None:
    try:
        parsed = static_peers(spec)
    except StaticPeersError:
        return
    for host, port in parsed:
        assert 1 <= port <= 65535
        assert host and "," not in host
        if ":" in host:
            ipaddress.IPv6Address(host)


# ------------------------------------------------------------------------------------------ advert


def advert(**kw: object) -> Advert:
    fields: dict[str, object] = {
        "instance_id": "0123456789ab",
        "key_digest": "0123456789abcdef",
        "model": "m",
        "rank": "tp0/1,pp0/1",
        "role": "seed",
        "control_port": 5000,
    }
    fields.update(kw)
    return Advert(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("instance_id", "", "empty"),
        ("instance_id", "has space", "instance_id"),
        ("instance_id", "-lead", "instance_id"),
        ("instance_id", "x" * 49, "instance_id"),
        ("key_digest", "ABCDEF0123456789", "key_digest"),
        ("key_digest", "0123", "key_digest"),
        ("role", "boss", "role"),
        ("rank", "tp 0", "rank"),
        ("rank", "r" * 33, "rank"),
        ("control_port", 0, "control_port"),
        ("control_port", 70000, "control_port"),
        ("version", 0, "version"),
    ],
)
def test_advert_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(AdvertError, match=message):
        advert(**{field: value})


def test_model_is_truncated_on_a_character_boundary() -> None:
    long = "é" * 100  # 2 bytes each
    a = advert(model=long)
    assert len(a.model.encode()) <= MAX_MODEL_BYTES
    assert a.model == "é" * (MAX_MODEL_BYTES // 2)


def test_static_advert() -> None:
    a = Advert.static("fd00::1", 7)
    assert a.is_static and a.instance_id == "[fd00::1]:7" and a.endpoint == ("fd00::1", 7)
    assert a.role == "" and a.key_digest == ""


_adverts = st.builds(
    Advert,
    instance_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}", fullmatch=True),
    key_digest=st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
    model=st.text(max_size=120),
    rank=st.from_regex(r"[\x21-\x7e]{0,32}", fullmatch=True),
    role=st.sampled_from(["seed", "leecher"]),
    control_port=_ports,
    version=st.integers(1, 65535),
)


@given(_adverts)
def test_txt_round_trip_and_size(a: Advert) -> None:
    txt = a.txt()
    size = sum(2 + len(k.encode()) + len(v.encode()) for k, v in txt.items())
    assert size <= MAX_TXT_BYTES
    props: dict[str, str | None] = dict(txt)
    back = Advert.from_txt(a.instance_id, props, srv_port=a.control_port)
    assert back == a


@given(
    st.dictionaries(st.sampled_from(["v", "key", "model", "rank", "role", "port", "x"]), st.text(max_size=20))
)
def test_from_txt_rejects_garbage_with_its_error(props: dict[str, str]) -> None:
    try:
        Advert.from_txt("abc", dict(props))
    except AdvertError:
        pass


# --------------------------------------------------------------------------------------- addresses


def test_rank_addresses() -> None:
    nets = [ipaddress.ip_network("10.87.0.0/24"), ipaddress.ip_network("127.0.0.0/8")]
    addrs = ["127.0.0.1", "fe80::1%eth0", "2001:db8::1", "192.168.1.5", "10.87.0.3", "169.254.1.1", "junk"]
    assert rank_addresses(addrs, nets) == [
        "10.87.0.3",
        "192.168.1.5",
        "2001:db8::1",
        "169.254.1.1",
        "fe80::1%eth0",
        "127.0.0.1",
    ]
    # a peer's copy of one of our addresses (every docker0 is 172.17.0.1) comes after the others
    docker = [ipaddress.ip_network("172.17.0.0/16")]
    assert pick_host(["172.17.0.1", "10.1.0.7"], docker, frozenset({"172.17.0.1"})) == "10.1.0.7"
    assert rank_addresses(["127.0.0.1", "10.1.0.7"], nets, frozenset({"10.1.0.7", "127.0.0.1"})) == [
        "10.1.0.7",
        "127.0.0.1",
    ]
    assert pick_host(["127.0.0.1"]) == "127.0.0.1"
    assert pick_host([]) == ""
    assert pick_host(["2001:db8::1", "10.0.0.1"]) == "10.0.0.1"
