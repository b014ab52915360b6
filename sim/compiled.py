"""`python -m sim --compiled`: the same simulation, with the scheduler and the engine compiled by mypyc.

What runs is the same source: `swarm/scheduler.py` and `sim/engine.py` are compiled to C extensions by
mypyc (part of mypy, a development dependency) in a private copy of the `swarm` and `sim` packages, and
the simulation runs in a child process that imports that copy. The copy lives in a cache directory named
by a digest of every source file of both packages and of the Python and mypy versions, so a stale build
can never run: editing any file makes a new build (about a minute of CPU on the 2-core development VM;
later runs reuse it). bench/sim_speed.py checks that the records are the same as the interpreted run's.

Why: the simulator spends its time in Python-level work per event (method calls, attribute access,
small allocations); compiled, it runs with identical results in roughly half the CPU time (the measured
ratios, per N and per version, are in docs/simulation.md). The node never uses the compiled copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from swarm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("swarm", "sim")
COMPILED = ("swarm/scheduler.py", "sim/engine.py")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def digest() -> str:
    import mypy.version

    h = hashlib.sha256(f"{sys.version}|{mypy.version.__version__}|{COMPILED}".encode())
    for p in _sources():
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-swarm" / "sim-mypyc"


def build(quiet: bool = True) -> Path:
    """The directory to put first on the path for the compiled simulator (built if missing)."""
    try:
        key = digest()
    except ImportError as e:
        raise ConfigError("--compiled needs mypy (mypyc)", hint="pip install mypy, or run without it") from e
    dest = cache_dir() / key
    if (dest / "done").exists():
        return dest
    tmp = dest.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for p in _sources():
            target = tmp / p.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
        out = subprocess.run(
            [sys.executable, "-m", "mypyc", *COMPILED],
            cwd=tmp,
            capture_output=quiet,
            text=True,
            timeout=1800,
        )
        if out.returncode != 0:
            raise ConfigError(
                "mypyc could not compile the simulator: "
                + f"{(out.stdout or '')[-2000:]} {(out.stderr or '')[-2000:]}",
                hint="run without --compiled",
            )
        shutil.rmtree(tmp / "build", ignore_errors=True)
        (tmp / "done").write_text(key)
        try:
            tmp.rename(dest)
        except OSError:  # another process built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run(argv: list[str]) -> None:
    """Become `python -m sim argv` with the compiled copy first on the path (never returns). `-P`: the
    working directory (perhaps a checkout with the interpreted packages) is not put before it."""
    path = build()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    os.execve(sys.executable, [sys.executable, "-P", "-m", "sim", *argv], env)
