"""Options of the `swarm` load format: `--model-loader-extra-config` JSON, environment variables as defaults.

Every option has one name in the JSON and one environment variable; the JSON wins over the environment,
the environment over the built-in default. An unknown key, a value of the wrong type, or a value out of
range raises `ConfigError` when vLLM creates the loader, i.e. at start-up, before anything is loaded.

No vLLM import here (unit-testable on its own). The node options are validated by `swarm.node.NodeConfig`
itself, so the loader and the `swarm` command line accept exactly the same values.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarm.errors import ConfigError

if TYPE_CHECKING:
    from swarm.node import NodeConfig

logger = logging.getLogger("vllm_plugin.options")

#: Node options: JSON key -> (environment variable, accepted JSON kind). Passed to NodeConfig.from_env.
NODE_OPTIONS: dict[str, tuple[str, str]] = {
    "token": ("SWARM_TOKEN", "str"),
    "token_file": ("SWARM_TOKEN_FILE", "str"),
    "peers": ("SWARM_PEERS", "peers"),
    "interface": ("SWARM_INTERFACE", "str"),
    "transport": ("SWARM_TRANSPORT", "str"),
    "piece_size": ("SWARM_PIECE_SIZE", "size"),
    "discovery_timeout_s": ("SWARM_DISCOVERY_TIMEOUT", "float"),
    "stall_timeout_s": ("SWARM_STALL_TIMEOUT", "float"),
    "deadline_s": ("SWARM_DEADLINE", "float"),
    "host": ("SWARM_HOST", "str"),
    "control_port": ("SWARM_PORT", "int"),
    "mdns": ("SWARM_MDNS", "bool"),
    "rate_cap": ("SWARM_RATE_CAP", "size"),
}

#: Options of the loader itself: JSON key -> (environment variable, kind, default).
LOADER_OPTIONS: dict[str, tuple[str, str, Any]] = {
    "model_id": ("SWARM_MODEL_ID", "str", None),
    "fallback": ("SWARM_FALLBACK", "bool", True),
    "serve": ("SWARM_SERVE", "bool", True),
    "verify": ("SWARM_VERIFY", "bool", True),
    "allow_open": ("SWARM_ALLOW_OPEN", "bool", False),
}

#: Keys passed through to vLLM's default loader when it loads from disk.
DISK_OPTIONS = ("enable_multithread_load", "num_threads", "enable_weights_track")

_KIND_TEXT = {
    "str": "a string",
    "peers": 'a string "host:port,host:port" or a list of "host:port" strings',
    "size": 'a number of bytes or a size string such as "64MiB"',
    "float": "a number of seconds",
    "int": "an integer",
    "bool": "true or false",
}


@dataclass(frozen=True)
class LoaderOptions:
    """Parsed options. `node` holds only the node options given explicitly (JSON or environment)."""

    node: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    fallback: bool = True
    serve: bool = True
    verify: bool = True
    allow_open: bool = False
    disk: dict[str, Any] = field(default_factory=dict)

    @property
    def piece_size_given(self) -> bool:
        return "piece_size" in self.node


def parse_options(extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> LoaderOptions:
    """Parse `--model-loader-extra-config` (already JSON-decoded by vLLM) over the environment."""
    env = os.environ if env is None else env
    extra = dict(extra or {})
    if not isinstance(extra, dict):
        raise ConfigError(f"--model-loader-extra-config must be a JSON object, got {type(extra).__name__}")
    known = set(NODE_OPTIONS) | set(LOADER_OPTIONS) | set(DISK_OPTIONS)
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} in --model-loader-extra-config "
            "for --load-format swarm",
            hint=f"known options: {', '.join(sorted(known))} (see docs/loader.md)",
        )
    node: dict[str, Any] = {}
    for key, (var, kind) in NODE_OPTIONS.items():
        if key in extra:
            node[key] = _json_value(key, extra[key], kind)
        elif env.get(var, "") != "":
            node[key] = _env_value(var, env[var], kind)
    loader: dict[str, Any] = {}
    for key, (var, kind, default) in LOADER_OPTIONS.items():
        if key in extra:
            loader[key] = _json_value(key, extra[key], kind)
        elif env.get(var, "") != "":
            loader[key] = _env_value(var, env[var], kind)
        else:
            loader[key] = default
    if loader["model_id"] is not None and not 0 < len(loader["model_id"]) <= 200:
        raise ConfigError("model_id must be 1 to 200 characters long")
    disk = {k: extra[k] for k in DISK_OPTIONS if k in extra}
    return LoaderOptions(node=node, disk=disk, **loader)


def _bad(where: str, value: Any, kind: str) -> ConfigError:
    return ConfigError(f"{where}={value!r:.100} is not valid: expected {_KIND_TEXT[kind]}")


def _json_value(key: str, value: Any, kind: str) -> Any:
    where = f"swarm option {key}"
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise _bad(where, value, kind)
        return value
    if kind == "peers":
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return ",".join(value)
        if isinstance(value, str) and value:
            return value
        raise _bad(where, value, kind)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(where, value, kind)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, value, kind)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{where}={value!r:.100} is not valid: expected a positive number of seconds")
        return float(value)
    if kind == "size":
        if isinstance(value, bool):
            raise _bad(where, value, kind)
        if isinstance(value, int):
            size = value
        elif isinstance(value, str):
            size = _size(where, value)
        else:
            raise _bad(where, value, kind)
        if size <= 0:
            raise ConfigError(f"{where}={value!r} is not valid: expected a positive size")
        return size
    raise AssertionError(kind)


def _env_value(var: str, raw: str, kind: str) -> Any:
    if kind in ("str", "peers"):
        return raw
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise _bad(var, raw, kind)
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise _bad(var, raw, kind) from None
    if kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise _bad(var, raw, kind) from None
        if not value > 0:
            raise ConfigError(f"{var}={raw!r} is not valid: expected a positive number of seconds")
        return value
    if kind == "size":
        size = _size(var, raw)
        if size <= 0:
            raise ConfigError(f"{var}={raw!r} is not valid: expected a positive size")
        return size
    raise AssertionError(kind)


def _size(where: str, text: str) -> int:
    """'64MiB', '512MB', '1GB', '4096' -> bytes (binary multiples for both spellings, as swarm does)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise _bad(where, text, "size") from None
    return int(value * mult)


