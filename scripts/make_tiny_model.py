#!/usr/bin/env python3
"""Make a tiny random model locally (nothing downloaded): a Llama-style (or tied Qwen2-style) model of a
few MB with a word-level tokenizer, plus, with --leecher-copy, a copy of its directory without the weight
files, which is all a `--load-format swarm` instance needs when a seed runs.

    python scripts/make_tiny_model.py models/tiny-llama --leecher-copy models/leecher/tiny-llama
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_plugin.tinymodel import copy_without_weights, make_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="model directory to write")
    p.add_argument("--kind", choices=["llama", "qwen2"], default="llama", help="qwen2: tied embeddings")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--leecher-copy", metavar="DIR", help="also write a copy without the weight files here")
    a = p.parse_args()
    path = make_tiny_model(
        a.path, a.kind, vocab_size=a.vocab_size, hidden=a.hidden, layers=a.layers, seed=a.seed
    )
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {a.kind} model to {path} ({size / 1e6:.1f} MB)")
    if a.leecher_copy:
        copy_without_weights(path, a.leecher_copy)
        print(f"wrote {a.leecher_copy} (no weight files)")


if __name__ == "__main__":
    main()
