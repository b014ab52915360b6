"""Finding swarm members: zero-configuration mDNS/DNS-SD on the LAN, or a static peer list.

Job
---
* :class:`Advertiser` publishes one node as a DNS-SD service of type ``_vllm-swarm._tcp.local.``:
  the instance name is the node's ``instance_id``; the SRV record carries its control port; the A/AAAA
  records carry the addresses of every usable interface (or of the one chosen interface); the TXT record
  carries the protocol version, the swarm key digest, the model name, the rank and the role (and the
  control port again). The whole TXT record is at most :data:`MAX_TXT_BYTES` bytes, so an announcement
  always fits one mDNS packet. ``update(role="seed")`` re-announces, ``close()`` sends goodbye records
  (withdrawal) and closes everything it opened.
* :class:`Browser` browses continuously in the background and keeps a current view of resolved,
  not-withdrawn members, optionally only those of one swarm key (``peers()``, ``wait_for()``).
* :func:`static_peers` parses ``SWARM_PEERS`` (``host:port,[v6addr]:port,...``) for networks without
  multicast (most Kubernetes pod networks); :func:`discover` is a one-shot browse merged with that list.

Limits
------
* mDNS is link-local: it does not cross routers, and many overlay/pod networks drop multicast. Use the
  static list there. A static entry says only "something listens at host:port": its key, model, rank
  and role are unknown (``key_digest == ""``, ``role == ""``) until the node's control-plane hello.
* mDNS runs over IPv4 multicast here (python-zeroconf ``IPVersion.V4Only``). Global/ULA IPv6 addresses
  are advertised as AAAA records, but an IPv6-only link cannot be browsed.
* An advert is a hint, not a credential: anything on the LAN can advertise anything. The node must check
  key and manifest in its hello (authenticated when a cluster token is set).
* A node that dies without a clean ``close()`` sends no goodbye; browsers forget it only when its
  SRV record expires: ``ttl`` (default :data:`DEFAULT_TTL` s) after its last answer, plus up to a
  second. (The Browser re-queries a known node's SRV record from half its TTL on, because zeroconf
  itself refreshes only PTR records, which it keeps at least 1125 s.) The node must not rely on the
  browser for liveness.
* The advertised addresses are read once, at ``start()``; interfaces that appear later are not added.
* Each Advertiser and Browser owns one ``Zeroconf`` instance (one event-loop thread, shared port 5353
  with SO_REUSEPORT) and a Browser owns two more threads (zeroconf's browser thread and a resolver).
  Every one of them is closed by ``close()``, which is bounded in time.

Errors are subclasses of :class:`swarm.errors.DiscoveryError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import ifaddr
from zeroconf import (
    Error as ZeroconfError,
)
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf._dns import DNSQuestion  # the SRV refresh query (see _check_liveness)
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_SRV

from swarm.errors import DiscoveryError
from swarm.goodbye import Watcher

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_TTL",
    "ENV_PEERS",
    "MAX_TXT_BYTES",
    "PROTOCOL_VERSION",
    "ROLES",
    "SERVICE_TYPE",
    "Advert",
    "AdvertError",
    "Advertiser",
    "Browser",
    "DiscoveryError",
    "DiscoveryTimeout",
    "InterfaceError",
    "LocalInterface",
    "NameConflictError",
    "StaticPeersError",
    "discover",
    "format_peer",
    "local_interfaces",
    "pick_host",
    "rank_addresses",
    "static_peers",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_vllm-swarm._tcp.local."
PROTOCOL_VERSION = 1
ROLES = ("seed", "leecher")
ENV_PEERS = "SWARM_PEERS"

DEFAULT_TTL = 60
"""Seconds a browser keeps an advert of a node that vanished without a goodbye."""
DEFAULT_TIMEOUT = 5.0
"""Bound on each blocking mDNS operation (register, update, withdraw)."""

MAX_MODEL_BYTES = 64
MAX_RANK_BYTES = 32
MAX_INSTANCE_ID_CHARS = 48
MAX_TXT_BYTES = 255
"""Bound on the encoded TXT record (checked); a full announcement then stays far below one packet."""
MAX_ADVERTISED_ADDRESSES = 16

_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
_KEY_DIGEST_RE = re.compile(r"[0-9a-f]{16}\Z")
_RANK_RE = re.compile(r"[\x21-\x7e]*\Z")  # printable ASCII, no spaces
_HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------- errors


# DiscoveryError (a swarm.errors.SwarmError) is the base of the errors below.


class AdvertError(DiscoveryError, ValueError):
    """An advert's fields are invalid (locally built, or received from the network)."""


