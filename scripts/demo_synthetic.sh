#!/usr/bin/env bash
# The engine alone, without vLLM: a local swarm on this machine. One seed serves a
# synthetic 256 MB model; three leechers start together, pull different pieces from the seed and from
# each other, verify every byte, and keep seeding; `swarm status` shows the swarm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SWARM=".venv/bin/swarm"
SIZE=${SIZE:-256MB}
PORT=${PORT:-47100}
COMMON=(--synthetic "$SIZE" --piece-size 4MB --no-mdns --host 127.0.0.1)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== starting a seed of a synthetic $SIZE model on 127.0.0.1:$PORT"
"$SWARM" seed "${COMMON[@]}" --port "$PORT" &
pids+=($!)
for _ in $(seq 50); do "$SWARM" status --no-mdns --peers "127.0.0.1:$PORT" --json >/dev/null 2>&1 && break; sleep 0.2; done

echo "== three leechers start together"
lpids=()
for i in 1 2 3; do
    "$SWARM" fetch "${COMMON[@]}" --port $((PORT + i)) --peers "127.0.0.1:$PORT" --duration 10 &
    lpids+=($!); pids+=($!)
done
ALL="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3))"
members() { "$SWARM" status --no-mdns --peers "$ALL" --json 2>/dev/null | grep -c '"instance"' || true; }
for _ in $(seq 150); do [ "$(members)" -ge 4 ] && break; sleep 0.2; done
echo "== swarm status while they pull"
"$SWARM" status --no-mdns --peers "$ALL" || true
sleep 4
echo "== swarm status once they are done: four seeds"
"$SWARM" status --no-mdns --peers "$ALL" || true
for p in "${lpids[@]}"; do wait "$p"; done
echo "== every leecher verified the seed's bytes, and took pieces from the others too (see 'from' above)"
