"""The `swarm` command line and the option schema: bad values give one line that names the flag or
variable (no traceback), and `swarm status` reads the same SWARM_* variables as a member (issue 13)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from swarm import cli
from swarm.node import Node, NodeConfig
from swarm.synthetic import synthetic_key, synthetic_tensors

LOOPBACK = ["--no-mdns", "--host", "127.0.0.1", "--duration", "0.1"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


Run = Callable[..., Result]


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`swarm ARGS` in this process (an uncaught exception fails the test: a traceback for a user),
    with only the given SWARM_* variables set."""

    def call(args: list[str], env: dict[str, str] | None = None) -> Result:
        for k in [k for k in os.environ if k.startswith("SWARM_")]:
            monkeypatch.delenv(k)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = cli.main(args)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (
            ["seed", "--synthetic", "1MB", "--piece-size", "-1", *LOOPBACK],
            {},
            "--piece-size='-1' is not valid",
        ),
        (
            ["seed", "--synthetic", "1MB", "--piece-size", "abc", *LOOPBACK],
            {},
            "--piece-size='abc' is not valid",
        ),
        (["seed", "--synthetic", "1MB", "--piece-size", "0", *LOOPBACK], {}, "--piece-size='0' is not valid"),
        (["seed", "--synthetic", "1MB", "--piece-size", "0.5", *LOOPBACK], {}, "not a whole number of bytes"),
        (["seed", "--synthetic", "abc", *LOOPBACK], {}, "--synthetic='abc' is not valid"),
        (["seed", "--synthetic", "-5", *LOOPBACK], {}, "--synthetic='-5' is not valid"),
        (["seed", "--synthetic", "1e15", *LOOPBACK], {}, "--synthetic='1e15' is not valid: more than"),
        (["seed", "--synthetic", "1MB", "--rate-cap", "abc", *LOOPBACK], {}, "--rate-cap='abc' is not valid"),
        (["seed", "--synthetic", "1MB", "--no-mdns"], {"SWARM_HOST": "300.1.1.1"}, "SWARM_HOST='300.1.1.1'"),
        (["seed", "--synthetic", "1MB", "--no-mdns"], {"SWARM_PORT": "1.5"}, "SWARM_PORT='1.5' is not valid"),
        (["seed", "--synthetic", "1MB", *LOOPBACK, "--duration", "x"], {}, "--duration='x' is not valid"),
        (["status", "--timeout", "-1", "--no-mdns"], {}, "--timeout='-1' is not valid"),
        (["status", "--no-mdns", "--peers", "nohost"], {}, "--peers='nohost' is not valid"),
    ],
)
def test_bad_values_are_one_line_errors(run: Run, args: list[str], env: dict[str, str], says: str) -> None:
    r = run(args, env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swarm: ") and says in lines[0], r.stderr
    assert "expected" in lines[0]


def test_rate_cap_2GB_is_accepted(run: Run) -> None:
    r = run(["seed", "--synthetic", "1MB", *LOOPBACK, "--port", "0"], {"SWARM_RATE_CAP": "2GB"})
    assert r.returncode == 0, r.stderr
    assert "seeding synthetic model" in r.stdout


@pytest.fixture
def token_seed() -> Iterator[Node]:
    size = 200_000
    cfg = NodeConfig(host="127.0.0.1", control_port=0, mdns=False, token="s3cret", piece_size=65536)
    with Node(synthetic_key(size), synthetic_tensors(size), cfg, complete=True) as node:
        yield node


def test_status_reads_token_and_mdns_from_the_environment(run: Run, token_seed: Node) -> None:
    # issue 13: `swarm status` ignored SWARM_TOKEN, SWARM_INTERFACE and SWARM_MDNS
    peers = f"127.0.0.1:{token_seed.control_port}"
    r = run(
        ["status", "--json", "--timeout", "0.5"],
        {"SWARM_PEERS": peers, "SWARM_TOKEN": "s3cret", "SWARM_MDNS": "0"},
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["instance"] for row in rows] == [token_seed.id]
    # without the token, the authenticated seed does not answer
    r = run(["status", "--json", "--timeout", "0.5"], {"SWARM_PEERS": peers, "SWARM_MDNS": "0"})
    assert r.returncode == 1


def test_status_reads_the_interface_from_the_environment(run: Run) -> None:
    r = run(["status", "--timeout", "0.5"], {"SWARM_INTERFACE": "nosuchif0"})
    assert r.returncode == 1 and "nosuchif0" in r.stderr and "Traceback" not in r.stderr
    # and SWARM_MDNS=0: no browsing, so the interface is never opened: only "nothing found"
    r = run(["status", "--timeout", "0.5"], {"SWARM_INTERFACE": "nosuchif0", "SWARM_MDNS": "0"})
    assert r.returncode == 1 and "nosuchif0" not in r.stderr and "no swarm member answered" in r.stderr
