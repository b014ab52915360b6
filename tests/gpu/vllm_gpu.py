"""`--load-format swarm` on a real GPU vLLM, on one GPU: the checks and timings of issue 12, in one command.

Run on a GPU machine with the vLLM bundle installed (../shared/gpu-vllm/README.md; tests/gpu/vllm_gpu.sh
sets the environment and calls this). Phases (`--phases 1,2,3,4`):

1. eager: A loads from disk (`--load-format swarm`, no seed yet) and seeds; B and C have no weight files
   and load from the swarm (B from A, C from A and B); all three give the same greedy tokens.
2. torch.compile and CUDA graphs (no --enforce-eager): A starts, B and C start a few seconds later while
   A is still starting, so members serve pieces while another member compiles and captures graphs. All
   three ready, same tokens.
3. a model of a few GB (random Llama, `--big-hidden`/`--big-layers`): A from disk (the page cache: the
   files were just written), then B from the swarm; each one's weight-load time and time to ready.
4. the compile cache through the swarm (tests/vllm/cache_trio.py, the sequence the CPU test and
   bench/compile_cache.py run): A compiles (torch.compile + CUDA graphs) and publishes its cache; B,
   with an empty cache root, gets it through the swarm; C, with `compile_cache: false`, compiles. Each
   has its own VLLM_CACHE_ROOT and TRITON_HOME. Time to ready of each, whether B's vLLM loaded the
   compiled artifacts, and the ratio C/B.

Prints one JSON object per phase and writes them all to OUT/vllm_gpu.json; server logs go to OUT too.
Exit status 0 only when every check held.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tests.loopback import free_port
from tests.vllm.cache_trio import run_trio
from tests.vllm.server import VllmServer
from vllm_plugin.tinymodel import copy_without_weights, make_tiny_model

PROMPTS = ["the cat saw a dog", "hello world , one two three", "red green blue sky"]
GPU_ARGS = ["--attention-backend", "TRITON_ATTN", "--gpu-memory-utilization", "0.12"]


class Run:
    def __init__(self, out: Path, transport: str | None, token: str | None, expect_path: str | None) -> None:
        self.out = out
        self.transport = transport
        self.token = token
        self.expect_path = expect_path
        self.servers: list[VllmServer] = []

    def opts(self, port: int, peers: list[int], **kw: Any) -> dict[str, Any]:
        o: dict[str, Any] = {"host": "127.0.0.1", "mdns": False, "control_port": port, **kw}
        if peers:
            o["peers"] = [f"127.0.0.1:{p}" for p in peers]
        if self.transport:
            o["transport"] = self.transport
        return o

    def start(self, name: str, model: Path, swarm: dict[str, Any], *, eager: bool) -> VllmServer:
        s = VllmServer(
            model,
            self.out / f"{name}.log",
            swarm=swarm,
            name=name,
            eager=eager,
            extra_args=GPU_ARGS,
            # the token in the environment, as an operator would (never in vLLM's printed arguments)
            env={"VLLM_USE_FLASHINFER_SAMPLER": "0", **({"SWARM_TOKEN": self.token} if self.token else {})},
        )
        self.servers.append(s)
        return s

    def stop_all(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()


def _loaded(log: str) -> dict[str, Any]:
    """What the swarm loader logged about this instance's load."""
    out: dict[str, Any] = {}
    m = re.search(
        r"swarm: loaded ([\d.]+ [KMGT]?B) from (\d+) peer\(s\) in ([\d.]+) s \(([\d.]+) GB/s\)", log
    )
    if m:
        out.update(source="swarm", size=m.group(1), peers=int(m.group(2)), seconds=float(m.group(3)))
        out["GBps"] = float(m.group(4))
        # "0 bytes from disk: NAME (PATH): SIZE, ...": the path each peer's bytes took
        tail = log[m.end() :].splitlines()[0] if log[m.end() :] else ""
        out["paths"] = sorted(set(re.findall(r" \((ipc|nccl|tcp)\): ", tail)))
    m = re.search(r"swarm: loaded from disk; now seeding .* \(the disk load took ([\d.]+) s\)", log)
    if m:
        out.update(source="disk", seconds=float(m.group(1)))
    m = re.search(r"Model loading took ([\d.]+) ?GiB(?: memory)? and ([\d.]+) seconds", log)
    if m:
        out["vllm_model_loading_s"] = float(m.group(2))
    return out


def _capture_errors(log: str) -> list[str]:
    return [ln for ln in log.lower().splitlines() if "captur" in ln and ("error" in ln or "invalid" in ln)]


