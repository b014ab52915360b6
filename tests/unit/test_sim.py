"""Tests of the simulator: scenarios, lower bounds, baselines, the swarm engine and the CLI.

The swarm runs here use reduced sizes (N and k) so that the file stays within a few seconds of CPU;
docs/simulation.md shows the full sizes and the command that made them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim import baselines
from sim.engine import SwarmSim
from sim.run import run_grid, run_one
from sim.scenario import CALIBRATIONS, binomial_pipeline_bound, build, lower_bound, piece_sizes

H200 = CALIBRATIONS["h200"]
ROOT = Path(__file__).resolve().parents[2]


def scenario(name: str, n: int, pieces: int = 200, **kw: float) -> object:
    return build(
        name,
        n,
        model_bytes=H200.model_bytes,
        pieces=pieces,
        bandwidth=H200.bandwidth,
        latency=H200.latency,
        **kw,  # type: ignore[arg-type]
    )


def one_copy(sc: object) -> float:
    return sc.model_bytes / sc.bandwidth  # type: ignore[attr-defined, no-any-return]


# --- scenarios and bounds ---------------------------------------------------------------------------


def test_piece_sizes_cover_the_model() -> None:
    assert piece_sizes(10, 3) == (4, 4, 2)
    assert piece_sizes(9, 3) == (3, 3, 3)
    assert sum(piece_sizes(16 * 10**9, 1000)) == 16 * 10**9


def test_binomial_pipeline_bound() -> None:
    # (k + ceil(log2(N+1)) - 1) * c / B
    assert binomial_pipeline_bound(1, 1000, 1.0, 1.0) == 1000
    assert binomial_pipeline_bound(1000, 1000, 1.0, 1.0) == 1009
    assert binomial_pipeline_bound(3, 1, 2.0, 1.0) == 4.0  # whole model: 2 doublings


def test_lower_bound_of_each_scenario() -> None:
    sc = scenario("together", 1000, pieces=1000)
    assert lower_bound(sc) == pytest.approx(1009 / 1000 * one_copy(sc))  # type: ignore[arg-type]
    st = scenario("staggered", 10)
    assert lower_bound(st) == pytest.approx((9 * 2 / 10 + 1) * one_copy(st))  # last arrival + a copy
    het = scenario("hetero", 50)
    assert lower_bound(het) == pytest.approx(one_copy(het) / 0.2)  # a slow receiver's own downlink
    # two seeds, one fails at 0.3 T: the survivor must still send 0.7 of the model... from t = 0
    sf = scenario("seedfail", 10)
    assert lower_bound(sf) >= one_copy(sf) * 0.999  # type: ignore[operator]


# --- baselines --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 10, 100])
def test_naive_grows_linearly(n: int) -> None:
    sc = scenario("together", n)
    t = max(baselines.naive(sc))  # type: ignore[arg-type, type-var]
    assert t == pytest.approx(n * one_copy(sc), rel=1e-3)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000])
def test_binomial_takes_log2_copies(n: int) -> None:
    sc = scenario("together", n)
    t = max(baselines.binomial(sc))  # type: ignore[arg-type, type-var]
    assert t == pytest.approx(math.ceil(math.log2(n + 1)) * one_copy(sc), rel=1e-3)


def test_chain_is_pipelined() -> None:
    sc = scenario("together", 10, pieces=100)
    t = max(baselines.chain(sc))  # type: ignore[arg-type, type-var]
    c = one_copy(sc) / 100
    assert t == pytest.approx((100 + 10 - 1) * c + 10 * H200.latency, rel=1e-6)
    assert baselines.chain(scenario("seedfail", 3)) is None  # a chain does not survive failures


def test_naive_restarts_when_its_seed_fails() -> None:
    sc = scenario("seedfail", 1)
    (t,) = baselines.naive(sc)
    assert t == pytest.approx(1.3 * one_copy(sc), rel=1e-3)


# --- the swarm --------------------------------------------------------------------------------------


def test_swarm_of_one_is_one_copy() -> None:
    sc = scenario("together", 1)
    r = run_one("swarm", sc)  # type: ignore[arg-type]
    assert r.ratio is not None and 1.0 <= r.ratio < 1.02


def test_swarm_is_deterministic() -> None:
    sc = scenario("together", 12, pieces=60)
    a = SwarmSim(sc, seed=3).run()  # type: ignore[arg-type]
    b = SwarmSim(sc, seed=3).run()  # type: ignore[arg-type]
    assert a.done_at == b.done_at and a.events == b.events


def test_swarm_survives_a_seed_failure() -> None:
    sc = scenario("seedfail", 20, pieces=100)
    r = run_one("swarm", sc)  # type: ignore[arg-type]
    assert r.unfinished == 0
    assert r.ratio is not None and r.ratio < 2.0


def test_swarm_names_the_pieces_nobody_holds_when_the_only_seed_dies() -> None:
    sc = scenario("together", 5, pieces=100)
    nodes = sc.nodes  # type: ignore[attr-defined]
    sc = dataclasses.replace(
        sc, nodes=(dataclasses.replace(nodes[0], fail_at=0.05 * one_copy(sc)), *nodes[1:])
    )  # type: ignore[type-var]
    r = run_one("swarm", sc)  # type: ignore[arg-type]
    assert r.unfinished == 5
    assert r.stalled_pieces and r.time_s == math.inf
    assert len(r.stalled_pieces) > 50  # it died after handing out about 5 pieces


# --- the targets, at reduced N ------------------------------------------------------------------------


def _together(n: int) -> tuple[float, float]:
    r = run_one("swarm", scenario("together", n, pieces=250))  # type: ignore[arg-type]
    assert r.time_s is not None and r.ratio is not None
    return r.time_s, r.ratio


def test_target_together_within_1_25_of_the_bound_and_1_5_of_one_receiver() -> None:
    # the targets at a reduced size (N = 1000 with 1,000 pieces: docs/simulation.md); fewer,
    # larger pieces make the same target harder (each hop costs a larger share of the model)
    one, _ = _together(1)
    many, ratio = _together(64)
    assert ratio <= 1.25  # 1.208 with the scheduler's defaults (1.19-1.21 with other seeds)
    assert many <= 1.5 * one


@pytest.mark.parametrize("name", ["staggered", "hetero"])
def test_target_swarm_never_slower_than_binomial(name: str) -> None:
    sc = scenario(name, 32, pieces=100)
    swarm = run_one("swarm", sc)  # type: ignore[arg-type]
    binom = run_one("binomial", sc)  # type: ignore[arg-type]
    assert swarm.time_s is not None and binom.time_s is not None
    assert swarm.time_s <= binom.time_s
    assert swarm.mean_load_s is not None and binom.mean_load_s is not None
    assert swarm.mean_load_s <= binom.mean_load_s


# --- the command line -------------------------------------------------------------------------------


def test_cli_json_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "t.png"
    out = subprocess.run(
        [sys.executable, "-m", "sim", "--nodes", "1,3", "--pieces", "50", "--json", "--plot", str(png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    records = json.loads(out)
    assert {r["strategy"] for r in records} == {"naive", "binomial", "chain", "swarm"}
    for r in records:
        assert {"strategy", "nodes", "time_s", "lower_bound_s", "ratio"} <= set(r)
        assert r["ratio"] == pytest.approx(r["time_s"] / r["lower_bound_s"])
    assert png.stat().st_size > 1000


def test_grid_in_processes_gives_the_same_records_in_the_same_order() -> None:
    kw = dict(model_bytes=H200.model_bytes, pieces=40, bandwidth=H200.bandwidth, latency=H200.latency)
    one = run_grid(["swarm", "binomial"], "hetero", [2, 5, 9], jobs=1, **kw)  # type: ignore[arg-type]
    two = run_grid(["swarm", "binomial"], "hetero", [2, 5, 9], jobs=2, **kw)  # type: ignore[arg-type]
    strip = [dataclasses.replace(r, sim_cpu_s=0.0) for r in one]
    assert [dataclasses.replace(r, sim_cpu_s=0.0) for r in two] == strip
    assert [(r.nodes, r.strategy) for r in two] == [(n, s) for n in (2, 5, 9) for s in ("swarm", "binomial")]


def test_cli_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sim", "--nodes", "2", "--pieces", "20", "--scenario", "hetero"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "bound ms" in out and "ratio" in out and "swarm" in out


def test_swarm_does_not_import_sim() -> None:
    code = (
        "import sys, swarm.scheduler; assert not any(m == 'sim' or m.startswith('sim.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.slow
def test_the_compiled_simulator_predicts_the_same(tmp_path: Path) -> None:
    """`--compiled` (mypyc) runs the same source faster; its records must equal the interpreted ones,
    and it must really run the compiled modules (a build into a fresh cache: about a minute of CPU)."""
    pytest.importorskip("mypy")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    args = [sys.executable, "-m", "sim", "--nodes", "6", "--pieces", "80", "--strategy", "swarm", "--json"]

    def records(*extra: str) -> list[dict[str, object]]:
        out = subprocess.run(
            [*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=900
        )
        return [{k: v for k, v in r.items() if k != "sim_cpu_s"} for r in json.loads(out.stdout)]

    assert records("--compiled") == records()
    built = list((tmp_path / "vllm-swarm" / "sim-mypyc").glob("*/sim/engine*.so"))
    assert built and list(built[0].parent.parent.glob("swarm/scheduler*.so"))
