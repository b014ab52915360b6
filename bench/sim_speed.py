"""Speed of the simulator, this checkout against another one, side by side in one run.

    python bench/sim_speed.py --baseline /path/to/old-checkout --nodes 100 --repeat 2
    python bench/sim_speed.py --baseline /path/to/old-checkout --nodes 1000 --compiled

Runs `python -m sim --strategy swarm --json` for each checkout in turn (alternating, `--repeat` times,
so that both see the same machine load), each in a fresh process with that checkout first on the path,
and prints the CPU seconds of each simulation (the record's `sim_cpu_s`), the ratio baseline / this,
and whether the two produced the same results (every field but `sim_cpu_s`): a speed-up of the
simulator must not change what it predicts. `--compiled` adds both checkouts' runs with
`python -m sim --compiled` (sim/compiled.py: mypyc builds the scheduler and the engine once, into a
cache; the build is not timed), and compares compiled with compiled. `--paired` runs baseline and this
(and the two compiled ones) at the same time, one per core: on a shared machine whose load changes
from minute to minute, that is fairer than one after the other. `sim_cpu_s` is CPU time
(`time.process_time` around the simulation), not wall time: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(src: str, sim_args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    return subprocess.Popen(
        [sys.executable, "-m", "sim", "--strategy", "swarm", "--json", *sim_args],
        cwd=src,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str], timeout: float) -> list[dict[str, Any]]:
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if p.returncode != 0:
        raise SystemExit(f"python -m sim failed ({p.returncode}): {p.args}")
    return json.loads(out)  # type: ignore[no-any-return]


def _strip(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("sim_cpu_s", "code", "round")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--baseline", required=True, metavar="DIR", help="the other checkout (e.g. a worktree of main)"
    )
    ap.add_argument("--nodes", default="100")
    ap.add_argument("--calibration", default="h200")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--json", default="", help="write the records here")
    ap.add_argument("--compiled", action="store_true", help="also run both checkouts compiled (mypyc)")
    ap.add_argument(
        "--paired",
        action="store_true",
        help="run each pair (baseline and this; compiled ones) at the same time, one process per core, so "
        "that both see the same load of a shared machine (needs 2 cores)",
    )
    args = ap.parse_args(argv)
    sim_args = ["--nodes", args.nodes, "--calibration", args.calibration]
    # (label, checkout, extra arguments, the label it is compared with)
    variants = [("baseline", args.baseline, [], ""), ("this", ROOT, [], "baseline")]
    if args.compiled:
        for src in (args.baseline, ROOT):  # build once each, before anything is timed
            subprocess.run(
                [sys.executable, "-c", "from sim import compiled; compiled.build()"],
                cwd=src,
                env={**os.environ, "PYTHONPATH": os.path.abspath(src)},
                check=True,
                timeout=args.timeout,
            )
        variants += [
            ("base-comp", args.baseline, ["--compiled"], ""),
            ("compiled", ROOT, ["--compiled"], "base-comp"),
        ]
    rows: list[dict[str, Any]] = []
    groups = (
        [variants[j : j + 2] for j in range(0, len(variants), 2)] if args.paired else [[v] for v in variants]
    )
    for i in range(args.repeat):
        for group in groups:
            procs = [(label, start(src, [*sim_args, *extra])) for label, src, extra, _ in group]
            for label, p in procs:
                for rec in finish(p, args.timeout):
                    rows.append({"code": label, "round": i, **rec})
                    print(
                        f"{label:<9} N={rec['nodes']:<6} cpu {rec['sim_cpu_s']:8.1f} s  ratio {rec['ratio']}",
                        flush=True,
                    )
    same = True
    for n in sorted({r["nodes"] for r in rows}):
        first = [r for r in rows if r["nodes"] == n and r["code"] == "baseline"]
        for label, _, _, against in variants[1:]:
            this = [r for r in rows if r["nodes"] == n and r["code"] == label]
            same_n = all(_strip(x) == _strip(y) for x in first for y in this)
            same &= same_n
            t = min(r["sim_cpu_s"] for r in this)
            vs = ""
            if against:
                base = [r for r in rows if r["nodes"] == n and r["code"] == against]
                b = min(r["sim_cpu_s"] for r in base)
                vs = f"{against} {b:.1f} s, {label} {t:.1f} s: {b / t:.2f} x faster; "
            print(
                f"N={n} (CPU s, best of {args.repeat}): {vs or f'{label} {t:.1f} s; '}"
                f"results {'identical' if same_n else 'DIFFERENT'} to the baseline's"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
