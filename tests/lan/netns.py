"""A disposable LAN of Linux network namespaces, for tests and benchmarks (standard library only).

Topology built by :class:`Lan`::

    <run>-br  : bridge br0 (STP off, multicast snooping off), ports h0, h1, ...
    <run>-h0  : eth0 = 10.87.0.1/24 (veth, peer h0 on br0), lo up, route 224.0.0.0/4 dev eth0
    <run>-h1  : eth0 = 10.87.0.2/24 ...

``<run>`` is ``swt<pid>x<6 hex>``, unique per Lan, so parallel runs never collide; namespaces left by a
run that was killed (its pid is gone) are removed by the next Lan (:func:`cleanup_stale`). Nothing is
created in or connected to the caller's namespace: traffic stays among the namespaces of one Lan.
IPv6 is disabled inside them unless ``ipv6=True`` (less background chatter, IPv4-only mDNS).

Per host link (both directions by default; "egress" is what the host sends, "ingress" what it
receives, shaped on the bridge's port): ``host.set_link(rate_mbit=..., delay_ms=..., jitter_ms=...,
loss_pct=...)`` (tbf for the rate, netem for delay/loss, netem above tbf when both), ``clear_link()``,
``link_down()`` / ``link_up()`` (the bridge port: like pulling the cable; the host keeps its address).

Processes: ``host.popen(argv)`` / ``host.python(args...)`` run ``ip netns exec <ns> argv`` in their own
process group and return a :class:`HostProcess` (line-oriented stdout with ``expect()``, stdin
``send()``, stderr kept in a file). ``Lan.close()`` (also on exceptions, via ``with``, and at exit)
stops those processes, kills whatever else still runs in its namespaces, and deletes the namespaces.

Needs: Linux, root, iproute2 (``ip`` and ``tc``; Debian/Ubuntu package ``iproute2``), kernel support
for veth, bridge, and the tbf/netem qdiscs. :func:`unavailable_reason` says what is missing.

Usage (tests get it from the ``make_lan`` fixture in tests/lan/conftest.py)::

    with Lan(3, rate_mbit=100) as lan:
        h0, h1, h2 = lan.hosts
        server = h1.python("-c", "...")
        print(h0.throughput_mbit(h1, nbytes=2_000_000))

Manual use: ``sudo python tests/lan/netns.py --hosts 3 --rate-mbit 100`` keeps a LAN up until Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "PREFIX",
    "Host",
    "HostProcess",
    "HostProcessError",
    "Lan",
    "NetnsError",
    "cleanup_stale",
    "netem_available",
    "unavailable_reason",
]

PREFIX = "swt"
_RUN_RE = re.compile(rf"^{PREFIX}(\d+)x[0-9a-f]{{6}}-")
_CMD_TIMEOUT = 20.0


class NetnsError(RuntimeError):
    """A namespace/link/qdisc command failed; the message has the command and its stderr."""


class HostProcessError(RuntimeError):
    """A process in a host namespace did not produce what was expected; the message has its output."""


def _ip(*args: str, check: bool = True, timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return _cmd(["ip", *args], check=check, timeout=timeout)


def _cmd(
    argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout:g} s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


# ------------------------------------------------------------------------------------- availability

_reason_cache: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when namespaces can be built here, else why not (checked once, by building a tiny one)."""
    if _reason_cache:
        return _reason_cache[0]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root (run as root, as CI does)"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "`ip`/`tc` not found: install iproute2 (apt-get install iproute2)"
    else:
        probe = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}-probe"
        try:
            _ip("netns", "add", probe)
            try:
                _ip("-n", probe, "link", "add", "br0", "type", "bridge")
                _ip("-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb")
                _ip("-n", probe, "link", "set", "va", "up")
                _cmd(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "va", "root", "tbf",
                      "rate", "10mbit", "burst", "16kb", "limit", "64kb"])  # fmt: skip
            finally:
                _ip("netns", "del", probe, check=False)
        except (NetnsError, OSError) as exc:
            reason = f"cannot create network namespaces/links/qdiscs here: {exc}"
    _reason_cache.append(reason)
    return reason


_netem_cache: list[bool] = []


