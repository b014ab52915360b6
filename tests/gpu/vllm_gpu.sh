#!/usr/bin/env bash
# `--load-format swarm` on a real GPU vLLM, one GPU: A from disk, B and C from the swarm (eager, then
# torch.compile + CUDA graphs), a few-GB model timed swarm vs disk, and vLLM's compile cache carried
# through the swarm. See tests/gpu/vllm_gpu.py.
#
# On a GPU machine where the vLLM bundle is installed (../shared/gpu-vllm/README.md: `source
# .gpu-vllm/p5/gpu.sh install`), from the repository's root:
#     bash tests/gpu/vllm_gpu.sh OUTDIR [PHASES] [extra options of vllm_gpu.py]
# PHASES: comma-separated subset of 1,2,3,4 (default all; 4: the compile cache through the swarm).
# Results: OUTDIR/vllm_gpu.json and server logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: bash tests/gpu/vllm_gpu.sh OUTDIR [PHASES] [options]}
phases=${2:-1,2,3,4}
shift $(( $# >= 2 ? 2 : 1 ))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python3 -m tests.gpu.vllm_gpu --out "$out" --phases "$phases" "$@"