class StaticPeersError(DiscoveryError, ValueError):
    """An entry of the static peer list (SWARM_PEERS) cannot be parsed; the message names it."""


class InterfaceError(DiscoveryError):
    """The requested network interface does not exist or cannot carry mDNS."""


class DiscoveryTimeout(DiscoveryError, TimeoutError):
    """An mDNS operation did not finish within its timeout."""


class NameConflictError(DiscoveryError):
    """Another responder on the link already owns this instance name."""


# --------------------------------------------------------------------------------------------- advert


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """Longest prefix of ``text`` whose UTF-8 encoding fits in ``max_bytes`` (never splits a character)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


def _check_key_digest(key_digest: str) -> None:
    if not _KEY_DIGEST_RE.match(key_digest):
        raise AdvertError(f"key_digest must be 16 lowercase hex characters, got {key_digest!r}")


@dataclass(frozen=True)
class Advert:
    """What one node advertises (and what a browser reports about it).

    ``model`` is truncated to :data:`MAX_MODEL_BYTES` UTF-8 bytes on construction. An advert from mDNS
    has a 16-hex ``key_digest``, a role in :data:`ROLES` and a DNS-safe ``instance_id``; an advert built
    from the static list has ``key_digest == ""`` and ``role == ""`` (unknown until the hello).
    """

    instance_id: str
    key_digest: str
    model: str
    rank: str
    role: str
    control_port: int
    host: str = ""
    addresses: tuple[str, ...] = ()
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.control_port, int) or not 1 <= self.control_port <= 65535:
            raise AdvertError(f"control_port must be in 1..65535, got {self.control_port!r}")
        if not isinstance(self.version, int) or not 1 <= self.version <= 65535:
            raise AdvertError(f"version must be in 1..65535, got {self.version!r}")
        if not isinstance(self.model, str):
            raise AdvertError(f"model must be a str, got {self.model!r}")
        object.__setattr__(self, "model", _truncate_utf8(self.model, MAX_MODEL_BYTES))
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not self.instance_id:
            raise AdvertError("instance_id must not be empty")
        if self.is_static:
            return
        if len(self.instance_id) > MAX_INSTANCE_ID_CHARS or not _INSTANCE_ID_RE.match(self.instance_id):
            raise AdvertError(
                f"instance_id must be 1..{MAX_INSTANCE_ID_CHARS} characters of [A-Za-z0-9_-] "
                f"starting with a letter or digit, got {self.instance_id!r}"
            )
        _check_key_digest(self.key_digest)
        if self.role not in ROLES:
            raise AdvertError(f"role must be one of {ROLES}, got {self.role!r}")
        if len(self.rank) > MAX_RANK_BYTES or not _RANK_RE.match(self.rank):
            raise AdvertError(
                f"rank must be at most {MAX_RANK_BYTES} printable ASCII characters without spaces, "
                f"got {self.rank!r}"
            )

    @property
    def is_static(self) -> bool:
        """True for an entry of the static list (nothing known beyond host and port)."""
        return self.key_digest == ""

    @property
    def service_name(self) -> str:
        """The full DNS-SD instance name."""
        return f"{self.instance_id}.{SERVICE_TYPE}"

    @property
    def endpoint(self) -> tuple[str, int]:
        """(host, control_port) to connect to."""
        return (self.host, self.control_port)

    def txt(self) -> dict[str, str]:
        """The TXT record's key/value pairs (checked to fit in :data:`MAX_TXT_BYTES`)."""
        props = {
            "v": str(self.version),
            "key": self.key_digest,
            "model": self.model,
            "rank": self.rank,
            "role": self.role,
            "port": str(self.control_port),
        }
        size = sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in props.items())
        if size > MAX_TXT_BYTES:  # cannot happen with the field limits above; kept as a guard
            raise AdvertError(f"TXT record of {size} bytes exceeds {MAX_TXT_BYTES}")
        return props

    @classmethod
    def from_txt(
        cls,
        instance_id: str,
        props: dict[str, str | None],
        *,
        srv_port: int | None = None,
        addresses: Sequence[str] = (),
        host: str = "",
    ) -> Advert:
        """Build an advert from a received TXT record; raises AdvertError when it is malformed."""

        def field(name: str) -> str:
            value = props.get(name)
            if value is None:
                raise AdvertError(f"advert {instance_id!r}: TXT record lacks {name!r}")
            return value

        try:
            version = int(field("v"))
            port = int(field("port"))
        except ValueError as exc:
            raise AdvertError(f"advert {instance_id!r}: bad number in TXT record: {exc}") from None
        if srv_port is not None and srv_port != port:
            log.debug(
                "advert %s: SRV port %s differs from TXT port %s; using TXT", instance_id, srv_port, port
            )
        return cls(
            instance_id=instance_id,
            key_digest=field("key"),
            model=field("model"),
            rank=field("rank"),
            role=field("role"),
            control_port=port,
            host=host,
            addresses=tuple(addresses),
            version=version,
        )

    @classmethod
    def static(cls, host: str, port: int) -> Advert:
        """An advert for a static peer: only the endpoint is known."""
        return cls(
            instance_id=format_peer(host, port),
            key_digest="",
            model="",
            rank="",
            role="",
            control_port=port,
            host=host,
            addresses=(host,),
        )


