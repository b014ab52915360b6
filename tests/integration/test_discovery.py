"""Discovery on loopback with real python-zeroconf (multicast on ``lo``), in one process and across two.

Every test uses its own random swarm key (and instance ids), so concurrent runs on one host don't mix.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.discovery import (
    Advert,
    AdvertError,
    Advertiser,
    Browser,
    DiscoveryError,
    InterfaceError,
    NameConflictError,
    discover,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
AGENT = REPO_ROOT / "tests" / "lan" / "disco_agent.py"
IF = "lo"
T = 10.0  # bound on each wait; each step takes well under a second here


def make_advert(key: str, *, role: str = "leecher", port: int = 6000, **kw: Any) -> Advert:
    return Advert(
        instance_id=kw.pop("instance_id", f"t{secrets.token_hex(6)}"),
        key_digest=key,
        model=kw.pop("model", "Qwen/Qwen3-0.6B"),
        rank=kw.pop("rank", "tp0/2,pp0/1"),
        role=role,
        control_port=port,
        **kw,
    )


def ids(peers: list[Advert]) -> set[str]:
    return {p.instance_id for p in peers}


@pytest.fixture
def key() -> str:
    return secrets.token_hex(8)


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"threads left running: {extra}")


def test_advertise_browse_update_withdraw(key: str) -> None:
    with Browser(key_digest=key, interface=IF) as browser:
        advert = make_advert(key)
        with Advertiser(advert, interface=IF, probe=False) as adv:
            assert adv.advert.host == "127.0.0.1"
            peers = browser.wait_for(lambda p: advert.instance_id in ids(p), T)
            (seen,) = [p for p in peers if p.instance_id == advert.instance_id]
            assert seen.host == "127.0.0.1"
            assert "127.0.0.1" in seen.addresses
            assert (seen.key_digest, seen.model, seen.rank, seen.role, seen.control_port, seen.version) == (
                key,
                "Qwen/Qwen3-0.6B",
                "tp0/2,pp0/1",
                "leecher",
                6000,
                1,
            )
            generation = browser.generation
            adv.update(role="seed")
            peers = browser.wait_for(lambda p: any(x.role == "seed" for x in p), T)
            assert [p.role for p in peers] == ["seed"]
            assert browser.generation > generation
        t0 = time.monotonic()
        assert browser.wait_for(lambda p: not p, T) == []
        assert time.monotonic() - t0 < 5  # goodbye packets, not the 60 s TTL


def test_browser_filters_by_key(key: str) -> None:
    other_key = secrets.token_hex(8)
    mine, theirs = make_advert(key), make_advert(other_key)
    with (
        Browser(key_digest=key, interface=IF) as filtered,
        Browser(interface=IF) as everything,
        Advertiser(mine, interface=IF, probe=False),
        Advertiser(theirs, interface=IF, probe=False),
    ):
        both = {mine.instance_id, theirs.instance_id}
        assert both <= ids(everything.wait_for(lambda p: both <= ids(p), T))
        filtered.wait_for(lambda p: mine.instance_id in ids(p), T)
        assert ids(filtered.peers()) == {mine.instance_id}


def test_browser_ignores_its_own_advert(key: str, caplog: pytest.LogCaptureFixture) -> None:
    """A node browses with its own instance id as `ignore`: its advert is never listed nor logged as a
    found peer (issue 14)."""
    own, other = make_advert(key), make_advert(key)
    caplog.set_level("INFO", logger="swarm.discovery")
    with (
        Browser(key_digest=key, interface=IF, ignore=own.instance_id) as browser,
        Advertiser(own, interface=IF, probe=False),
        Advertiser(other, interface=IF, probe=False),
    ):
        browser.wait_for(lambda p: other.instance_id in ids(p), T)
        time.sleep(0.5)  # the own advert was announced before the other's; give it time anyway
        assert ids(browser.peers()) == {other.instance_id}
    assert not [r for r in caplog.records if own.instance_id in r.getMessage() and "found" in r.getMessage()]
    assert [r for r in caplog.records if other.instance_id in r.getMessage() and "found" in r.getMessage()]


def test_name_conflict_is_detected(key: str) -> None:
    advert = make_advert(key)
    with Advertiser(advert, interface=IF, probe=False):
        second = Advertiser(make_advert(key, instance_id=advert.instance_id), interface=IF, probe=True)
        with pytest.raises(NameConflictError, match=advert.instance_id):
            second.start()
        second.close()


def test_unknown_interface_names_the_available_ones(key: str) -> None:
    with pytest.raises(InterfaceError, match=r"no-such-if0.*available: .*lo \(127\.0\.0\.1"):
        Browser(key_digest=key, interface="no-such-if0")
    with pytest.raises(InterfaceError, match=r"192\.0\.2\.254"):
        Advertiser(make_advert(key), interface="192.0.2.254").start()


def test_lifecycle_errors(key: str) -> None:
    adv = Advertiser(make_advert(key), interface=IF, probe=False)
    assert adv.update(role="seed").role == "seed"  # before start: only remembered
    with pytest.raises(AdvertError, match="instance_id"):
        adv.update(instance_id="other")
    with pytest.raises(AdvertError, match="role"):
        adv.update(role="boss")
    adv.start()
    with pytest.raises(DiscoveryError, match="already started"):
        adv.start()
    adv.close()
    adv.close()  # idempotent
    with pytest.raises(DiscoveryError, match="closed"):
        adv.update(role="leecher")
    with pytest.raises(AdvertError):
        Advertiser(Advert.static("10.0.0.1", 5000))


def test_wait_for_honours_its_timeout(key: str) -> None:
    with Browser(key_digest=key, interface=IF) as browser:
        t0 = time.monotonic()
        assert browser.wait_for(lambda p: False, 0.3) == []
        assert 0.25 < time.monotonic() - t0 < 2
        with pytest.raises(ValueError):
            browser.wait_for(lambda p: False, float("inf"))


def test_discover_merges_mdns_and_static(key: str) -> None:
    advert = make_advert(key, role="seed", port=6123)
    with Advertiser(advert, interface=IF, probe=False):
        t0 = time.monotonic()
        found = discover(
            key,
            timeout=T,
            interface=IF,
            static="10.11.12.13:5000, 127.0.0.1:6123",  # the second is the mDNS one: deduplicated
            until=lambda p: advert.instance_id in ids(p),
        )
        assert time.monotonic() - t0 < 5
    assert [a.instance_id for a in found] == [advert.instance_id, "10.11.12.13:5000"]
    assert found[0].role == "seed" and not found[0].is_static
    assert found[1].is_static and found[1].endpoint == ("10.11.12.13", 5000)


def test_discover_static_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARM_PEERS", "a.example:1,[fd00::1]:2")
    found = discover(None, timeout=0, mdns=False)
    assert [a.endpoint for a in found] == [("a.example", 1), ("fd00::1", 2)]
    assert [a.instance_id for a in found] == ["a.example:1", "[fd00::1]:2"]


# ------------------------------------------------------------------------------ across two processes


class Agent:
    """tests/lan/disco_agent.py in a subprocess on loopback."""

    def __init__(self, key: str, *extra: str) -> None:
        self.id = f"a{secrets.token_hex(6)}"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(AGENT), "--id", self.id, "--key", key, "--interface", IF, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.messages: list[dict[str, Any]] = []

    def expect(self, event: str, check: Any = lambda m: True) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # the agent reports every view change; never silent long
            if not line:
                break
            msg = json.loads(line)
            self.messages.append(msg)
            if msg.get("event") == event and check(msg):
                return msg
        raise AssertionError(f"agent: no {event!r} message; got {self.messages[-5:]}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(T)


@pytest.fixture
def agent(key: str) -> Iterator[Agent]:
    a = Agent(key, "--no-probe")
    try:
        yield a
    finally:
        a.stop()


def test_two_processes(key: str, agent: Agent) -> None:
    agent.expect("started")
    mine = make_advert(key)
    with Browser(key_digest=key, interface=IF) as browser:
        with Advertiser(mine, interface=IF, probe=False):
            peers = browser.wait_for(lambda p: agent.id in ids(p), T)
            assert [p.host for p in peers if p.instance_id == agent.id] == ["127.0.0.1"]
            agent.expect("peers", lambda m: mine.instance_id in {p["instance_id"] for p in m["peers"]})
            agent.send("role seed")
            browser.wait_for(lambda p: any(x.instance_id == agent.id and x.role == "seed" for x in p), T)
        # our clean exit is seen by the other process
        agent.expect("peers", lambda m: mine.instance_id not in {p["instance_id"] for p in m["peers"]})
        # and its clean exit by us
        agent.send("quit")
        agent.expect("closed")
        assert agent.proc.wait(T) == 0
        assert agent.id not in ids(browser.wait_for(lambda p: agent.id not in ids(p), T))


def test_crashed_process_expires_with_its_ttl(key: str) -> None:
    agent = Agent(key, "--no-probe", "--ttl", "2")
    try:
        agent.expect("started")
        with Browser(key_digest=key, interface=IF) as browser:
            browser.wait_for(lambda p: agent.id in ids(p), T)
            # alive: stays in view across several TTLs (the browser refreshes its SRV record)
            generation = browser.generation
            time.sleep(4)  # two TTLs
            assert agent.id in ids(browser.peers())
            assert browser.generation == generation
            os.kill(agent.proc.pid, signal.SIGKILL)  # no goodbye
            agent.proc.wait(T)
            t0 = time.monotonic()
            assert agent.id in ids(browser.peers())
            browser.wait_for(lambda p: agent.id not in ids(p), T)
            assert agent.id not in ids(browser.peers())
            assert time.monotonic() - t0 < 5  # ttl 2 s, plus the liveness check's period
    finally:
        agent.stop()


def test_sigkilled_process_with_exit_watcher_is_withdrawn_at_once(key: str) -> None:
    """vLLM SIGKILLs its workers: the advert's exit watcher (swarm.goodbye) says goodbye for them, so the
    member leaves every view in about a second instead of its 60 s TTL, and the watcher exits too."""
    agent = Agent(key, "--no-probe", "--watch-exit")
    try:
        started = agent.expect("started")
        with Browser(key_digest=key, interface=IF) as browser:
            browser.wait_for(lambda p: agent.id in ids(p), T)
            watchers = _watchers_of(agent.proc.pid)
            assert len(watchers) == 1, watchers
            os.kill(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait(T)
            t0 = time.monotonic()
            # the record's TTL is 60 s: gone well before that means the goodbye came (a second or two
            # on an idle machine; the bound is loose for a loaded CI machine)
            browser.wait_for(lambda p: agent.id not in ids(p), 30)
            assert time.monotonic() - t0 < 30
            assert started["advert"]["instance_id"] == agent.id
        _wait_gone(watchers[0])
    finally:
        agent.stop()


def test_exit_watcher_ends_with_a_clean_close(key: str) -> None:
    agent = Agent(key, "--no-probe", "--watch-exit")
    try:
        agent.expect("started")
        (watcher,) = _watchers_of(agent.proc.pid)
        agent.send("withdraw")
        agent.expect("withdrawn")
        _wait_gone(watcher)  # closed by the advertiser, not left behind
    finally:
        agent.stop()


def _watchers_of(pid: int) -> list[int]:
    """The swarm.goodbye processes started for `pid` (they run in their own session: found by argv)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"swarm.goodbye" in argv and str(pid).encode() in argv:
            out.append(int(d.name))
    return out


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30  # a bound, not a timing: a loaded machine starts Python slowly
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return
        if state == "Z":  # exited, not yet reaped by init in this container
            return
        time.sleep(0.05)
    raise AssertionError(f"watcher {pid} still running")
