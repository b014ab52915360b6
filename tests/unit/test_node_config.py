"""NodeConfig and the option schema (swarm.options): defaults, environment, overrides, one size
convention, one error style, and the docs table generated from the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm import options
from swarm.errors import ConfigError
from swarm.node import NodeConfig

ROOT = Path(__file__).resolve().parents[2]


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


def test_node_config_defaults_are_the_schemas() -> None:
    cfg = NodeConfig()
    for name in options.NODE_OPTIONS:
        if name != "piece_size":  # 0 in NodeConfig: the transport's default
            assert getattr(cfg, name) == options.default(name), name


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SWARM_PIECE_SIZE": "lots"}, "SWARM_PIECE_SIZE='lots' is not valid: not a size"),
        ({"SWARM_MDNS": "maybe"}, "SWARM_MDNS='maybe' is not valid"),
        ({"SWARM_TRANSPORT": "carrier-pigeon"}, "unknown transport 'carrier-pigeon'.*auto, tcp, ipc, nccl"),
        ({"SWARM_DEADLINE": "-1"}, "SWARM_DEADLINE='-1' is not valid: not a positive number"),
        ({"SWARM_DEADLINE": "nan"}, "SWARM_DEADLINE='nan'"),
        ({"SWARM_PORT": "70000"}, "SWARM_PORT='70000' is not valid: out of range"),
        # issue 13: SWARM_PORT=1.5 became port 1
        ({"SWARM_PORT": "1.5"}, "SWARM_PORT='1.5' is not valid: not a whole number"),
        # issue 13: a bad SWARM_HOST gave a traceback when binding
        ({"SWARM_HOST": "999.1.2.3"}, "SWARM_HOST='999.1.2.3' is not valid: not an IP address"),
        ({"SWARM_HOST": "not an address"}, "SWARM_HOST"),
        # issue 13: piece sizes 0 and 0.5 silently became the default
        ({"SWARM_PIECE_SIZE": "0"}, "SWARM_PIECE_SIZE='0' is not valid: less than"),
        ({"SWARM_PIECE_SIZE": "0.5"}, "not a whole number of bytes"),
        ({"SWARM_RATE_CAP": "abc"}, "SWARM_RATE_CAP='abc' is not valid: not a size"),
        ({"SWARM_PEERS": "host-without-port"}, "SWARM_PEERS=.*missing ':port'"),
        ({"SWARM_PEERS": "dns:bad..name:1"}, "not a valid DNS name"),
        ({"SWARM_PEERS": "dns:svc:99999"}, "port '99999'"),
        ({"SWARM_PEERS": ",".join(f"h{i}:1" for i in range(65))}, "more than 64 entries"),
        ({"SWARM_METRICS_PORT": "0"}, "SWARM_METRICS_PORT='0' is not valid: out of range 1..65535"),
        ({"SWARM_DNS_SERVER": "dns.example"}, "not an IP address"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        NodeConfig.from_env(env)
    assert "\n" not in str(e.value) and "expected" in str(e.value)  # says what to write instead


def test_bad_values_set_in_code_are_refused_too() -> None:
    for bad in ({"piece_size": -1}, {"control_port": 70000}, {"rate_cap": 0}, {"deadline_s": 0.0}):
        with pytest.raises(ConfigError):
            NodeConfig(**bad)  # type: ignore[arg-type]


def test_rate_cap_accepts_the_documented_example() -> None:
    # issue 13: SWARM_RATE_CAP=2GB (the example in docs/operations.md) was refused
    assert NodeConfig.from_env({"SWARM_RATE_CAP": "2GB"}).rate_cap == 2_000_000_000
    assert NodeConfig.from_env({"SWARM_RATE_CAP": "100MiB/s"}).rate_cap == 100 << 20


def test_token_file_is_read_and_a_missing_one_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert NodeConfig.from_env({"SWARM_TOKEN_FILE": str(f)}).token == "s3cret"
    with pytest.raises(ConfigError, match="not both"):  # two different secrets: say so, pick neither
        NodeConfig.from_env({"SWARM_TOKEN_FILE": str(f), "SWARM_TOKEN": "t"})
    with pytest.raises(ConfigError, match="cannot read the token file"):
        NodeConfig.from_env({"SWARM_TOKEN_FILE": str(tmp_path / "absent")})


def test_a_secret_is_never_echoed_in_an_error() -> None:
    with pytest.raises(ConfigError) as e:
        options.OPTIONS["token"].parse_json(12345678, "token")
    assert "12345678" not in str(e.value) and "<hidden>" in str(e.value)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown swarm option"):
        NodeConfig.from_env({}, colour="blue")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4KB", 4000),
        ("4kB", 4000),
        ("64MB", 64_000_000),
        ("64MiB", 64 << 20),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 << 29),
        ("2mb", 2_000_000),
        ("1e3", 1000),
    ],
)
def test_sizes_decimal_and_binary(text: str, value: int) -> None:
    assert options.parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "why"), [("1.5G", "ambiguous"), ("2XB", "unknown unit"), ("-5", "not a size")]
)
def test_sizes_without_an_explicit_unit_convention_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        options.parse_size(text)


def test_fmt_bytes_says_which_convention() -> None:
    assert options.fmt_bytes(64_000_000) == "64 MB"
    assert options.fmt_bytes(64 << 20) == "64 MiB"
    assert options.fmt_bytes(512) == "512 B"


def test_docs_table_is_generated_from_the_schema() -> None:
    """docs/operations.md carries the table `python -m swarm.options` prints; regenerate it with
    `python -m swarm.options --write docs/operations.md` after changing an option."""
    text = (ROOT / "docs" / "operations.md").read_text()
    assert options.DOCS_BEGIN in text, "docs/operations.md lost its generated options table"
    assert options.update_docs(text) == text, "docs/operations.md's options table differs from swarm.options"


def test_every_option_has_help_a_variable_and_a_flag_or_is_loader_only() -> None:
    for o in options.OPTIONS.values():
        assert o.help and o.env and o.env.startswith("SWARM_")
        assert (o.flag is None) == (o.scope == "loader"), o.name


def test_every_flag_in_the_table_is_a_flag_of_swarm_seed_and_fetch() -> None:
    from swarm import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("seed", "fetch"):
        flags = {f for a in sub.choices[command]._actions for f in a.option_strings}  # type: ignore[attr-defined]
        for o in options.OPTIONS.values():
            if o.flag:
                assert o.flag in flags, (command, o.flag)
