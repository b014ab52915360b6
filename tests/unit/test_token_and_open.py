"""The cluster token from a file (SWARM_TOKEN_FILE, `token_file`), and the loader's refusal of an open
swarm (no token) that would listen beyond this host unless `allow_open`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from swarm.errors import ConfigError
from swarm.node import NodeConfig
from vllm_plugin.options import check_open_swarm, parse_options


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "swarm-token"
    path.write_text("s3cret-token\n")
    return str(path)


def test_token_file_read_by_the_node_config(token_file: str) -> None:
    config = NodeConfig.from_env(env={"SWARM_TOKEN_FILE": token_file})
    assert config.token == "s3cret-token"
    assert "s3cret" not in repr(config)  # the secret stays out of printed configurations
    assert NodeConfig(token_file=token_file).token == "s3cret-token"


def test_token_file_errors_are_clear(token_file: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        NodeConfig.from_env(env={"SWARM_TOKEN_FILE": token_file, "SWARM_TOKEN": "other"})
    with pytest.raises(ConfigError, match="cannot read the token file"):
        NodeConfig(token_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        NodeConfig(token_file=str(tmp_path / "empty"))


def test_loader_options_take_a_token_file(token_file: str) -> None:
    for opts in (
        parse_options({"token_file": token_file}, env={}),
        parse_options({}, env={"SWARM_TOKEN_FILE": token_file}),
    ):
        assert NodeConfig.from_env(env={}, **opts.node).token == "s3cret-token"


def test_allow_open_option() -> None:
    assert "allow_open" not in parse_options({}, env={}).node
    assert parse_options({"allow_open": True}, env={}).node["allow_open"] is True
    assert parse_options({}, env={"SWARM_ALLOW_OPEN": "1"}).node["allow_open"] is True


@pytest.mark.parametrize(
    ("where", "refused"),
    [
        ({}, True),  # binds 0.0.0.0
        ({"host": "0.0.0.0"}, True),
        ({"host": "10.1.2.3"}, True),
        ({"interface": "eth0"}, True),
        ({"host": "127.0.0.1"}, False),
        ({"host": "::1"}, False),
        ({"interface": "lo"}, False),
    ],
)
def test_open_swarm_beyond_loopback_needs_allow_open(
    where: dict[str, str], refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    config = NodeConfig(**where)
    with caplog.at_level(logging.WARNING):
        if refused:
            with pytest.raises(ConfigError, match="open"):
                check_open_swarm(config)
        else:
            check_open_swarm(config)
        check_open_swarm(NodeConfig(**where, allow_open=True))
    assert "OPEN" in caplog.text  # said loudly whenever it runs open


def test_a_token_closes_the_swarm(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_open_swarm(NodeConfig(token="t"))
    assert "OPEN" not in caplog.text
