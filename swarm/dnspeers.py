"""Peers from DNS, for networks without multicast (Kubernetes): `dns:NAME[:PORT]` and `dns-srv:NAME`.

- `dns:NAME[:PORT]`: every A and AAAA record of NAME, each at PORT (default: the default control port,
  swarm.options.DEFAULT_CONTROL_PORT). A headless Kubernetes Service has one record per ready pod.
- `dns-srv:NAME`: every SRV record of NAME (target and port), each target resolved to its A/AAAA
  records. A headless Service with a named port has them: `_swarm._tcp.SERVICE.NAMESPACE.svc...`.

`DnsPeers` re-resolves every `interval_s` in its own thread (DNS answers change as pods come and go) and
hands the current endpoint list to a callback; the node merges it into its dial candidates. Resolution
uses dnspython with the system's resolver configuration (/etc/resolv.conf: search domains, the cluster
DNS), or one given server (`SWARM_DNS_SERVER`, as the tests do with a dnsmasq on loopback).

Limits: answers are hints like mDNS adverts (the control-plane handshake checks every peer); at most
`MAX_RECORDS` endpoints per name are used; each query has a timeout; a failed resolution keeps the
previous answer and is logged once until it succeeds again.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_RECORDS = 64
_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
PREFIXES = ("dns:", "dns-srv:")


class DnsPeersError(ValueError):
    """A malformed dns: or dns-srv: entry."""


@dataclass(frozen=True)
class DnsName:
    name: str
    #: the port of every address (dns:); None for dns-srv: (each SRV record has its own)
    port: int | None
    srv: bool

    def __str__(self) -> str:
        return f"dns-srv:{self.name}" if self.srv else f"dns:{self.name}:{self.port}"


def _check_name(name: str) -> str:
    bare = name[:-1] if name.endswith(".") else name
    if not bare or len(bare) > 253 or not all(_LABEL_RE.match(label) for label in bare.split(".")):
        raise DnsPeersError(f"{name!r} is not a valid DNS name")
    return name


def parse_dns_peers(spec: str, default_port: int | None = None) -> list[DnsName]:
    """The dns:/dns-srv: entries of a peer list (other entries are left to swarm.discovery)."""
    if default_port is None:
        from swarm.options import DEFAULT_CONTROL_PORT

        default_port = DEFAULT_CONTROL_PORT
    out: list[DnsName] = []
    for position, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        try:
            if entry.startswith("dns-srv:"):
                item = DnsName(_check_name(entry[8:]), None, True)
            elif entry.startswith("dns:"):
                name, sep, port = entry[4:].partition(":")
                if sep and not (port.isdigit() and 1 <= int(port) <= 65535):
                    raise DnsPeersError(f"port {port!r} is not a number in 1..65535")
                item = DnsName(_check_name(name), int(port) if sep else default_port, False)
            else:
                continue
        except DnsPeersError as e:
            raise DnsPeersError(
                f"peer list: entry {position} {entry!r}: {e} (expected dns:NAME[:PORT] or dns-srv:NAME)"
            ) from None
        if item not in out:
            out.append(item)
    return out


def parse_server(text: str) -> tuple[str, int]:
    """'10.0.0.10', '127.0.0.1:5353', '[fd00::10]:53' -> (address, port)."""
    t = text.strip()
    host, port = t, "53"
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "53"
    elif t.count(":") == 1:
        host, port = t.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise DnsPeersError(f"{host!r} is not an IP address") from None
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise DnsPeersError(f"port {port!r} is not a number in 1..65535")
    return host, int(port)


def _resolver(server: str | None, timeout_s: float) -> object:
    import dns.resolver

    r = dns.resolver.Resolver(configure=server is None)
    if server is not None:
        host, port = parse_server(server)
        r.nameservers = [host]
        r.port = port
    r.timeout = r.lifetime = timeout_s
    r.use_search_by_default = True  # short names as libc resolves them (Kubernetes search domains)
    return r


def _addresses(resolver: object, name: str) -> list[str]:
    """A and AAAA records of `name`; a failure of one type does not hide the other's answer (a server
    may refuse AAAA queries for a name it only has A records of)."""
    import dns.exception
    import dns.resolver

    found: list[str] = []
    errors: list[Exception] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(name, rdtype)  # type: ignore[attr-defined]
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue  # a name with only A, or only AAAA records; or no ready pod yet
        except (dns.exception.DNSException, OSError) as e:
            errors.append(e)
            continue
        found.extend(str(r.address) for r in answer)
    if errors and not found:
        raise errors[0]
    return found[:MAX_RECORDS]


def resolve(
    entry: DnsName,
    *,
    server: str | None = None,
    timeout_s: float = 2.0,
    stop: threading.Event | None = None,
) -> list[tuple[str, int]]:
    """The endpoints `entry` names now (what was resolved so far once `stop` is set). Raises
    dns.exception.DNSException (or OSError) on failure."""
    resolver = _resolver(server, timeout_s)
    if not entry.srv:
        assert entry.port is not None
        return [(a, entry.port) for a in _addresses(resolver, entry.name)]
    out: list[tuple[str, int]] = []
    answer = resolver.resolve(entry.name, "SRV")  # type: ignore[attr-defined]
    records = sorted(answer, key=lambda r: (r.priority, -r.weight))[:MAX_RECORDS]
    for rr in records:
        if stop is not None and stop.is_set():
            break
        target = str(rr.target).rstrip(".")
        for a in _addresses(resolver, target):
            if (a, int(rr.port)) not in out:
                out.append((a, int(rr.port)))
    return out[:MAX_RECORDS]


def resolve_all(
    entries: list[DnsName], *, server: str | None = None, timeout_s: float = 2.0
) -> list[tuple[str, int]]:
    """Every endpoint of every entry; an entry that fails to resolve is logged and skipped."""
    import dns.exception

    out: list[tuple[str, int]] = []
    for entry in entries:
        try:
            found = resolve(entry, server=server, timeout_s=timeout_s)
        except (dns.exception.DNSException, OSError) as e:
            log.warning("cannot resolve %s: %s", entry, e or type(e).__name__)
            continue
        out.extend(a for a in found if a not in out)
    return out


class DnsPeers:
    """Resolve `entries` now and every `interval_s` in a background thread; `on_update(endpoints)` gets
    the union of the latest answers of every entry (an entry that failed keeps its previous answer)."""

    def __init__(
        self,
        entries: list[DnsName],
        on_update: Callable[[list[tuple[str, int]]], None],
        *,
        interval_s: float,
        server: str | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        self.entries = entries
        self._on_update = on_update
        self._interval = interval_s
        self._server = server
        self._timeout = min(timeout_s, interval_s)
        self._stop = threading.Event()
        self._last: dict[DnsName, list[tuple[str, int]]] = {}
        self._failing: set[DnsName] = set()
        self._thread = threading.Thread(target=self._run, name="swarm-dns", daemon=True)

    def start(self) -> DnsPeers:
        self._thread.start()
        return self

    def _run(self) -> None:
        import dns.exception

        while not self._stop.is_set():
            changed = False
            for entry in self.entries:
                if self._stop.is_set():
                    return
                try:
                    found = resolve(entry, server=self._server, timeout_s=self._timeout, stop=self._stop)
                except (dns.exception.DNSException, OSError) as e:
                    if entry not in self._failing:
                        log.warning("cannot resolve %s (keeping the last answer): %s", entry, e)
                        self._failing.add(entry)
                    continue
                self._failing.discard(entry)
                if sorted(found) != sorted(self._last.get(entry, [])):
                    log.info("%s: %d peer(s): %s", entry, len(found), ", ".join(f"{h}:{p}" for h, p in found))
                    self._last[entry] = found
                    changed = True
            if changed:
                union: list[tuple[str, int]] = []
                for found in self._last.values():
                    union.extend(a for a in found if a not in union)
                self._on_update(union)
            self._stop.wait(self._interval)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # A query in flight ends within its timeout (each lookup of an SRV target checks `_stop`).
            self._thread.join(2 * self._timeout + 1.0)
