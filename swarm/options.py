"""Every option of vllm-swarm, defined once: name, type, default, unit, help; and the one parser for them.

An option can be given in three places, all parsed here with the same rules and the same errors:
- a `SWARM_*` environment variable (text);
- a `swarm` command-line flag (text; `add_arguments` builds the flags from this schema);
- a key of vLLM's `--model-loader-extra-config` (JSON: typed values; vllm_plugin.options maps onto this).
Precedence: command line or JSON > environment > default (an empty variable counts as unset). A bad
value raises `ConfigError` naming where it came from, what was wrong and what is expected, e.g.
`SWARM_RATE_CAP='2XB' is not valid: unknown unit 'XB' (expected a rate such as 2GB (10^9 bytes/s) ...)`.

Sizes and rates have explicit units in one convention: decimal as vLLM prints them (`64MB` = 64 x 10^6
bytes, `2GB` = 2 x 10^9), binary with an `i` (`64MiB` = 2^26 bytes), a bare number is bytes; a rate may
end in `/s`. A size must come out as a whole number of bytes within the option's bounds.

The table of docs/operations.md is generated from `OPTIONS` (`python -m swarm.options`); a unit test
fails when the two differ. No vLLM import here, nor anything heavy: `swarm` works without vLLM.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from swarm.errors import ConfigError

#: The control port a member listens on unless told otherwise (rank r of a vLLM instance: + r), so that a
#: Kubernetes Service or a firewall rule can name it. Taken (several members on one host): a random port.
DEFAULT_CONTROL_PORT = 47100
#: The data paths a member can be limited to ("auto": the best per pair; swarm.transport.auto).
TRANSPORTS = ("auto", "tcp", "ipc", "nccl")

_DECIMAL = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS = _DECIMAL | _BINARY
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?(?:[eE][+]?[0-9]+)?)\s*([A-Za-z]*)")


class Invalid(ValueError):
    """Why a value is not valid (becomes the middle of the ConfigError's message)."""


def fmt_bytes(n: float) -> str:
    """Bytes in the convention of this module: 64000000 -> '64 MB', 67108864 -> '64 MiB', exact where
    either convention makes a whole number, else decimal with 3 digits."""
    n = int(n)
    decimal = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
    binary = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    for units in (decimal, binary):
        for unit, div in units:
            if n >= div and n % div == 0:
                return f"{n // div} {unit}"
    for unit, div in decimal:
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n} B"


def parse_size(text: str, *, rate: bool = False) -> int:
    """'64MB' -> 64_000_000, '64MiB' -> 67_108_864, '4096' -> 4096, '1.5GB' -> 1_500_000_000; a rate
    may end in '/s'. Raises Invalid (a ValueError) with the reason."""
    t = text.strip()
    if rate and t.lower().endswith("/s"):
        t = t[:-2].rstrip()
    m = _SIZE_RE.fullmatch(t)
    if m is None:
        raise Invalid("not a size")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        if unit in ("k", "m", "g", "t"):
            raise Invalid(
                f"ambiguous unit {m.group(2)!r}: write {m.group(2).upper()}B or {m.group(2).upper()}iB"
            )
        raise Invalid(f"unknown unit {m.group(2)!r}")
    try:
        value = Decimal(number) * _UNITS[unit]
    except InvalidOperation:
        raise Invalid("not a size") from None
    if value != value.to_integral_value():
        raise Invalid("not a whole number of bytes")
    return int(value)


# --- kinds of values --------------------------------------------------------------------------------


class Kind:
    """How one type of option is read from text (environment, command line) and from JSON."""

    expect = ""
    unit = ""

    def from_text(self, text: str) -> Any:
        raise NotImplementedError

    def from_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.from_text(value)
        raise Invalid("wrong type")

    def check(self, value: Any) -> None:
        """Range checks on an already typed value (also used by NodeConfig for values set in code)."""


@dataclass(frozen=True)
class Text(Kind):
    choices: tuple[str, ...] = ()
    max_len: int = 1024
    expect_text: str = "a non-empty string"
    #: what a value names, for "unknown transport 'x'"
    noun: str = "value"

    @property
    def expect(self) -> str:  # type: ignore[override]
        return f"one of: {', '.join(self.choices)}" if self.choices else self.expect_text

    def from_text(self, text: str) -> str:
        self.check(text)
        return text

    def check(self, value: Any) -> None:
        if not isinstance(value, str) or not value:
            raise Invalid("empty" if value == "" else "wrong type")
        if len(value) > self.max_len:
            raise Invalid(f"longer than {self.max_len} characters")
        if self.choices and value not in self.choices:
            raise Invalid(f"unknown {self.noun} {value!r}")


