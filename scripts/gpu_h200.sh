#!/bin/bash
# One run on a one-GPU machine (issue 11): the single-GPU tests (CUDA IPC, CUDA graph capture), then
# bench/gpu.py's ipc and control cases in one run; logs and JSON under $OUT (or /tmp/out).
# The wheels the machine lacks come from the vLLM bundle's first part (.gpu-vllm/p1/deps, carried;
# ../shared/gpu-vllm/README.md: pyzmq, zeroconf, ifaddr, blake3, dnspython) and from .whl (carried: the
# bundle has no cryptography; fetch it here with `python3 -m pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl
# cryptography cffi pycparser`).
# STEPS: any of export,tests,bench,others (default tests,bench).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
wheels=$(ls .whl/*.whl .gpu-vllm/p1/deps/*.whl 2>/dev/null | grep -E '/(pyzmq|zeroconf|ifaddr|blake3|dnspython|cryptography|cffi|pycparser)-')
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/deps $wheels
  export PYTHONPATH=$PWD:/tmp/deps  # this tree first: a bundle may hold another copy of swarm
else
  export PYTHONPATH=$PWD
fi
STEPS=${STEPS:-tests,bench}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
git log -1 --format='commit %h %s' 2>/dev/null || true
if [[ $STEPS == *export* ]]; then
  timeout 90 python3 bench/ipc_export.py --json "$OUT/ipc_export.json" 2>&1 | tail -c 3000
fi
if [[ $STEPS == *tests* ]]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_ipc.py tests/gpu/test_capture.py 2>&1 | tee "$OUT/tests.log" | tail -c 5000
fi
if [[ $STEPS == *bench* ]]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 bench/gpu.py --gpus 1 --cases ipc,control --control-leechers 3 \
    --control-piece-mib 64,256 --json "$OUT/gpu-ipc-control.json" 2>&1 | tee "$OUT/bench.log" | tail -c 5000
fi
if [[ $STEPS == *others* ]]; then  # the other one-GPU tests (NCCL loopback; more in OTHER_TESTS), after the rest
  timeout "${OTHERS_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_node_loopback.py tests/gpu/test_transport_loopback.py ${OTHER_TESTS:-} 2>&1 | tee "$OUT/others.log" | tail -c 3000
fi
