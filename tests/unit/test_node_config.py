"""NodeConfig: defaults, environment, overrides, and clear errors for bad values."""

from __future__ import annotations

import pytest

from swarm.errors import ConfigError
from swarm.node import NodeConfig, parse_size


def test_environment_then_overrides() -> None:
    env = {
        "SWARM_PEERS": "h:1",
        "SWARM_PIECE_SIZE": "8MiB",
        "SWARM_STALL_TIMEOUT": "2.5",
        "SWARM_MDNS": "off",
        "SWARM_PEX": "0",
    }
    cfg = NodeConfig.from_env(env)
    assert (cfg.peers, cfg.piece_size, cfg.stall_timeout_s, cfg.mdns) == ("h:1", 8 << 20, 2.5, False)
    assert cfg.pex is False and NodeConfig.from_env({}).pex is True
    assert NodeConfig.from_env(env, peers="x:2").peers == "x:2"
    assert NodeConfig.from_env({}).transport == "auto"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SWARM_PIECE_SIZE": "lots"}, "SWARM_PIECE_SIZE='lots'"),
        ({"SWARM_MDNS": "maybe"}, "SWARM_MDNS"),
        ({"SWARM_TRANSPORT": "carrier-pigeon"}, "unknown transport"),
        ({"SWARM_DEADLINE": "-1"}, "deadline_s must be > 0"),
        ({"SWARM_PORT": "70000"}, "control_port"),
    ],
)
def test_bad_values_fail_with_clear_messages(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        NodeConfig.from_env(env)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown swarm option"):
        NodeConfig.from_env({}, colour="blue")


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("4KB", 4096), ("64MiB", 64 << 20), ("1.5G", 3 << 29), ("2mb", 2 << 20)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