def check_open_swarm(config: NodeConfig, allow_open: bool) -> None:
    """Refuse an open swarm (no token) that would listen beyond this host, unless `allow_open`; log
    loudly whenever the swarm is open. Call before the node starts (see docs/reliability.md, threat
    model: without a token, anyone who reaches the ports may join, read the weights, and deny service)."""
    if config.token:
        return
    where = config.host or config.interface or "0.0.0.0"
    try:
        loopback = where == "lo" or where == "localhost" or ipaddress.ip_address(where).is_loopback
    except ValueError:  # an interface name other than lo
        loopback = False
    if not loopback and not allow_open:
        raise ConfigError(
            f"the swarm is open (no token) and would listen on {where}, reachable from the network: "
            "anyone there could join it, read the weights and disturb loading",
            hint="set SWARM_TOKEN_FILE (or SWARM_TOKEN) to the same secret on every instance, or accept "
            'an open swarm on a trusted network with {"allow_open": true} (SWARM_ALLOW_OPEN=1)',
        )
    logger.warning(
        "vllm-swarm: the swarm is OPEN (no token) on %s: members are not authenticated; "
        "set SWARM_TOKEN_FILE on every instance to close it",
        where,
    )


def auto_piece_size(total_bytes: int) -> int:
    """The piece size used when none is given: 64 MiB, less for small models so that every rank has at
    least ~16 pieces to spread over its peers (a power of two, at least 64 KiB). A function of the
    manifest alone, so every instance of a swarm computes the same value."""
    size = 64 << 20
    while size > 64 << 10 and total_bytes < 16 * size:
        size //= 2
    return size