# ----------------------------------------------------------------------------------------- interfaces

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LocalInterface:
    """One network interface of this host (in this network namespace)."""

    name: str
    addresses: tuple[IPInterface, ...]
    up: bool


def _interface_is_up(name: str) -> bool:
    try:
        with open(f"/sys/class/net/{name.split(':')[0]}/flags") as fh:
            return bool(int(fh.read().strip(), 16) & 0x1)  # IFF_UP
    except (OSError, ValueError):
        return True  # not Linux, or no sysfs: assume up


def local_interfaces() -> list[LocalInterface]:
    """Interfaces with at least one address, in the system's order."""
    result = []
    for adapter in ifaddr.get_adapters():
        addrs: list[IPInterface] = []
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                addrs.append(ipaddress.ip_interface(f"{raw.split('%')[0]}/{ip.network_prefix}"))
            except ValueError:
                continue
        if addrs:
            result.append(LocalInterface(adapter.name, tuple(addrs), _interface_is_up(adapter.name)))
    return result


VIRTUAL_INTERFACE_PREFIXES = (
    "docker",
    "br-",
    "veth",
    "virbr",
    "lxcbr",
    "lxdbr",
    "podman",
    "cni",
    "kube-ipvs",
)
"""Interfaces not advertised by default: container/VM bridges whose addresses repeat on every host
(every docker0 is 172.17.0.1), so a peer would connect to itself. Name the interface to use one."""


def _usable(addr: IPAddress) -> bool:
    """An address worth advertising to other hosts."""
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


@dataclass(frozen=True)
class _Selection:
    """What to bind zeroconf to and what to advertise, for an ``interface`` argument."""

    bind: list[str] | InterfaceChoice
    advertise: tuple[str, ...]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    label: str
    own: frozenset[str] = frozenset()


def _describe(ifaces: Sequence[LocalInterface]) -> str:
    return ", ".join(f"{i.name} ({', '.join(str(a.ip) for a in i.addresses)})" for i in ifaces) or "none"


def _select(interface: str | None) -> _Selection:
    ifaces = local_interfaces()
    own = frozenset(str(a.ip) for i in ifaces for a in i.addresses)
    if interface is None:
        up = [i for i in ifaces if i.up and not i.name.startswith(VIRTUAL_INTERFACE_PREFIXES)]
        usable = [a for i in up for a in i.addresses if _usable(a.ip)]
        usable.sort(key=lambda a: a.version)  # IPv4 first
        advertise = tuple(str(a.ip) for a in usable[:MAX_ADVERTISED_ADDRESSES]) or ("127.0.0.1",)
        networks = tuple(a.network for i in up for a in i.addresses)
        return _Selection(InterfaceChoice.All, advertise, networks, "all interfaces", own)
    try:
        wanted: IPAddress | None = ipaddress.ip_address(interface.split("%")[0])
    except ValueError:
        wanted = None
    for iface in ifaces:
        if wanted is not None:
            match = [a for a in iface.addresses if a.ip == wanted]
            if not match:
                continue
            chosen: Sequence[IPInterface] = match
        elif iface.name == interface:
            chosen = [a for a in iface.addresses if not (a.version == 6 and a.ip.is_link_local)]
        else:
            continue
        if not iface.up:
            raise InterfaceError(f"network interface {iface.name} ({interface!r}) is down")
        v4 = [str(a.ip) for a in iface.addresses if a.version == 4]
        if wanted is not None and wanted.version == 4:
            v4 = [str(wanted)]
        if not v4:
            raise InterfaceError(
                f"network interface {interface!r} has no IPv4 address; mDNS here runs over IPv4 "
                f"(use SWARM_PEERS on IPv6-only networks)"
            )
        advertise = tuple(str(a.ip) for a in sorted(chosen, key=lambda a: a.version))
        networks = tuple(a.network for a in iface.addresses)
        return _Selection(v4, advertise[:MAX_ADVERTISED_ADDRESSES], networks, f"interface {interface}", own)
    raise InterfaceError(
        f"no network interface named or addressed {interface!r}; available: {_describe(ifaces)}"
    )