def phase_three(run: Run, root: Path, eager: bool, name: str) -> dict[str, Any]:
    # the same directory name on both sides: it is the NAME of the model identity (docs/loader.md)
    full = make_tiny_model(root / name / "full" / "llama", "llama", hidden=512, layers=4, vocab_size=512)
    leech = copy_without_weights(full, root / name / "leech" / "llama")
    pa, pb, pc = free_port(), free_port(), free_port()
    piece = {"piece_size": "256KiB", "discovery_timeout_s": 60.0 if not eager else 3.0}
    t0 = time.monotonic()
    a = run.start(f"{name}-A", full, run.opts(pa, [], **{**piece, "discovery_timeout_s": 3.0}), eager=eager)
    if eager:
        a.wait_ready(600)
    else:
        time.sleep(5)  # A is still starting (loading, compiling, capturing) when B and C start
    b = run.start(f"{name}-B", leech, run.opts(pb, [pa], **piece), eager=eager)
    if eager:
        b.wait_ready(600)
    c = run.start(f"{name}-C", leech, run.opts(pc, [pa, pb], **piece), eager=eager)
    for s in (a, b, c):
        s.wait_ready(600)
    ready = {s.name: round(s.ready_s or 0.0, 1) for s in (a, b, c)}
    tokens = {s.name: [s.complete(p) for p in PROMPTS] for s in (a, b, c)}
    logs = {s.name: s.log() for s in (a, b, c)}
    loads = {n: _loaded(text) for n, text in logs.items()}
    same = tokens[a.name] == tokens[b.name] == tokens[c.name]
    checks = {
        "same_greedy_tokens": same,
        "A_from_disk": loads[a.name].get("source") == "disk",
        "B_from_swarm": loads[b.name].get("source") == "swarm",
        "C_from_swarm_two_peers": loads[c.name].get("source") == "swarm" and loads[c.name].get("peers") == 2,
        "no_capture_error": not any(_capture_errors(t) for t in logs.values()),
    }
    run.stop_all()
    return {
        "phase": name,
        "eager": eager,
        "wall_s": round(time.monotonic() - t0, 1),
        "ready_s": ready,
        "loads": loads,
        "checks": checks,
        "ok": all(checks.values()),
    }


def phase_big(run: Run, root: Path, hidden: int, layers: int) -> dict[str, Any]:
    t0 = time.monotonic()
    full = make_tiny_model(root / "big" / "full" / "llama", "llama", hidden=hidden, layers=layers)
    leech = copy_without_weights(full, root / "big" / "leech" / "llama")
    made_s = time.monotonic() - t0
    nbytes = sum(f.stat().st_size for f in full.glob("*.safetensors"))
    pa, pb = free_port(), free_port()
    a = run.start("big-A", full, run.opts(pa, [], discovery_timeout_s=3.0), eager=True).wait_ready(600)
    b = run.start("big-B", leech, run.opts(pb, [pa]), eager=True).wait_ready(600)
    same = [a.complete(p) for p in PROMPTS] == [b.complete(p) for p in PROMPTS]
    la, lb = _loaded(a.log()), _loaded(b.log())
    run.stop_all()
    checks = {
        "same_greedy_tokens": same,
        "A_from_disk": la.get("source") == "disk",
        "B_from_swarm": lb.get("source") == "swarm",
    }
    if run.expect_path:
        checks[f"B_over_{run.expect_path}"] = lb.get("paths") == [run.expect_path]
    return {
        "phase": "big",
        "checkpoint_bytes": nbytes,
        "make_model_s": round(made_s, 1),
        "ready_s": {"A": round(a.ready_s or 0.0, 1), "B": round(b.ready_s or 0.0, 1)},
        "loads": {"A": la, "B": lb},
        "weights_speedup_B_vs_A": round(la["seconds"] / lb["seconds"], 2)
        if la.get("seconds") and lb.get("seconds")
        else None,
        "checks": checks,
        "ok": all(checks.values()),
    }


def phase_compile_cache(run: Run, root: Path) -> dict[str, Any]:
    where = root / "compile-cache"
    shutil.rmtree(where, ignore_errors=True)  # a fresh start: no cache root left from an earlier run
    model = make_tiny_model(where / "model" / "llama", "llama", hidden=512, layers=4, vocab_size=512)
    swarm = {"transport": run.transport} if run.transport else {}
    try:
        r = run_trio(
            model,
            where,
            run.out,
            extra_args=GPU_ARGS,
            env={"VLLM_USE_FLASHINFER_SAMPLER": "0", **({"SWARM_TOKEN": run.token} if run.token else {})},
            timeout=600,
            servers=run.servers,
            swarm=swarm,
            expect_load=True,
        )
    finally:
        run.stop_all()
    return {"phase": "compile-cache", **r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--phases", default="1,2,3,4")
    p.add_argument("--transport", default=None, help="force a transport (default: the node's default)")
    p.add_argument(
        "--token",
        default=None,
        help="cluster token of every member (without one, a lone seed is believed after a 1 s vote)",
    )
    p.add_argument("--expect-path", default=None, help="phase 3 also checks that B's bytes took this path")
    p.add_argument("--big-hidden", type=int, default=2048)
    p.add_argument("--big-layers", type=int, default=40)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    root = Path("/tmp/vllm-gpu-models")
    run = Run(a.out, a.transport, a.token, a.expect_path)
    import vllm

    results: list[dict[str, Any]] = []
    try:
        for ph in a.phases.split(","):
            if ph == "1":
                r = phase_three(run, root, True, "eager")
            elif ph == "2":
                r = phase_three(run, root, False, "compiled")
            elif ph == "3":
                r = phase_big(run, root, a.big_hidden, a.big_layers)
            elif ph == "4":
                r = phase_compile_cache(run, root)
            else:
                raise SystemExit(f"unknown phase {ph!r}")
            r["vllm"] = vllm.__version__
            r["transport"] = a.transport or "default"
            r["token"] = bool(a.token)
            print(json.dumps(r), flush=True)
            results.append(r)
            (a.out / "vllm_gpu.json").write_text(json.dumps(results, indent=1))
    except Exception as e:
        for s in run.servers:
            print(f"--- {s.name} (alive={s.alive()}):\n{s.tail(40)}", flush=True)
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        return 1
    finally:
        run.stop_all()
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
