#!/usr/bin/env bash
# The real thing on CPU, nothing downloaded: a tiny random Llama-style model made here; instance A has its
# weights and runs with --load-format swarm (no seed yet: it loads from disk, then seeds); instances B and
# C get a model directory WITHOUT weight files and load everything from the swarm (C from A and B). Then
# `swarm status`, and the same prompt to all three: the answers must be equal.
# Discovery is zero-config mDNS on the loopback interface (SWARM_INTERFACE=lo); on a LAN leave it unset.
# On a GPU install the servers are simply: vllm serve MODEL --load-format swarm
set -euo pipefail
cd "$(dirname "$0")/.."
# DEMO_PYTHON=/path/to/python runs with that interpreter as it is (no setup), e.g. an existing venv.
if [ -z "${DEMO_PYTHON:-}" ]; then bash scripts/setup.sh; fi
PY=${DEMO_PYTHON:-.venv/bin/python}
SWARM=("$PY" -m swarm.cli)
WORK=${WORK:-$(mktemp -d -t vllm-swarm-demo.XXXXXX)}
PROMPT=${PROMPT:-"the cat saw a dog"}
export SWARM_INTERFACE=${SWARM_INTERFACE:-lo} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
    sleep 2
    for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== a tiny model in $WORK/models/tiny-llama, and a copy without weights for the later instances"
"$PY" scripts/make_tiny_model.py "$WORK/models/tiny-llama" --leecher-copy "$WORK/no-weights/tiny-llama"
ls "$WORK/no-weights/tiny-llama"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve() { # name model port
    setsid "$PY" -m vllm.entrypoints.openai.api_server --model "$2" --host 127.0.0.1 --port "$3" \
        --enforce-eager --max-model-len 512 --load-format swarm >"$WORK/$1.log" 2>&1 &
    pids+=($!)
}
wait_ready() { # name port
    for _ in $(seq 300); do
        curl -sf "127.0.0.1:$2/health" >/dev/null && { echo "   $1 is up"; return 0; }
        sleep 1
    done
    echo "$1 did not start; its log:" >&2; tail -40 "$WORK/$1.log" >&2; return 1
}
complete() { # port model
    curl -s "127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\": \"$2\", \"prompt\": \"$PROMPT\", \"max_tokens\": 16, \"temperature\": 0}" |
        "$PY" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["text"])'
}
swarm_lines() { grep -a "swarm: \(no seed\|loaded\|refused\|tied\)" "$WORK/$1.log" | sed 's/^.*\] swarm:/   swarm:/' | cut -c1-170; }

PA=$(free_port); PB=$(free_port); PC=$(free_port)
echo "== A: has the weights; finds no seed, loads from disk, then seeds"
serve A "$WORK/models/tiny-llama" "$PA"; wait_ready A "$PA"; swarm_lines A
echo "== B and C: no weight files; they load from the swarm"
serve B "$WORK/no-weights/tiny-llama" "$PB"; wait_ready B "$PB"; swarm_lines B
serve C "$WORK/no-weights/tiny-llama" "$PC"; wait_ready C "$PC"; swarm_lines C

echo "== swarm status"
"${SWARM[@]}" status --interface "$SWARM_INTERFACE"

echo "== the same prompt to all three: \"$PROMPT\""
a=$(complete "$PA" "$WORK/models/tiny-llama"); echo "   A: $a"
b=$(complete "$PB" "$WORK/no-weights/tiny-llama"); echo "   B: $b"
c=$(complete "$PC" "$WORK/no-weights/tiny-llama"); echo "   C: $c"
if [ "$a" = "$b" ] && [ "$a" = "$c" ]; then
    echo "== the same answer from all three; B and C never read a weight file (logs in $WORK)"
else
    echo "== the answers differ (logs in $WORK)" >&2
    exit 1
fi
