#!/usr/bin/env bash
# What keeping every session's will in JetStream costs a fleet (eighth session): DEVICES
# clean-session MQTT 3.1.1 devices spread over two nodes (loadgen --targets A,B: every
# other one) connect at RATE a second, stay HOLD seconds and disconnect cleanly, without
# and with a will (loadgen --will-topic 'status/{id}', QoS 1), interleaved, on a fresh
# fleet each run (nats-server with JetStream, nodes a and b on the shipped defaults plus
# [cluster] enabled; bench_lib.sh's fleet). Per run: the connect rate loadgen saw, the
# session changes the nodes wrote to JetStream (gateway_fleet_session_changes_total,
# outcome written, both nodes), and the CPU of both gateways and nats-server from
# /proc/PID/stat over the whole loadgen run (ramp, hold, disconnects).
#
# Usage: fleet_wills.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR [REPEATS]
#   DEVICES (10000), RATE (2000), HOLD (5); ports 14222, 18830/18080, 18831/18081.
set -u
gw=$1 lg=$2 out=$3 repeats=${4:-1}
devices=${DEVICES:-10000} rate=${RATE:-2000} hold=${HOLD:-5}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
lg=$(cd "$(dirname "$lg")" && pwd)/$(basename "$lg")
fleet_workdir "$out"
trap 'stop_fleet; rm -rf "$dir"' EXIT

written() { # HTTP_PORT
  curl -sf "http://127.0.0.1:$1/metrics" |
    awk '$1 == "gateway_fleet_session_changes_total{outcome=\"written\"}" { print $2; f = 1 } END { if (!f) print 0 }'
}

run() { # NAME [LOADGEN ARGS...]
  local name=$1 cpu0 cpu1
  shift
  cpu0=$(cpu_secs "${FLEET_PIDS[@]}")
  echo "== progress: $name, $devices devices at $rate/s" >&2
  "$lg" connect --target 127.0.0.1:18830 --targets 127.0.0.1:18830,127.0.0.1:18831 \
    --conns "$devices" --rate "$rate" --hold "$hold" --sub-qos 1 --client-id 'fw-{i}' \
    "$@" --json > "$out/$name.json" 2> "$out/$name.err"
  sleep 1 # the last disconnects' changes reach JetStream
  cpu1=$(cpu_secs "${FLEET_PIDS[@]}")
  echo "$name $cpu0 $cpu1 $(written 18080) $(written 18081)" >> "$out/runs.txt"
}

: > "$out/runs.txt"
for r in $(seq "$repeats"); do
  start_fleet "$gw" "$dir" && run "no-will-$r"
  stop_fleet
  start_fleet "$gw" "$dir" && run "will-$r" --will-topic 'status/{id}'
  stop_fleet
done

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]

def summary(name):
    """The last JSON line loadgen wrote for run NAME, or None if it failed."""
    lines = open(f"{out}/{name}.json").read().strip().splitlines()
    return json.loads(lines[-1]) if lines else None

print("| run | connected | connect rate /s | session changes written | CPU s (A + B + NATS) | CPU ms per 1,000 devices |")
print("|---|---|---|---|---|---|")
for name, cpu0, cpu1, wa, wb in (line.split() for line in open(f"{out}/runs.txt")):
    s = summary(name)
    if s is None:
        print(f"| {name} | failed, see {out}/{name}.err | | | | |")
        continue
    cpu, n = float(cpu1) - float(cpu0), s.get("connected") or 0
    per = cpu / n * 1e6 if n else 0.0
    print(f"| {name} | {n:,} | {s.get('connect_rate', 0):,.0f} | {float(wa) + float(wb):,.0f} | {cpu:.2f} | {per:.1f} |")
PY
