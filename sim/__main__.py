"""`python -m sim`: run strategies over node counts on one scenario; print a table, JSON, or a plot.

Examples::

    python -m sim --nodes 1,10,100,1000                      # all strategies, h200 calibration
    python -m sim --strategy swarm,binomial --scenario hetero --nodes 100 --json
    python -m sim --calibration cluster --nodes 1,10,100,1000 --plot docs/simulation.png
    python -m sim --nodes 100,1000 --strategy swarm --jobs 2  # two simulations at once
    python -m sim --nodes 1000 --strategy swarm --compiled   # mypyc-compiled scheduler and engine
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from sim.run import STRATEGIES, Record, run_grid
from sim.scenario import CALIBRATIONS, SCENARIOS
from swarm.scheduler import SchedulerConfig


def _list(kind: type, text: str) -> list:  # type: ignore[type-arg]
    return [kind(x) for x in text.split(",") if x.strip()]


def _fmt(x: float | None, unit: float = 1.0, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "never"
    return f"{x / unit:.{digits}f}"


def table(records: Sequence[Record]) -> str:
    head = (
        f"{'scenario':<10} {'strategy':<9} {'N':>6} {'time ms':>10} {'bound ms':>9} {'ratio':>8} "
        f"{'copies':>8} {'mean load ms':>12} {'vs binomial':>11} {'cpu s':>7}"
    )
    lines = [head, "-" * len(head)]
    binom = {(r.scenario, r.nodes): r.time_s for r in records if r.strategy == "binomial"}
    for r in records:
        b = binom.get((r.scenario, r.nodes))
        vs = (
            f"{r.time_s / b:.3f}"
            if b and r.time_s is not None and not math.isinf(r.time_s) and not math.isinf(b)
            else "n/a"
        )
        lines.append(
            f"{r.scenario:<10} {r.strategy:<9} {r.nodes:>6} {_fmt(r.time_s, 1e-3):>10} "
            f"{_fmt(r.lower_bound_s, 1e-3):>9} {_fmt(r.ratio):>8} {_fmt(r.copies):>8} "
            f"{_fmt(r.mean_load_s, 1e-3):>12} {vs:>11} {r.sim_cpu_s:>7.1f}"
        )
        if r.unfinished:
            stalled = r.stalled_pieces[:20]
            lines.append(f"{'':<27} {r.unfinished} unfinished; pieces no live peer holds: {stalled}")
    return "\n".join(lines)


def plot(records: Sequence[Record], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    strategies = sorted({r.strategy for r in records}, key=lambda s: STRATEGIES.index(s))
    for s in strategies:
        pts = [
            (r.nodes, r.time_s) for r in records if r.strategy == s and r.time_s and not math.isinf(r.time_s)
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=s)
    lb = sorted({(r.nodes, r.lower_bound_s) for r in records})
    ax.plot([p[0] for p in lb], [p[1] * 1e3 for p in lb], "k--", label="lower bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("receivers N")
    ax.set_ylabel("time until all hold the model (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    p.add_argument("--strategy", default=",".join(STRATEGIES), help="comma list of " + ", ".join(STRATEGIES))
    p.add_argument("--nodes", default="1,10,100", help="comma list of receiver counts")
    p.add_argument("--scenario", default="together", help="comma list of " + ", ".join(SCENARIOS))
    p.add_argument("--calibration", default="h200", choices=sorted(CALIBRATIONS))
    p.add_argument("--model-gb", type=float, help="model size in GB (default: from the calibration)")
    p.add_argument("--pieces", type=int, default=1000, help="number of pieces (default 1000)")
    p.add_argument("--piece-mb", type=float, help="piece size in MB (overrides --pieces)")
    p.add_argument("--bandwidth-gbs", type=float, help="link bandwidth GB/s (default: calibration)")
    p.add_argument("--latency-us", type=float, help="one-way latency in us (default: calibration)")
    p.add_argument("--degree", type=int, default=16, help="peer set size in the swarm (default 16)")
    p.add_argument("--stagger", type=float, default=2.0, help="staggered: arrivals over this many copies")
    p.add_argument("--slow", type=float, default=0.2, help="hetero: slow links' fraction of B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="simulations to run at once, in processes (default 1)")
    p.add_argument("--json", action="store_true", help="print a JSON list of records instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="also draw time against N")
    p.add_argument(
        "--compiled",
        action="store_true",
        help="compile the scheduler and the engine with mypyc first (same source, same results, about "
        "half the CPU time; the build is cached; see sim/compiled.py)",
    )
    args = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(args)
    if a.compiled:
        from sim import compiled

        compiled.run([x for x in args if x != "--compiled"])

    cal = CALIBRATIONS[a.calibration]
    model = int(a.model_gb * 1e9) if a.model_gb else cal.model_bytes
    pieces = max(1, math.ceil(model / (a.piece_mb * 1e6))) if a.piece_mb else a.pieces
    bw = a.bandwidth_gbs * 1e9 if a.bandwidth_gbs else cal.bandwidth
    lat = a.latency_us * 1e-6 if a.latency_us is not None else cal.latency
    strategies = _list(str, a.strategy)
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}")
    records: list[Record] = []
    for scenario in _list(str, a.scenario):
        if scenario not in SCENARIOS:
            p.error(f"unknown scenario {scenario!r}")
        records += run_grid(
            strategies,
            scenario,
            _list(int, a.nodes),
            model_bytes=model,
            pieces=pieces,
            bandwidth=bw,
            latency=lat,
            seed=a.seed,
            degree=a.degree,
            config=SchedulerConfig(),
            stagger=a.stagger,
            slow=a.slow,
            jobs=a.jobs,
        )
        if not a.json:
            print(table([r for r in records if r.scenario == scenario]), flush=True)
            print()
    if a.json:
        json.dump([r.as_dict() for r in records], sys.stdout, indent=1, default=str)
        print()
    if a.plot:
        title = f"{a.scenario}, {model / 1e9:g} GB, {pieces} pieces, {bw / 1e9:g} GB/s links"
        plot(records, a.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
