"""Three real vLLM servers that measure the carried compile cache: A compiles and publishes, B starts with
A's cache from the swarm, C starts without it (`compile_cache: false`). Used by the test
(tests/vllm/test_compile_cache.py), the CPU bench (bench/compile_cache.py) and phase 4 of the GPU run
(tests/gpu/vllm_gpu.py), so the GPU run executes the code the CPU runs checked.

Every server compiles (no --enforce-eager) into a cache root of its own (VLLM_CACHE_ROOT), and has a
Triton home of its own (TRITON_HOME: Triton's default cache, ~/.triton/cache, is not shared, so no
instance profits from another's kernels outside the swarm). TRITON_CACHE_DIR stays unset: vLLM then
puts Triton's cache inside its own compile cache (vllm/compilation/compiler_interface.py), where it is
carried; set, vLLM would leave it outside. All three load the model by the same path: vLLM's cache
hash includes it. B and C both get their weights from A through the swarm; the only difference between
them is the compile cache. B is stopped before C starts, so the two do not compete for the machine.
Time to ready: process start to the first 200 from /health.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tests.loopback import free_port
from tests.vllm.server import ServerError, VllmServer

PROMPTS = ["the cat saw a dog", "hello world , one two three"]
PUBLISHED = re.compile(r"swarm: publishing this instance's compile cache as (\S+): (\d+) files, ([\d.]+) MB")
CARRIED = re.compile(r"swarm: compile cache (\S+) from the swarm: (\d+) files .*?, ([\d.]+) MB in ([\d.]+) s")
#: vLLM's own lines when it loads compiled artifacts instead of compiling (AOT: vLLM >= 0.28 with torch
#: >= 2.10; the Inductor backend's cache otherwise)
VLLM_LOADED = re.compile(r"Directly load AOT compilation from path|Directly load the compiled graph\(s\)")
#: vLLM looked up an AOT artifact (loaded it, or failed to: vLLM 0.32's CPU build cannot load its own AOT
#: artifact, "'function' object has no attribute 'finalize_loading'", and compiles again, with Inductor's
#: cache, inside the carried directory, warm)
AOT_LOOKUP = re.compile(
    r"(?:Directly load AOT compilation from path|Compiling model again due to a load failure from) (\S+?),?\s"
)
AOT_SAVED = re.compile(r"saved AOT compiled function to (\S+)")
INIT_ENGINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")
COMPILE_TOOK = re.compile(
    r"torch\.compile (?:takes|and initial profiling/warmup run together took) ([\d.]+) s"
)


#: a compile cache travels only in a swarm with a token (vllm_plugin.compile_cache: it is code)
TOKEN = "cache-trio-" + "0" * 32


def _opts(port: int, peers: list[int], **kw: Any) -> dict[str, Any]:
    o: dict[str, Any] = {"host": "127.0.0.1", "mdns": False, "control_port": port, "discovery_timeout_s": 3.0}
    o["token"] = TOKEN
    if peers:
        o["peers"] = [f"127.0.0.1:{p}" for p in peers]
    return {**o, **kw}


def _in_cache(path: str) -> str:
    """A path relative to its `torch_compile_cache` (the part vLLM's hash names)."""
    return path.partition("/torch_compile_cache/")[2]


def facts(log: str) -> dict[str, Any]:
    """What one server's log says about its compile cache and start-up."""
    out: dict[str, Any] = {"vllm_loaded_compiled": bool(VLLM_LOADED.search(log))}
    if m := AOT_LOOKUP.search(log):
        out["aot_looked_up"] = _in_cache(m.group(1))
    if m := AOT_SAVED.search(log):
        out["aot_saved"] = _in_cache(m.group(1))
    if m := PUBLISHED.search(log):
        out["published"] = {"name": m.group(1), "files": int(m.group(2)), "MB": float(m.group(3))}
    if m := CARRIED.search(log):
        out["carried"] = {"files": int(m.group(2)), "MB": float(m.group(3)), "fetch_s": float(m.group(4))}
    if m := INIT_ENGINE.search(log):
        out["init_engine_s"] = float(m.group(1))
    if m := COMPILE_TOOK.search(log):
        out["compile_s"] = float(m.group(1))
    return out


def wait_for(server: VllmServer, pattern: re.Pattern[str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pattern.search(server.log()):
        if not server.alive():
            raise ServerError(f"{server.name} exited before {what}:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise ServerError(f"{server.name}: no {what} after {timeout:.0f} s:\n{server.tail()}")
        time.sleep(0.5)


def run_trio(
    model: Path,
    root: Path,
    out: Path,
    *,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    servers: list[VllmServer] | None = None,
    swarm: dict[str, Any] | None = None,
    expect_load: bool = False,
) -> dict[str, Any]:
    """Start A, then B (carried cache), then C (none); return times, log facts and checks. `swarm`: more
    loader options for all three. `expect_load`: B's vLLM must load the compiled artifacts (the CPU
    build cannot: see AOT_LOOKUP; there B must look up the carried artifact). Every server started is
    appended to `servers` (the caller stops them, also on failure)."""
    started: list[VllmServer] = [] if servers is None else servers
    pa, pb, pc = free_port(), free_port(), free_port()

    def start(name: str, opts: dict[str, Any]) -> VllmServer:
        own = {
            "VLLM_CACHE_ROOT": str(root / f"cache-{name}"),
            "TRITON_HOME": str(root / f"triton-{name}"),
        }
        s = VllmServer(
            model,
            out / f"cc-{name}.log",
            swarm={**opts, **(swarm or {})},
            name=f"cc-{name}",
            eager=False,
            extra_args=extra_args,
            env={**(env or {}), **own},
        )
        started.append(s)
        return s

    t0 = time.monotonic()
    a = start("A", _opts(pa, [])).wait_ready(timeout)
    try:
        wait_for(a, PUBLISHED, 300, "published compile cache")
    except ServerError as e:
        files = sorted(str(p.relative_to(root)) for p in (root / "cache-A").rglob("*") if p.is_file())
        raise ServerError(f"{e}\nfiles in A's cache root ({len(files)}):\n" + "\n".join(files[:60])) from None
    tokens = {"A": [a.complete(p) for p in PROMPTS]}
    b = start("B", _opts(pb, [pa])).wait_ready(timeout)
    tokens["B"] = [b.complete(p) for p in PROMPTS]
    b.stop()
    c = start("C", _opts(pc, [pa], compile_cache=False)).wait_ready(timeout)
    tokens["C"] = [c.complete(p) for p in PROMPTS]
    logs = {"A": a.log(), "B": b.log(), "C": c.log()}
    got = {n: facts(text) for n, text in logs.items()}
    ready = {"A": a.ready_s or 0.0, "B": b.ready_s or 0.0, "C": c.ready_s or 0.0}
    checks = {
        "A_compiled_and_published": "published" in got["A"] and not got["A"]["vllm_loaded_compiled"],
        "B_got_the_cache_through_the_swarm": "carried" in got["B"],
        # vLLM's own hash picked the directory that came from A: the same one A saved into
        "B_vllm_used_the_carried_directory": got["B"]["vllm_loaded_compiled"]
        or ("aot_looked_up" in got["B"] and got["B"]["aot_looked_up"] == got["A"].get("aot_saved")),
        "C_compiled_itself": not got["C"]["vllm_loaded_compiled"] and "carried" not in got["C"],
        "same_greedy_tokens": tokens["A"] == tokens["B"] == tokens["C"],
    }
    if expect_load:
        checks["B_vllm_loaded_compiled_artifacts"] = got["B"]["vllm_loaded_compiled"]
    result: dict[str, Any] = {
        "wall_s": round(time.monotonic() - t0, 1),
        "ready_s": {n: round(v, 1) for n, v in ready.items()},
        "ready_ratio_C_over_B": round(ready["C"] / ready["B"], 2) if ready["B"] else None,
        "logs": got,
        "checks": checks,
        "ok": all(checks.values()),
    }
    init_b, init_c = got["B"].get("init_engine_s"), got["C"].get("init_engine_s")
    if init_b and init_c:
        result["init_engine_ratio_C_over_B"] = round(init_c / init_b, 2)
    return result