def _open_zeroconf(selection: _Selection) -> Zeroconf:
    try:
        return Zeroconf(interfaces=selection.bind, ip_version=IPVersion.V4Only, use_asyncio=False)
    except (OSError, ZeroconfError, RuntimeError) as exc:
        raise DiscoveryError(
            f"cannot open mDNS sockets on {selection.label}: {exc}; is multicast available here? "
            f"On networks without multicast set {ENV_PEERS}=host:port,..."
        ) from exc


def rank_addresses(
    addresses: Sequence[str],
    local_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    own: frozenset[str] = frozenset(),
) -> list[str]:
    """Order a peer's addresses by how likely they are to work from here; best first.

    IPv4 on one of our subnets, then IPv6 on one of our subnets, other routable IPv4, other IPv6,
    link-local, loopback (loopback only works for a peer on this very host, and is all there is when
    everything runs on ``lo``). Addresses that are also ours (``own``) come after all others: for a
    peer on another host they are a copy of ours (a container bridge), for a peer on this host every
    address is ours and the order among them stays. Unparseable entries are dropped.
    """
    scored: list[tuple[bool, int, int, str]] = []
    for index, text in enumerate(addresses):
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        on_link = any(ip.version == n.version and ip in n for n in local_networks if not n.is_loopback)
        if ip.is_loopback:
            score = 6
        elif ip.is_link_local:
            score = 4 if ip.version == 4 else 5
        elif on_link:
            score = 0 if ip.version == 4 else 1
        else:
            score = 2 if ip.version == 4 else 3
        scored.append((str(ip) in own, score, index, text))
    return [text for *_, text in sorted(scored)]


def pick_host(
    addresses: Sequence[str],
    local_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    own: frozenset[str] = frozenset(),
) -> str:
    """The best of a peer's addresses as seen from here (see :func:`rank_addresses`); "" if none."""
    ranked = rank_addresses(addresses, local_networks, own)
    return ranked[0] if ranked else ""


# ---------------------------------------------------------------------------------------- mDNS helpers