@dataclass(frozen=True)
class Flag(Kind):
    expect = "true or false (1/0, yes/no, on/off in the environment)"

    def from_text(self, text: str) -> bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise Invalid("not a boolean")

    def from_json(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid("not a boolean")
        return value

    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise Invalid("not a boolean")


@dataclass(frozen=True)
class Port(Kind):
    low: int = 1
    expect_text: str = "a TCP port number 1..65535"

    @property
    def expect(self) -> str:  # type: ignore[override]
        return self.expect_text

    def from_text(self, text: str) -> int:
        t = text.strip()
        if not t.isdigit():
            raise Invalid("not a whole number")
        value = int(t)
        self.check(value)
        return value

    def from_json(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("not an integer")
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= 65535:
            raise Invalid(f"out of range {self.low}..65535")


@dataclass(frozen=True)
class Seconds(Kind):
    maximum: float = 30 * 86400.0
    unit = "s"

    @property
    def expect(self) -> str:  # type: ignore[override]
        return f"a positive number of seconds, at most {self.maximum:.0f}"

    def from_text(self, text: str) -> float:
        t = text.strip().removesuffix("s")
        try:
            value = float(t)
        except ValueError:
            raise Invalid("not a number") from None
        self.check(value)
        return value

    def from_json(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid("not a number")
        self.check(float(value))
        return float(value)

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid("not a number")
        if not math.isfinite(value) or value <= 0:
            raise Invalid("not a positive number")
        if value > self.maximum:
            raise Invalid(f"more than {self.maximum:.0f} s")


@dataclass(frozen=True)
class Size(Kind):
    minimum: int = 1
    maximum: int = 2**50
    rate: bool = False

    @property
    def unit(self) -> str:  # type: ignore[override]
        return "bytes/s" if self.rate else "bytes"

    @property
    def expect(self) -> str:  # type: ignore[override]
        what = "a rate such as 2GB (2 x 10^9 bytes/s) or 2GiB/s" if self.rate else "a size such as 64MB"
        tail = "" if self.rate else " (64 x 10^6 bytes) or 64MiB (2^26 bytes)"
        return f"{what}{tail}, from {fmt_bytes(self.minimum)} to {fmt_bytes(self.maximum)}"

    def from_text(self, text: str) -> int:
        value = parse_size(text, rate=self.rate)
        self.check(value)
        return value

    def from_json(self, value: Any) -> int:
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid("wrong type")
        if isinstance(value, float) and not value.is_integer():
            raise Invalid("not a whole number of bytes")
        self.check(int(value))
        return int(value)

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid("wrong type")
        if value < self.minimum:
            raise Invalid(f"less than {fmt_bytes(self.minimum)}")
        if value > self.maximum:
            raise Invalid(f"more than {fmt_bytes(self.maximum)}")


@dataclass(frozen=True)
class Address(Kind):
    """An IP address to bind to (`with_port`: `addr`, `addr:port` or `[v6]:port` of a server)."""

    with_port: bool = False

    @property
    def expect(self) -> str:  # type: ignore[override]
        if self.with_port:
            return "an IP address, optionally with :port (e.g. 10.96.0.10 or 127.0.0.1:5353)"
        return "an IP address of this machine (e.g. 0.0.0.0, 10.0.0.5 or ::)"

    def from_text(self, text: str) -> str:
        self.check(text)
        return text.strip()

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise Invalid("wrong type")
        if self.with_port:
            from swarm.dnspeers import DnsPeersError, parse_server

            try:
                parse_server(value)
            except DnsPeersError as e:
                raise Invalid(str(e)) from None
            return
        try:
            ipaddress.ip_address(value.strip())
        except ValueError:
            raise Invalid("not an IP address") from None


@dataclass(frozen=True)
class Peers(Kind):
    expect = (
        "a comma-separated list of host:port, [ipv6]:port, dns:NAME[:PORT] (every A/AAAA record of NAME) "
        'or dns-srv:NAME (its SRV records); in JSON also a list of such strings, e.g. ["10.0.0.5:47100"]'
    )

    max_entries: int = 64

    def from_text(self, text: str) -> str:
        from swarm import discovery, dnspeers

        if text.count(",") >= self.max_entries or len(text) > 16 * 1024:
            raise Invalid(f"more than {self.max_entries} entries")

        try:
            dnspeers.parse_dns_peers(text)
            discovery.static_peers(text)
        except ValueError as e:  # StaticPeersError and DnsPeersError are ValueErrors
            raise Invalid(str(e)) from None
        if not text.strip(" ,"):
            raise Invalid("no peer in the list")
        return ",".join(e.strip() for e in text.split(",") if e.strip())

    def from_json(self, value: Any) -> str:
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) and v for v in value):
                raise Invalid("not a list of peer strings")
            return self.from_text(",".join(value))
        text: str = super().from_json(value)
        return text

    def check(self, value: Any) -> None:
        if value is not None:
            self.from_text(value)


# --- the schema -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option. `name` is the NodeConfig field and the JSON key; `env` its variable; `flag` its
    command-line flag (`--no-x` for a switch that turns a default-true flag off)."""

    name: str
    kind: Kind
    default: Any
    help: str
    env: str | None = None
    flag: str | None = None
    #: "node" (NodeConfig, every front end), "loader" (vLLM only) or "cli" (the `swarm` command only)
    scope: str = "node"
    #: the default as the docs say it, where the value alone does not (None: unset)
    default_text: str | None = None
    secret: bool = False

    def parse_text(self, text: str, where: str) -> Any:
        try:
            return self.kind.from_text(text)
        except Invalid as e:
            raise self._error(where, text, e) from None

    def parse_json(self, value: Any, where: str) -> Any:
        try:
            return self.kind.from_json(value)
        except Invalid as e:
            raise self._error(where, value, e) from None

    def check(self, value: Any, where: str) -> None:
        if value is None:
            return
        try:
            self.kind.check(value)
        except Invalid as e:
            raise self._error(where, value, e) from None

    def _error(self, where: str, value: Any, e: Invalid) -> ConfigError:
        shown = "<hidden>" if self.secret else f"{value!r:.120}"
        return ConfigError(f"{where}={shown} is not valid: {e}", hint=f"expected {self.kind.expect}")

    @property
    def docs_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return "`true`" if self.default else "`false`"
        if isinstance(self.default, float):
            return f"`{self.default:g}`"
        return f"`{self.default}`"


_SECONDS = Seconds()
_OPTIONS = [
    Option("token", Text(max_len=4096), None, "cluster token: every link runs an authenticated session "
           "(no recorded frame can be replayed) and the data port is challenge-checked; without one the "
           "swarm is open to its LAN (logged; threat model in docs/reliability.md). Prefer `token_file`",
           env="SWARM_TOKEN", flag="--token", secret=True),
    Option("token_file", Text(expect_text="a path to a file holding the token"), None,
           "file holding the cluster token (e.g. a mounted Kubernetes Secret), so the secret never appears "
           "in command lines or vLLM's printed arguments", env="SWARM_TOKEN_FILE", flag="--token-file"),
    Option("allow_open", Flag(), False, "vLLM loader: run an open swarm (no token) on an interface other "
           "than loopback; without it that is refused at start-up",
           env="SWARM_ALLOW_OPEN", flag="--allow-open"),
    Option("peers", Peers(), None, "peers to dial besides mDNS: `host:port`, `[v6addr]:port`, "
           "`dns:NAME[:PORT]` (every A/AAAA record of NAME, re-resolved; e.g. a headless Service), "
           "`dns-srv:NAME` (SRV records); one reachable member is enough (peers share their peer lists)",
           env="SWARM_PEERS", flag="--peers"),
    Option("dns_interval_s", Seconds(maximum=3600.0), 10.0, "seconds between re-resolutions of `dns:` "
           "and `dns-srv:` peers", env="SWARM_DNS_INTERVAL", flag="--dns-interval"),
    Option("dns_server", Address(with_port=True), None,
           "DNS server (`host` or `host:port`) for `dns:` peers instead of the system's resolver",
           env="SWARM_DNS_SERVER", flag="--dns-server", default_text="the system's (`/etc/resolv.conf`)"),
    Option("interface", Text(), None, "the interface (name or address) to bind and advertise on",
           env="SWARM_INTERFACE", flag="--interface", default_text="all usable"),
    Option("mdns", Flag(), True, "mDNS discovery and advertising (off: static and DNS peers only)",
           env="SWARM_MDNS", flag="--no-mdns"),
    Option("pex", Flag(), True, "peer exchange: dial the peers that peers list in their Hello",
           env="SWARM_PEX", flag="--no-pex"),
    Option("host", Address(), None, "address to bind the control and data ports to",
           env="SWARM_HOST", flag="--host", default_text="all addresses (`0.0.0.0`)"),
    Option("control_port", Port(low=0, expect_text="a TCP port number 0..65535 (0: random)"), None,
           "control port (rank r of a vLLM instance: + r); the data port is random and travels in Hello",
           env="SWARM_PORT", flag="--port",
           default_text=f"`{DEFAULT_CONTROL_PORT}`, a random port if taken"),
    Option("metrics_port", Port(), None, "port of this node's Prometheus `/metrics` (rank r: + r)",
           env="SWARM_METRICS_PORT", flag="--metrics-port", default_text="off"),
    Option("transport", Text(choices=TRANSPORTS, noun="transport"), "auto", "`auto`: every path this "
           "member can use, the best one chosen per pair of members (CUDA IPC on one host between GPUs, "
           "NCCL between GPUs that IPC cannot join, TCP otherwise; `swarm status` shows each pair's "
           "path); or `tcp`, `ipc`, `nccl` to force one", env="SWARM_TRANSPORT", flag="--transport"),
    Option("piece_size", Size(minimum=1024, maximum=2**32), None, "bytes per piece; all members of a swarm "
           "must agree (it is part of the manifest): a swarm that mixes host-memory and GPU members needs "
           "one piece size (and one checksum algorithm) for all", env="SWARM_PIECE_SIZE", flag="--piece-size",
           default_text="64 MiB, 256 MiB with GPU tensors; the vLLM loader: less for small models"),
    Option("discovery_timeout_s", _SECONDS, 5.0, "seconds to find a usable peer before giving up "
           "(`NoSeedError`; the vLLM loader then loads from disk)", env="SWARM_DISCOVERY_TIMEOUT",
           flag="--discovery-timeout"),
    Option("stall_timeout_s", _SECONDS, 30.0, "seconds without a new piece before `StallError`",
           env="SWARM_STALL_TIMEOUT", flag="--stall-timeout"),
    Option("deadline_s", _SECONDS, 600.0, "seconds a whole fetch may take", env="SWARM_DEADLINE",
           flag="--deadline"),
    Option("rate_cap", Size(rate=True), None, "bytes per second a node uploads at most, e.g. `2GB` "
           "(2 x 10^9 B/s), to spare links shared with inference traffic", env="SWARM_RATE_CAP",
           flag="--rate-cap", default_text="unlimited"),
    # vLLM loader only
    Option("model_id", Text(max_len=200), None, "the NAME part of the model identity (docs/loader.md)",
           env="SWARM_MODEL_ID", scope="loader", default_text="the model directory's name"),
    Option("fallback", Flag(), True, "load from disk when the swarm cannot provide the weights; `false` "
           "fails start-up instead", env="SWARM_FALLBACK", scope="loader"),
    Option("serve", Flag(), True, "keep serving pieces after loading", env="SWARM_SERVE", scope="loader"),
    Option("verify", Flag(), True, "check after vLLM's post-processing that the served bytes are unchanged",
           env="SWARM_VERIFY", scope="loader"),
    Option("compile_cache", Flag(), True, "carry vLLM's compile cache: fetch it before vLLM compiles, and "
           "publish it once compiled (docs/loader.md)", env="SWARM_COMPILE_CACHE", scope="loader"),
    Option("compile_cache_timeout_s", Seconds(maximum=600.0), 3.0, "seconds to look for a published compile "
           "cache (beside the weights' fetch) before vLLM compiles without it",
           env="SWARM_COMPILE_CACHE_TIMEOUT", scope="loader"),
    Option("compile_cache_max", Size(minimum=1, maximum=2**40), 2 * 10**9, "the largest compile cache "
           "fetched or published; a larger one is refused before its archive is fetched",
           env="SWARM_COMPILE_CACHE_MAX", scope="loader", default_text="`2GB`"),
]  # fmt: skip

#: Every option of the node and the loader, by name (the JSON key).
OPTIONS: dict[str, Option] = {o.name: o for o in _OPTIONS}
NODE_OPTIONS = tuple(o.name for o in _OPTIONS if o.scope == "node")
LOADER_OPTIONS = tuple(o.name for o in _OPTIONS if o.scope == "loader")


def default(name: str) -> Any:
    """The default of option `name` (NodeConfig takes its field defaults from here)."""
    return OPTIONS[name].default


# --- parsing ----------------------------------------------------------------------------------------


def from_env(names: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options of `names` set in the environment (an empty variable counts as unset)."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for name in names:
        opt = OPTIONS[name]
        if opt.env and env.get(opt.env, "") != "":
            out[name] = opt.parse_text(env[opt.env], opt.env)
    return out


def from_json(values: Mapping[str, Any], where: str = "--model-loader-extra-config") -> dict[str, Any]:
    """Typed values (a JSON object); unknown keys are the caller's business."""
    return {k: OPTIONS[k].parse_json(v, f"{where} {k}") for k, v in values.items()}


def check(name: str, value: Any) -> None:
    """Range-check a value set in code (NodeConfig's fields)."""
    OPTIONS[name].check(value, name)


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add the command-line flags of `names`; values stay text until `from_args` parses them, so that
    a bad value gives the same one-line error as a bad environment variable."""
    for name in names:
        opt = OPTIONS[name]
        assert opt.flag is not None, name
        env = f"; {opt.env}" if opt.env else ""
        if isinstance(opt.kind, Flag):
            const = not opt.flag.startswith("--no-")
            text = opt.help if const else f"turn off {opt.help}"
            parser.add_argument(opt.flag, dest=name, action="store_const", const=const, default=None,
                                help=f"{text}{env}")  # fmt: skip
        else:
            parser.add_argument(opt.flag, dest=name, default=None, metavar=_metavar(opt),
                                help=f"{opt.help} (default: {_plain(opt.docs_default)}{env})")  # fmt: skip


def from_cli(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options of `names` given on the command line (the environment is NodeConfig.from_env's)."""
    out: dict[str, Any] = {}
    for name in names:
        raw = getattr(args, name, None)
        if raw is None:
            continue
        opt = OPTIONS[name]
        out[name] = raw if isinstance(raw, bool) else opt.parse_text(raw, str(opt.flag))
    return out


def cli_value(kind: Kind, text: str, flag: str) -> Any:
    """Parse a value of a command-line-only flag (a synthetic model's size, a duration) the same way."""
    return Option(flag, kind, None, "").parse_text(text, flag)


def _metavar(opt: Option) -> str:
    kinds = {Size: "SIZE", Seconds: "SECONDS", Port: "PORT", Peers: "PEERS", Address: "ADDRESS"}
    return kinds.get(type(opt.kind), "VALUE")


def _plain(text: str) -> str:
    return text.replace("`", "")


# --- the docs table ---------------------------------------------------------------------------------

DOCS_BEGIN = "<!-- options table: generated by `python -m swarm.options`; do not edit by hand -->"
DOCS_END = "<!-- end of options table -->"


def markdown_table() -> str:
    rows = [
        "| option (JSON key) | environment | `swarm` flag | unit | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in _OPTIONS:
        flag = f"`{o.flag}`" if o.flag else "(vLLM only)"
        rows.append(f"| `{o.name}` | `{o.env}` | {flag} | {o.kind.unit} | {o.docs_default} | {o.help} |")
    return "\n".join(rows)


def docs_section() -> str:
    return f"{DOCS_BEGIN}\n{markdown_table()}\n{DOCS_END}"


def update_docs(text: str) -> str:
    """`text` (docs/operations.md) with its generated table replaced by the current one."""
    begin, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    return text[:begin] + docs_section() + text[end:]


def main(argv: list[str] | None = None) -> int:
    """`python -m swarm.options [--write docs/operations.md]`: print (or rewrite in place) the table."""
    p = argparse.ArgumentParser(prog="python -m swarm.options")
    p.add_argument("--write", metavar="FILE", help="replace the generated table in FILE")
    a = p.parse_args(argv)
    if a.write:
        with open(a.write, encoding="utf-8") as f:
            text = f.read()
        with open(a.write, "w", encoding="utf-8") as f:
            f.write(update_docs(text))
    else:
        print(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
