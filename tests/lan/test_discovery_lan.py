"""Discovery on a real (namespaced) LAN: real python-zeroconf, real multicast over a bridge, no static list.

Three hosts each run tests/lan/disco_agent.py (an Advertiser and a Browser of one swarm key) in their
own network namespace; the test checks what each host's browser sees.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netns  # tests/lan is on sys.path (see conftest.py)
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

AGENT = str(REPO_ROOT / "tests" / "lan" / "disco_agent.py")
TIMEOUT = 15.0  # generous bound for CI; the steps take well under a second each here


def start_agent(host: netns.Host, key: str, **opts: str) -> netns.HostProcess:
    argv = [AGENT, "--id", f"node-{host.name}", "--key", key, "--port", str(7000 + host.index)]
    for name, value in opts.items():
        argv += [f"--{name}", value]
    return host.python(*argv, pythonpath=[REPO_ROOT])


def others(msg: dict[str, Any], me: str) -> dict[str, dict[str, Any]]:
    return {p["instance_id"]: p for p in msg["peers"] if p["instance_id"] != me}


def expect_view(
    proc: netns.HostProcess, me: str, check: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    msg = proc.expect_json(lambda m: m.get("event") == "peers" and check(others(m, me)), TIMEOUT)
    return others(msg, me)


def test_three_hosts_see_each_other_update_and_withdraw(lan3: netns.Lan) -> None:
    key = secrets.token_hex(8)
    hosts = lan3.hosts
    agents = [start_agent(h, key) for h in hosts]
    ids = [f"node-{h.name}" for h in hosts]
    for agent, host in zip(agents, hosts, strict=True):
        started = agent.expect_json(lambda m: m.get("event") == "started", TIMEOUT)
        # inside its namespace the only usable interface is eth0: exactly its LAN address
        assert started["advert"]["addresses"] == [host.ip]

    # everyone sees the two others, at the right address and port, with the TXT fields
    for agent, me in zip(agents, ids, strict=True):
        view = expect_view(agent, me, lambda v, me=me: set(v) == set(ids) - {me})
        for other in hosts:
            oid = f"node-{other.name}"
            if oid == me:
                continue
            assert view[oid]["host"] == other.ip
            assert view[oid]["addresses"] == [other.ip]
            assert view[oid]["control_port"] == 7000 + other.index
            assert view[oid]["key_digest"] == key
            assert view[oid]["role"] == "leecher"
            assert view[oid]["model"] == "test/model"
            assert view[oid]["rank"] == "tp0/1,pp0/1"

    # h0 becomes a seed: the others see the new role
    agents[0].send("role seed")
    agents[0].expect_json(lambda m: m.get("event") == "updated", TIMEOUT)
    for agent, me in zip(agents[1:], ids[1:], strict=True):
        expect_view(agent, me, lambda v: v.get(ids[0], {}).get("role") == "seed")

    # h2 exits cleanly: the others see it withdrawn (goodbye packets, not TTL expiry)
    agents[2].send("quit")
    agents[2].expect_json(lambda m: m.get("event") == "closed", TIMEOUT)
    assert agents[2].wait(TIMEOUT) == 0
    for agent, me in zip(agents[:2], ids[:2], strict=True):
        view = expect_view(agent, me, lambda v: ids[2] not in v)
        assert set(view) == set(ids[:2]) - {me}

    for agent in agents[:2]:
        agent.send("quit")
        assert agent.wait(TIMEOUT) == 0


def test_different_swarm_keys_do_not_see_each_other(lan3: netns.Lan) -> None:
    key_a, key_b = secrets.token_hex(8), secrets.token_hex(8)
    h0, h1, h2 = lan3.hosts
    a0, a1, b2 = start_agent(h0, key_a), start_agent(h1, key_a), start_agent(h2, key_b)
    expect_view(a0, "node-h0", lambda v: set(v) == {"node-h1"})
    expect_view(a1, "node-h1", lambda v: set(v) == {"node-h0"})
    b2.expect_json(lambda m: m.get("event") == "started", TIMEOUT)
    for agent in (a0, a1, b2):
        agent.send("quit")
        assert agent.wait(TIMEOUT) == 0
    # the agents printed every change of their view: the foreign key never appeared in one
    for agent, foreign in ((a0, "node-h2"), (a1, "node-h2"), (b2, "node-h0")):
        assert not any(foreign in line for line in agent.lines if '"peers"' in line)


def test_interface_by_name_and_by_address(lan3: netns.Lan) -> None:
    key = secrets.token_hex(8)
    h0, h1, _ = lan3.hosts
    a0 = start_agent(h0, key, interface="eth0")
    a1 = start_agent(h1, key, interface=h1.ip)
    view = expect_view(a0, "node-h0", lambda v: "node-h1" in v)
    assert view["node-h1"]["host"] == h1.ip
    view = expect_view(a1, "node-h1", lambda v: "node-h0" in v)
    assert view["node-h0"]["host"] == h0.ip


def test_shaped_link_limits_rate(make_lan: Callable[..., netns.Lan]) -> None:
    rate = 40.0
    lan = make_lan(2, rate_mbit=rate)
    h0, h1 = lan.hosts
    # ~0.5 s of traffic at the shaped rate; loose bounds, this is no benchmark
    measured = h0.throughput_mbit(h1, nbytes=int(rate * 1e6 / 8 * 0.5))
    assert 0.3 * rate < measured < 1.3 * rate, f"{measured:.1f} Mbit/s on a {rate} Mbit/s link"
    h0.clear_link()
    h1.clear_link()
    unshaped = h0.throughput_mbit(h1, nbytes=20_000_000)
    assert unshaped > 2 * rate, f"unshaped link only {unshaped:.1f} Mbit/s"


def test_link_down_and_up(lan3: netns.Lan) -> None:
    h0, h1, _ = lan3.hosts
    h0.link_down()
    with pytest.raises(netns.HostProcessError):
        h0.throughput_mbit(h1, nbytes=1000, timeout=2)
    h0.link_up()
    assert h0.throughput_mbit(h1, nbytes=100_000) > 0


def test_teardown_removes_namespaces_and_processes(make_lan: Callable[..., netns.Lan]) -> None:
    lan = make_lan(2)
    proc = lan.hosts[0].popen(["sleep", "60"])
    names = [lan.bridge_netns, *(h.netns for h in lan.hosts)]
    listed = netns._list_netns()
    assert all(n in listed for n in names)
    lan.close()
    assert proc.returncode is not None
    listed = netns._list_netns()
    assert not any(n in listed for n in names)
