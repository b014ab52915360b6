#!/bin/bash
# One run on a one-GPU machine for issue 11's IPC work: the export experiment (bench/ipc_export.py),
# tests/gpu/test_ipc.py, and bench/gpu.py's ipc case; logs and JSON under $OUT (or /tmp/out).
# Wheels the machine lacks (pyzmq, zeroconf, ifaddr, blake3) are read from ./whl when present.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site  # this tree first: /tmp/site may hold another copy of swarm
else
  export PYTHONPATH=$PWD
fi
STEPS=${STEPS:-export,tests,bench}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
if [[ $STEPS == *export* ]]; then
  timeout 90 python3 bench/ipc_export.py --json "$OUT/ipc_export.json" 2>&1 | tail -c 3000
fi
if [[ $STEPS == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_ipc.py 2>&1 | tee "$OUT/tests.log" | tail -c 6000
fi
if [[ $STEPS == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-200} python3 bench/gpu.py --cases ipc --json "$OUT/ipc-nvidia-h200.json" 2>&1 | tee "$OUT/bench.log" | tail -c 4000
fi
if [[ $STEPS == *others* ]]; then  # the other one-GPU tests (NCCL loopback; more in OTHER_TESTS), after the rest
  timeout ${OTHERS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_node_loopback.py tests/gpu/test_transport_loopback.py ${OTHER_TESTS:-} 2>&1 | tee "$OUT/others.log" | tail -c 3000
fi
