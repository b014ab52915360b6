"""Options of the `swarm` load format: `--model-loader-extra-config` JSON over SWARM_* variables.

Every option is defined once, in swarm.options (name, type, default, unit, help; also the docs table):
the JSON key is the option's name, the variable its `SWARM_*`. JSON wins over the environment, the
environment over the default. An unknown key, a value of the wrong type, or a value out of range raises
`ConfigError` when vLLM creates the loader, i.e. at start-up, before anything is loaded; so does a bad
peer list (a `dns:` name is checked for its form here; resolving it is the node's job).

The loader's own options (`model_id`, `fallback`, `serve`, `verify`, and the `compile_cache*` ones)
are in the same schema with scope "loader"; the keys of vLLM's default loader (`DISK_OPTIONS`) pass
through for the disk path.
No vLLM import here (unit-testable on its own).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarm import options as schema
from swarm.errors import ConfigError
from swarm.manifest import DEFAULT_PIECE_SIZE, fitted_piece_size

if TYPE_CHECKING:
    from swarm.node import NodeConfig

logger = logging.getLogger("vllm_plugin.options")

#: Keys passed through to vLLM's default loader when it loads from disk.
DISK_OPTIONS = ("enable_multithread_load", "num_threads", "enable_weights_track")


@dataclass(frozen=True)
class LoaderOptions:
    """Parsed options. `node` holds only the node options given explicitly (JSON or environment)."""

    node: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    fallback: bool = True
    serve: bool = True
    verify: bool = True
    compile_cache: bool = schema.default("compile_cache")
    compile_cache_timeout_s: float = schema.default("compile_cache_timeout_s")
    compile_cache_max: int = schema.default("compile_cache_max")
    disk: dict[str, Any] = field(default_factory=dict)

    @property
    def piece_size_given(self) -> bool:
        return "piece_size" in self.node

    def node_overrides(self, *, rank: int, piece_size: int | None = None) -> dict[str, Any]:
        """The keyword arguments for `NodeConfig.from_env(env={}, model_name=..., **these)` of one rank:
        the options given, the automatic piece size unless one was given, and the rank as port offset
        (rank r listens on control_port + r, or the default port + r, and serves metrics on
        metrics_port + r)."""
        values = dict(self.node)
        if piece_size is not None and "piece_size" not in values:
            values["piece_size"] = piece_size
        values["port_offset"] = rank
        return values


def parse_options(extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> LoaderOptions:
    """Parse `--model-loader-extra-config` (already JSON-decoded by vLLM) over the environment."""
    env = os.environ if env is None else env
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError(f"--model-loader-extra-config must be a JSON object, got {type(extra).__name__}")
    extra = dict(extra or {})
    known = set(schema.NODE_OPTIONS) | set(schema.LOADER_OPTIONS) | set(DISK_OPTIONS)
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} in --model-loader-extra-config "
            "for --load-format swarm",
            hint=f"known options: {', '.join(sorted(known))} (see docs/operations.md)",
        )
    given = {k: v for k, v in extra.items() if k not in DISK_OPTIONS}
    node = schema.from_env(schema.NODE_OPTIONS, env) | schema.from_json(
        {k: v for k, v in given.items() if k in schema.NODE_OPTIONS}
    )
    loader = {name: schema.default(name) for name in schema.LOADER_OPTIONS}
    loader |= schema.from_env(schema.LOADER_OPTIONS, env)
    loader |= schema.from_json({k: v for k, v in given.items() if k in schema.LOADER_OPTIONS})
    disk = {k: extra[k] for k in DISK_OPTIONS if k in extra}
    return LoaderOptions(node=node, disk=disk, **loader)


def check_open_swarm(config: NodeConfig) -> None:
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
    if not loopback and not config.allow_open:
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
    return fitted_piece_size(total_bytes, DEFAULT_PIECE_SIZE)