def netem_available() -> bool:
    """Whether the kernel offers the netem qdisc (needed for delay/jitter/loss; not for rate or down)."""
    if not _netem_cache:
        probe = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}-netem"
        try:
            _ip("netns", "add", probe)
            try:
                done = _cmd(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
                             "netem", "delay", "1ms"], check=False)  # fmt: skip
                _netem_cache.append(done.returncode == 0)
            finally:
                _ip("netns", "del", probe, check=False)
        except (NetnsError, OSError):
            _netem_cache.append(False)
    return _netem_cache[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_netns_pids(ns: str) -> None:
    out = _ip("netns", "pids", ns, check=False).stdout
    for word in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Delete namespaces of this harness whose creating process is gone; returns their names."""
    removed = []
    for ns in _list_netns():
        m = _RUN_RE.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _kill_netns_pids(ns)
            if _ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
    return removed


# ----------------------------------------------------------------------------------------- processes


class HostProcess:
    """A process running inside a host namespace, in its own process group.

    stdout is read line by line in a thread (``expect()``, ``lines``); stderr goes to a temp file
    (``stderr``); ``send()`` writes a line to stdin. ``stop()`` ends it (SIGTERM, then SIGKILL to the
    group). Its Lan stops it at close at the latest.
    """

    def __init__(self, host: Host, argv: Sequence[str], *, env: dict[str, str] | None, cwd: str | None):
        self.host = host
        self.argv = list(argv)
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *self.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name=f"netns-{host.name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def stderr(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", errors="replace")

    def send(self, line: str) -> None:
        """Write one line to the process's stdin."""
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except BrokenPipeError as exc:
            raise HostProcessError(self._describe(f"stdin closed when sending {line!r}")) from exc

    def close_stdin(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()

    def _describe(self, what: str) -> str:
        tail = "\n".join(self.lines[-20:])
        return (
            f"{self.host.name} ({self.host.ip}) {' '.join(self.argv)[:200]}: {what}\n"
            f"--- last stdout lines ---\n{tail}\n--- stderr ---\n{self.stderr[-4000:]}"
        )

    def expect(self, predicate: Callable[[str], bool] | str, timeout: float) -> str:
        """Consume stdout lines until one satisfies ``predicate`` (or contains the string); returns it.

        Raises HostProcessError (with the output so far) on timeout or end of output.
        """
        test = (lambda line: predicate in line) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostProcessError(self._describe(f"no matching line within {timeout:g} s"))
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)  # stay at EOF for later calls
                self.popen.wait(5)
                raise HostProcessError(self._describe(f"output ended (exit {self.popen.returncode})"))
            if test(line):
                return line

    def expect_json(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """Like expect() for JSON-object lines (other lines are skipped); returns the parsed object."""
        found: list[dict[str, Any]] = []

        def test(line: str) -> bool:
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            if isinstance(obj, dict) and predicate(obj):
                found.append(obj)
                return True
            return False

        self.expect(test, timeout)
        return found[0]

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise HostProcessError(self._describe(f"still running after {timeout:g} s")) from exc

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM the process group, then SIGKILL after ``timeout``; returns the exit status."""
        self.close_stdin()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        else:  # leader gone; children of the group may remain
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._reader.join(timeout)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode

    def __enter__(self) -> HostProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ the LAN


class Host:
    """One machine of the LAN: its namespace, its eth0 address, its link to the bridge."""

    def __init__(self, lan: Lan, index: int, ip: str, prefixlen: int):
        self.lan = lan
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{lan.run_id}-{self.name}"
        self.ip = ip
        self.prefixlen = prefixlen
        self.ifname = "eth0"
        self.port = self.name  # the bridge-side end of the veth, in the bridge namespace

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.ip}, netns={self.netns})"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace (stdout/stderr captured as text)."""
        return _cmd(self.exec_argv(argv), check=check, timeout=timeout, input=input)

    def popen(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None
    ) -> HostProcess:
        """Start a process inside the namespace; the Lan stops it at close at the latest."""
        proc = HostProcess(self, argv, env=env, cwd=cwd)
        self.lan._processes.append(proc)
        return proc

    def python(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        pythonpath: Sequence[str | Path] = (),
        cwd: str | None = None,
    ) -> HostProcess:
        """Start ``sys.executable -u *args`` in the namespace; ``pythonpath`` entries are prepended."""
        full = dict(os.environ if env is None else env)
        if pythonpath:
            extra = os.pathsep.join(str(Path(p).resolve()) for p in pythonpath)
            full["PYTHONPATH"] = extra + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
        return self.popen([sys.executable, "-u", *args], env=full, cwd=cwd)

    # -- link control

    def _ends(self, direction: str) -> list[tuple[str, str]]:
        if direction not in ("both", "egress", "ingress"):
            raise ValueError(f"direction must be both, egress or ingress, got {direction!r}")
        ends = []
        if direction in ("both", "egress"):
            ends.append((self.netns, self.ifname))
        if direction in ("both", "ingress"):
            ends.append((self.lan.bridge_netns, self.port))
        return ends

    def set_link(
        self,
        *,
        rate_mbit: float | None = None,
        delay_ms: float | None = None,
        jitter_ms: float | None = None,
        loss_pct: float | None = None,
        direction: str = "both",
        burst_bytes: int | None = None,
        queue_s: float = 0.1,
    ) -> None:
        """Replace this link's shaping: tbf at ``rate_mbit``; netem delay/jitter/loss (netem above tbf).

        tbf's bucket is ``burst_bytes`` (default: 2 ms at the rate, at least 32 KiB) and its queue holds
        ``queue_s`` seconds at the rate (default 0.1 s; shorter queues cost TCP retransmission timeouts
        on short transfers). netem needs a kernel with sch_netem (:func:`netem_available`); without it
        this raises NetnsError saying so.
        """
        netem: list[str] = []
        if delay_ms or jitter_ms:
            netem += ["delay", f"{delay_ms or 0}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        if loss_pct:
            netem += ["loss", f"{loss_pct}%"]
        if netem and not netem_available():
            raise NetnsError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM / module sch_netem)")
        for ns, dev in self._ends(direction):
            _tc_clear(ns, dev)
            parent = ["root"]
            if netem:
                _tc(
                    ns,
                    ["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", *netem, "limit", "10000"],
                )
                parent = ["parent", "1:1"]
            if rate_mbit:
                rate_bytes = rate_mbit * 1e6 / 8
                burst = burst_bytes or max(int(rate_bytes * 0.002), 32 * 1024)
                limit = max(int(rate_bytes * queue_s), 4 * burst)
                rate = f"{round(rate_mbit * 1000)}kbit"
                _tc(ns, ["qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf", "rate", rate,
                         "burst", str(burst), "limit", str(limit)])  # fmt: skip

    def shape(self, rate_mbit: float, *, direction: str = "both") -> None:
        """tbf at a fixed rate (and nothing else) on this host's link."""
        self.set_link(rate_mbit=rate_mbit, direction=direction)

    def clear_link(self, *, direction: str = "both") -> None:
        """Remove all shaping from this host's link."""
        for ns, dev in self._ends(direction):
            _tc_clear(ns, dev)

    def qdiscs(self) -> str:
        """`tc qdisc show` of both ends (for diagnostics)."""
        return "\n".join(
            _cmd(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev]).stdout
            for ns, dev in self._ends("both")
        )

    def link_down(self) -> None:
        """Pull the cable: the bridge port goes down; the host keeps its address and routes."""
        _ip("-n", self.lan.bridge_netns, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.lan.bridge_netns, "link", "set", self.port, "up")

    # -- measurement

    def throughput_mbit(
        self, dst: Host, *, nbytes: int = 2_000_000, port: int = 45001, timeout: float = 60
    ) -> float:
        """Send ``nbytes`` over one TCP connection from this host to ``dst``; the receiver's Mbit/s."""
        receiver = dst.python("-c", _RECEIVER, dst.ip, str(port))
        try:
            receiver.expect("ready", timeout=10)
            sender = self.python("-c", _SENDER, dst.ip, str(port), str(nbytes))
            try:
                sender.wait(timeout)
                result = receiver.expect_json(lambda o: "bytes" in o, timeout=timeout)
            finally:
                sender.stop()
        finally:
            receiver.stop()
        if result["bytes"] != nbytes:
            raise HostProcessError(f"receiver got {result['bytes']} bytes of {nbytes}")
        return float(result["bytes"] * 8 / max(result["seconds"], 1e-9) / 1e6)


_RECEIVER = """
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(60); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.monotonic()
    n += len(b)
print(json.dumps({"bytes": n, "seconds": time.monotonic() - (t0 or time.monotonic())}), flush=True)
"""

_SENDER = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(bytes(int(sys.argv[3]))); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def _tc(ns: str, args: Sequence[str]) -> None:
    _cmd(["ip", "netns", "exec", ns, "tc", *args])


def _tc_clear(ns: str, dev: str) -> None:
    done = _cmd(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
    if done.returncode != 0 and "handle of zero" not in done.stderr and "No such file" not in done.stderr:
        raise NetnsError(f"tc qdisc del dev {dev} root in {ns}: {done.stderr.strip()}")


class Lan:
    """N hosts on one bridge, each in its own namespace; see the module docstring.

    Everything is built in the constructor (and torn down again if that fails); ``close()`` removes
    it all and is idempotent. ``rate_mbit`` shapes every host's link (both directions) at once.
    """

    def __init__(
        self,
        n_hosts: int,
        *,
        subnet: str = "10.87.0.0/24",
        rate_mbit: float | None = None,
        ipv6: bool = False,
    ) -> None:
        if not 1 <= n_hosts <= 200:
            raise ValueError(f"n_hosts must be in 1..200, got {n_hosts}")
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        net = ipaddress.IPv4Network(subnet)
        if net.num_addresses - 2 < n_hosts:
            raise ValueError(f"subnet {subnet} is too small for {n_hosts} hosts")
        cleanup_stale()
        self.run_id = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.bridge_netns = f"{self.run_id}-br"
        self.subnet = net
        hosts_ips = list(net.hosts())
        self.hosts = [Host(self, i, str(hosts_ips[i]), net.prefixlen) for i in range(n_hosts)]
        self._processes: list[HostProcess] = []
        self._namespaces: list[str] = []
        self._closed = False
        atexit.register(self.close)
        try:
            self._build(ipv6)
            if rate_mbit:
                for host in self.hosts:
                    host.shape(rate_mbit)
        except BaseException:
            self.close()
            raise

    def _add_netns(self, ns: str, ipv6: bool) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        if not ipv6:
            _cmd(["ip", "netns", "exec", ns, "sh", "-c",
                  "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
                  "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"])  # fmt: skip
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self, ipv6: bool) -> None:
        br = self.bridge_netns
        self._add_netns(br, ipv6)
        _ip("-n", br, "link", "add", "br0", "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", "br0", "up")
        for host in self.hosts:
            ns = host.netns
            self._add_netns(ns, ipv6)
            _ip("-n", br, "link", "add", host.port, "type", "veth", "peer", "name", host.ifname, "netns", ns)
            _ip("-n", br, "link", "set", host.port, "master", "br0")
            _ip("-n", br, "link", "set", host.port, "up")
            _ip("-n", ns, "addr", "add", f"{host.ip}/{host.prefixlen}", "dev", host.ifname)
            _ip("-n", ns, "link", "set", host.ifname, "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", host.ifname)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def shape_all(self, rate_mbit: float, *, direction: str = "both") -> None:
        for host in self.hosts:
            host.shape(rate_mbit, direction=direction)

    def close(self) -> None:
        """Stop processes, kill what else runs in the namespaces, delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        problems = []
        for proc in reversed(self._processes):
            try:
                proc.stop(timeout=2.0)
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"stopping {proc.argv[:3]}: {exc}")
        for ns in reversed(self._namespaces):
            try:
                _kill_netns_pids(ns)
                done = _ip("netns", "del", ns, check=False)
                if done.returncode != 0:
                    problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
            except (NetnsError, OSError) as exc:
                problems.append(f"{ns}: {exc}")
        if problems:
            print("netns teardown problems:\n  " + "\n  ".join(problems), file=sys.stderr)

    def __enter__(self) -> Lan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Keep a namespaced LAN up until Ctrl-C.")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--rate-mbit", type=float, default=None)
    args = parser.parse_args()
    with Lan(args.hosts, rate_mbit=args.rate_mbit) as lan:
        for h in lan.hosts:
            print(f"{h.name} {h.ip}: ip netns exec {h.netns} bash")
        print("Ctrl-C to tear down")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    _main()
