#!/usr/bin/env bash
# New devices on a fleet node while its NATS hangs: bench_lib.sh's two-node fleet
# (shipped defaults, [cluster] on, the store on), nats-server stopped with SIGSTOP (its
# connections stay open, nothing answers) when HANG=1, then CONNS clean-session MQTT
# 3.1.1 devices connect to node a at RATE a second, each subscribing to its own topic.
# Prints loadgen's connect summary: how many connected, the connect rate, and the
# CONNACK latency (ms). nats-server is let go (SIGCONT) and the fleet stopped at the end.
#
# Usage: fleet_nats_hang.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR
#   HANG (1), CONNS (2000), RATE (1000); bench_lib.sh's fleet ports.
set -u
gw=$1 lg=$2 out=$3
hang=${HANG:-1} conns=${CONNS:-2000} rate=${RATE:-1000}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
fleet_workdir "$out"
trap 'kill -CONT "${FLEET_PIDS[0]:-0}" 2> /dev/null; stop_fleet; rm -rf "$dir"' EXIT
start_fleet "$gw" "$dir" || exit 1
[ "$hang" = 1 ] && kill -STOP "${FLEET_PIDS[0]}"
echo "== progress: $conns devices to node a at $rate/s, NATS hung: $hang" >&2
"$lg" connect --target 127.0.0.1:18830 --conns "$conns" --rate "$rate" --hold 1 \
  --client-id 'nh-{i}' --json 2> "$out/connect.err" | tail -1 > "$out/connect.json"
python3 - "$out/connect.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
l = d["latency_ms"]
print(f"connected {d['connected']}, {d['connect_rate']:.0f}/s; CONNACK ms p50 {l['p50']:.1f} "
      f"p90 {l['p90']:.1f} p99 {l['p99']:.1f} max {l['max']:.1f}")
PY
