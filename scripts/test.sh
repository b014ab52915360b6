#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), then lint, format, types and tests.
# Any failure, and pytest finding no test at all (its exit code 5), fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
"$PY" -m pytest -q -ra "$@"
