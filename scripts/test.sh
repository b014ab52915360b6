#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), then lint, format, types and tests:
# everything on vLLM 0.32 (.venv), then tests/vllm again on vLLM 0.28 (.venv-vllm028), the oldest CPU
# build here of the range we support (0.24 to 0.33; 0.24 itself is a GPU build: tests/gpu/vllm_gpu.sh).
# Any failure, and pytest finding no test at all (its exit code 5), fails the run.
# Arguments go to the first pytest run; SWARM_VLLM_VERSIONS=0.32 skips the second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest (vLLM $("$PY" -c 'import vllm; print(vllm.__version__)'))"
SWARM_REQUIRE_VLLM=1 "$PY" -m pytest -q -ra "$@"
for v in ${SWARM_VLLM_VERSIONS:-0.32 0.28}; do
    [ "$v" = 0.28 ] || continue
    echo "== pytest tests/vllm (vLLM $(.venv-vllm028/bin/python -c 'import vllm; print(vllm.__version__)'))"
    SWARM_REQUIRE_VLLM=1 .venv-vllm028/bin/python -m pytest -q -ra tests/vllm
done