def _run_on_loop(zc: Zeroconf, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
    """Run ``coro`` on zeroconf's event loop and wait for it at most ``timeout`` seconds."""
    loop = zc.loop
    if loop is None or not loop.is_running():
        coro.close()
        raise DiscoveryError(f"{what}: zeroconf is not running")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise DiscoveryTimeout(f"{what} did not finish within {timeout:g} s") from None


async def _register(zc: Zeroconf, info: ServiceInfo, probe: bool) -> None:
    # Returns once probing is done and the records are registered; the announcements (3, 225 ms
    # apart, the first at once) continue on zeroconf's loop.
    await zc.async_register_service(info, cooperating_responders=not probe)


async def _update(zc: Zeroconf, info: ServiceInfo) -> None:
    await zc.async_update_service(info)


async def _check_liveness(zc: Zeroconf, names: list[str], last_query: dict[str, float]) -> list[str]:
    """On zeroconf's loop (its cache is not thread-safe): which of ``names`` have expired.

    Liveness follows the SRV record (host TTL): zeroconf keeps received PTR records at least 1125 s
    and refreshes only those, so a node that dies without a goodbye would linger for about 20 min.
    Here an SRV record past half its TTL is re-queried (at most every TTL/10 s, 1..10 s), so a live
    node's answer refreshes it, and a name whose SRV records have all expired is reported.
    """
    now = current_time_millis()
    expired = []
    query = DNSOutgoing(_FLAGS_QR_QUERY)
    for name in names:
        records = [
            r for r in zc.cache.async_all_by_details(name, _TYPE_SRV, _CLASS_IN) if not r.is_expired(now)
        ]
        if not records:
            expired.append(name)
            last_query.pop(name, None)
            continue
        newest = max(records, key=lambda r: r.created + r.ttl * 1000)
        interval_ms = min(max(newest.ttl * 100, 1000), 10_000)
        if newest.is_stale(now) and now - last_query.get(name, 0.0) >= interval_ms:
            query.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
            last_query[name] = now
    if query.questions:
        zc.async_send(query)
    return expired


def service_info(records: dict[str, Any]) -> ServiceInfo:
    """The zeroconf ServiceInfo of an advert's records (`Advertiser._records`)."""
    return ServiceInfo(
        records["type"],
        records["name"],
        port=int(records["port"]),
        properties=dict(records["properties"]),
        server=records["server"],
        host_ttl=int(records["ttl"]),
        other_ttl=int(records["ttl"]),
        parsed_addresses=list(records["addresses"]),
    )


async def _withdraw(zc: Zeroconf, info: ServiceInfo) -> None:
    broadcast = await zc.async_unregister_service(info)
    await broadcast  # all goodbye packets sent


def _check_timeout(timeout: float, what: str) -> None:
    if not (timeout >= 0 and timeout < float("inf")):
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {timeout!r}")


# ----------------------------------------------------------------------------------------- advertiser


class Advertiser:
    """Advertise one node on the LAN; a context manager (``with Advertiser(advert) as adv:``).

    ``start()`` probes the name (unless ``probe=False``) and registers the service, ``update()``
    re-announces changed fields (role, model, rank, control port), ``close()`` withdraws it (goodbye
    records, so browsers drop it within about a second) and closes the zeroconf instance. Each call is
    bounded by ``timeout`` seconds and raises :class:`DiscoveryTimeout` past it (``close()`` logs
    instead and still closes). ``probe=False`` saves about 0.75 s at start when the instance id is
    known to be unique (a node's id: a digest of a fresh key), at the price of not detecting a name conflict.
    """

    _UPDATABLE = frozenset({"role", "model", "rank", "control_port"})

    def __init__(
        self,
        advert: Advert,
        *,
        interface: str | None = None,
        ttl: int = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        probe: bool = True,
        watch_exit: bool = False,
    ) -> None:
        if advert.is_static:
            raise AdvertError("cannot advertise an advert without a key digest")
        if not 1 <= ttl <= 4500:
            raise ValueError(f"ttl must be in 1..4500 seconds, got {ttl!r}")
        _check_timeout(timeout, "timeout")
        self._advert = dataclasses.replace(advert, host="", addresses=())
        self._interface = interface
        self._ttl = ttl
        self._timeout = timeout
        self._probe = probe
        self._lock = threading.Lock()
        self._state = "new"
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._watch_exit = watch_exit
        self._watcher: Watcher | None = None

    @property
    def advert(self) -> Advert:
        """The current advert, with ``host`` and ``addresses`` filled once started."""
        return self._advert

    @property
    def started(self) -> bool:
        return self._state == "started"

    def _service_info(self, advert: Advert) -> ServiceInfo:
        return service_info(self._records(advert))

    def _records(self, advert: Advert) -> dict[str, Any]:
        """The advert's records as plain data (also what the exit watcher, swarm.goodbye, is given)."""
        return {
            "type": SERVICE_TYPE,
            "name": advert.service_name,
            "port": advert.control_port,
            "properties": advert.txt(),
            "server": f"swarm-{advert.instance_id}.local.",
            "ttl": self._ttl,
            "addresses": list(advert.addresses),
        }

    def start(self) -> Advertiser:
        """Register the service; returns self. Raises NameConflictError, DiscoveryTimeout, ...

        With ``watch_exit``, a watcher process (swarm.goodbye) withdraws the advert if this process
        dies without closing it (SIGKILL)."""
        with self._lock:
            if self._state != "new":
                raise DiscoveryError(f"advertiser {self._advert.instance_id} is already {self._state}")
            selection = _select(self._interface)
            advert = dataclasses.replace(
                self._advert, host=selection.advertise[0], addresses=selection.advertise
            )
            info = self._service_info(advert)
            zc = _open_zeroconf(selection)
            try:
                _run_on_loop(zc, _register(zc, info, self._probe), self._timeout, "mDNS registration")
            except NonUniqueNameException:
                zc.close()
                raise NameConflictError(
                    f"instance name {advert.instance_id!r} is already advertised on this link"
                ) from None
            except BaseException:
                zc.close()
                raise
            self._zc, self._info, self._advert, self._state = zc, info, advert, "started"
            if self._watch_exit:
                bind = selection.bind if isinstance(selection.bind, list) else None
                try:
                    self._watcher = Watcher.start(bind, self._records(advert), self._timeout)
                except OSError as exc:  # the advert still works; only a SIGKILL leaves it to its TTL
                    log.warning("advert %s: no exit watcher (%s)", advert.instance_id, exc)
            log.info(
                "advertising %s (%s %s %s) on %s at %s port %d",
                advert.instance_id,
                advert.model,
                advert.rank,
                advert.role,
                selection.label,
                ",".join(advert.addresses),
                advert.control_port,
            )
            return self

    def update(self, **changes: Any) -> Advert:
        """Change role/model/rank/control_port and re-announce; returns the new advert."""
        unknown = set(changes) - self._UPDATABLE
        if unknown:
            raise AdvertError(f"cannot update {sorted(unknown)}; updatable: {sorted(self._UPDATABLE)}")
        with self._lock:
            if self._state == "closed":
                raise DiscoveryError(f"advertiser {self._advert.instance_id} is closed")
            advert = dataclasses.replace(self._advert, **changes)
            if self._state == "new":
                self._advert = advert
                return advert
            assert self._zc is not None
            info = self._service_info(advert)
            _run_on_loop(self._zc, _update(self._zc, info), self._timeout, "mDNS update")
            self._advert, self._info = advert, info
            if self._watcher is not None:
                self._watcher.update(self._records(advert))
            log.info("advert %s updated: %s", advert.instance_id, changes)
            return advert

    def close(self) -> None:
        """Withdraw the advert (goodbye packets) and close zeroconf. Idempotent, bounded in time."""
        with self._lock:
            if self._state == "closed":
                return
            zc, info, was = self._zc, self._info, self._state
            self._state, self._zc, self._info = "closed", None, None
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                watcher.close()  # we say goodbye ourselves, below
            if zc is None:
                return
            try:
                if was == "started" and info is not None:
                    _run_on_loop(zc, _withdraw(zc, info), self._timeout, "mDNS withdrawal")
                    log.info("advert %s withdrawn", self._advert.instance_id)
            except DiscoveryError as exc:
                log.warning("advert %s: %s; closing anyway", self._advert.instance_id, exc)
            finally:
                zc.close()

    def __enter__(self) -> Advertiser:
        if self._state == "new":
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -------------------------------------------------------------------------------------------- browser


class Browser:
    """Browse for swarm members in the background; a context manager.

    Starts browsing on construction. ``peers()`` is the current view: adverts that were resolved and
    not withdrawn (nor expired), sorted by instance id, only those of ``key_digest`` when given, never
    the one of ``ignore`` (the browsing node's own instance id).
    ``generation`` increases at every change of that view. ``close()`` stops and joins every thread
    it started and closes its zeroconf instance.
    """

    RETRY_INTERVAL = 1.0
    MAX_RETRIES = 10
    EXPIRY_CHECK_INTERVAL = 1.0

    def __init__(
        self,
        *,
        key_digest: str | None = None,
        interface: str | None = None,
        resolve_timeout: float = 2.0,
        ignore: str | None = None,
    ) -> None:
        if key_digest is not None:
            _check_key_digest(key_digest)
        _check_timeout(resolve_timeout, "resolve_timeout")
        self._key = key_digest
        #: the browsing node's own instance id: its advert is neither resolved, listed nor logged
        self._ignore = ignore
        self._resolve_timeout = resolve_timeout
        self._cond = threading.Condition()
        self._peers: dict[str, Advert] = {}
        self._retry_at: dict[str, float] = {}  # unresolved name -> when to try again
        self._attempts: dict[str, int] = {}
        self._last_query: dict[str, float] = {}  # used on zeroconf's loop only
        self._events: queue.SimpleQueue[tuple[str, ServiceStateChange] | None] = queue.SimpleQueue()
        self._generation = 0
        self._closed = False
        self._zc: Zeroconf | None = None
        self._sb: ServiceBrowser | None = None
        self._worker: threading.Thread | None = None
        selection = _select(interface)
        self._networks = selection.networks
        self._own = selection.own
        try:
            self._zc = _open_zeroconf(selection)
            self._worker = threading.Thread(target=self._run, name="swarm-discovery-resolver", daemon=True)
            self._worker.start()
            self._sb = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        except BaseException:
            self.close()
            raise

    # -- public view

    def peers(self) -> list[Advert]:
        with self._cond:
            return sorted(self._peers.values(), key=lambda a: a.instance_id)

    @property
    def generation(self) -> int:
        return self._generation

    def wait_for(self, predicate: Callable[[list[Advert]], bool], timeout: float) -> list[Advert]:
        """Block until ``predicate(peers)`` holds or ``timeout`` seconds pass; returns the peers then."""
        _check_timeout(timeout, "timeout")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                current = sorted(self._peers.values(), key=lambda a: a.instance_id)
                left = deadline - time.monotonic()
                if predicate(current) or left <= 0 or self._closed:
                    return current
                self._cond.wait(left)

    # -- zeroconf side

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Runs in zeroconf's browser thread: hand over, never block here.
        self._events.put((name, state_change))

    def _run(self) -> None:
        next_expiry_check = time.monotonic() + self.EXPIRY_CHECK_INTERVAL
        try:
            while not self._closed:
                now = time.monotonic()
                due = min(self._retry_at.values(), default=now + 0.5)
                try:
                    item = self._events.get(timeout=max(0.0, min(0.5, due - now)))
                except queue.Empty:
                    item = ("", ServiceStateChange.Updated)  # no event: only retries are due
                if item is None or self._closed:
                    return
                name, change = item
                if change is ServiceStateChange.Removed:
                    self._retry_at.pop(name, None)
                    self._attempts.pop(name, None)
                    self._set(name, None)
                elif name:
                    self._attempts.pop(name, None)  # news about it: a fresh series of attempts
                    self._resolve(name)
                now = time.monotonic()
                for pending in [n for n, t in self._retry_at.items() if t <= now]:
                    if self._closed:
                        return
                    self._resolve(pending)
                if now >= next_expiry_check:
                    next_expiry_check = now + self.EXPIRY_CHECK_INTERVAL
                    self._drop_expired()
        except Exception:  # a dying background thread must say why
            log.exception("discovery resolver thread failed; browsing stopped")
            raise

    def _drop_expired(self) -> None:
        # A node gone without goodbye: see _check_liveness (zeroconf alone would keep it ~20 min).
        with self._cond:
            names = list(self._peers)
        if not names or self._zc is None:
            return
        try:
            expired = _run_on_loop(
                self._zc, _check_liveness(self._zc, names, self._last_query), 1.0, "mDNS liveness check"
            )
        except DiscoveryError as exc:
            log.debug("%s", exc)
            return
        for name in expired:
            log.info("advert %s expired (its node left without a goodbye)", name)
            self._set(name, None)

    def _resolve(self, name: str) -> None:
        zc = self._zc
        assert zc is not None
        if not name.endswith("." + SERVICE_TYPE):
            return
        instance_id = name[: -len(SERVICE_TYPE) - 1]
        if instance_id == self._ignore:
            return
        info = ServiceInfo(SERVICE_TYPE, name)
        try:
            ok = info.request(zc, self._resolve_timeout * 1000)
        except ZeroconfError as exc:
            log.debug("resolving %s failed: %r", name, exc)
            ok = False
        if not ok:
            attempts = self._attempts.get(name, 0) + 1
            self._attempts[name] = attempts
            if attempts < self.MAX_RETRIES:
                self._retry_at[name] = time.monotonic() + self.RETRY_INTERVAL
                log.debug("%s not resolved yet (attempt %d); retrying", name, attempts)
            else:
                self._retry_at.pop(name, None)
                log.info("giving up resolving %s after %d attempts", name, attempts)
            return
        self._retry_at.pop(name, None)
        self._attempts.pop(name, None)
        addresses = rank_addresses(info.parsed_scoped_addresses(IPVersion.All), self._networks, self._own)
        try:
            advert = Advert.from_txt(
                instance_id,
                info.decoded_properties,
                srv_port=info.port,
                addresses=addresses,
                host=addresses[0] if addresses else "",
            )
        except AdvertError as exc:
            log.info("ignoring malformed advert %s: %s", name, exc)
            self._set(name, None)
            return
        if not addresses:
            log.info("ignoring advert %s without a usable address", name)
            self._set(name, None)
            return
        if self._key is not None and advert.key_digest != self._key:
            self._set(name, None)
            return
        self._set(name, advert)

    def _set(self, name: str, advert: Advert | None) -> None:
        with self._cond:
            old = self._peers.get(name)
            if advert is None:
                if old is None:
                    return
                del self._peers[name]
                log.info("peer %s gone", old.instance_id)
            else:
                if old == advert:
                    return
                self._peers[name] = advert
                log.info(
                    "peer %s %s: %s %s %s at %s:%d",
                    advert.instance_id,
                    "updated" if old else "found",
                    advert.model,
                    advert.rank,
                    advert.role,
                    advert.host,
                    advert.control_port,
                )
            self._generation += 1
            self._cond.notify_all()

    # -- lifecycle

    def close(self) -> None:
        """Stop browsing; joins the threads it started and closes zeroconf. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        try:
            if self._sb is not None:
                self._sb.cancel()
        finally:
            try:
                if self._worker is not None:
                    self._events.put(None)
                    self._worker.join(self._resolve_timeout + 2.0)
                    if self._worker.is_alive():
                        log.warning("discovery resolver thread did not stop in time")
            finally:
                if self._zc is not None:
                    self._zc.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------------------- static peers


def format_peer(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (the inverse of :func:`static_peers`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_host(host: str) -> str:
    """Validate a bare host (IPv4, or DNS name); returns it. Raises ValueError with a reason."""
    if not host:
        raise ValueError("empty host")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOSTNAME_LABEL_RE.match(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is not a valid host name")
    return host


def _parse_entry(entry: str) -> tuple[str, int]:
    if entry.startswith("["):
        m = re.fullmatch(r"\[([^\[\]]*)\](?::(.*))?", entry, flags=re.DOTALL)
        if m is None:
            raise ValueError("bad bracketed IPv6 address")
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    else:
        host, sep, port_text = entry.rpartition(":")
        if not sep:
            raise ValueError("missing ':port'")
        if ":" in host:
            raise ValueError("IPv6 addresses must be written in brackets, e.g. [fd00::1]:5555")
        host = _parse_host(host)
    if port_text is None or port_text == "":
        raise ValueError("missing port")
    if not _PORT_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def static_peers(spec: str | None = None) -> list[tuple[str, int]]:
    """Parse a static peer list ``host:port,host:port,[v6]:port`` (default: ``$SWARM_PEERS``).

    Whitespace around entries and empty entries are ignored; duplicates are dropped (first kept);
    IPv6 hosts are returned without brackets. A bad entry raises :class:`StaticPeersError` naming it.
    ``dns:`` and ``dns-srv:`` entries are skipped here (swarm.dnspeers resolves them).
    """
    source = "static peer list"
    if spec is None:
        spec = os.environ.get(ENV_PEERS, "")
        source = ENV_PEERS
    peers: list[tuple[str, int]] = []
    for position, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        if not entry or entry.startswith(("dns:", "dns-srv:")):
            continue
        try:
            peer = _parse_entry(entry)
        except ValueError as exc:
            raise StaticPeersError(
                f"{source}: entry {position} {entry!r}: {exc} (expected host:port or [ipv6]:port)"
            ) from None
        if peer not in peers:
            peers.append(peer)
    return peers


def discover(
    key_digest: str | None,
    *,
    timeout: float,
    interface: str | None = None,
    static: str | None = None,
    mdns: bool = True,
    until: Callable[[list[Advert]], bool] | None = None,
    dns_server: str | None = None,
) -> list[Advert]:
    """One-shot discovery: browse mDNS for ``timeout`` seconds (or until ``until(peers)``), plus statics.

    ``static`` is a peer list as in :func:`static_peers` (default ``$SWARM_PEERS``); its entries come
    back as static adverts (``key_digest == ""``) after the mDNS ones, except those whose endpoint an
    mDNS advert already has; its ``dns:``/``dns-srv:`` entries are resolved once (``dns_server``).
    When mDNS cannot start (no multicast) and a static list is given, the
    static list alone is returned (with a warning); otherwise the error propagates.
    """
    _check_timeout(timeout, "timeout")
    statics = static_peers(static)
    if static:
        from swarm import dnspeers

        names = dnspeers.parse_dns_peers(static)
        statics += [a for a in dnspeers.resolve_all(names, server=dns_server) if a not in statics]
    found: list[Advert] = []
    if mdns:
        try:
            with Browser(key_digest=key_digest, interface=interface) as browser:
                found = browser.wait_for(until or (lambda _: False), timeout)
        except DiscoveryError as exc:
            if not statics:
                raise
            log.warning("mDNS discovery unavailable (%s); using the static peer list only", exc)
    known = {(addr, a.control_port) for a in found for addr in a.addresses}
    found.extend(Advert.static(h, p) for h, p in statics if (h, p) not in known)
    return found
