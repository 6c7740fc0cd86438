#!/usr/bin/env bash
# A TLS reconnect storm beside established TLS devices (issue 23): STORM devices over
# TLS connect, all drop at once and reconnect without backoff, while PUSH other TLS
# devices receive pushes at RATE/s through the HTTP API; the pushes' latency is
# compared with a calm run (the same pushes, no storm). Run with session tickets on
# (`--tls-resume on`: reconnects resume) and off (every reconnect is a full handshake).
# Each run gets a fresh gateway. Reported per run: the pushes' p50/p99, how long until
# every storm device was back, the gateway's full and resumed handshakes
# (gateway_tls_handshakes_total), handshakes deferred by the per-turn budget, and the
# gateway's CPU seconds over the storm run (full handshakes per CPU second with
# resumption off is the per-core figure: every handshake of that run is full).
#
# Usage: loadgen/scripts/tls_storm.sh GATEWAY_BIN LOADGEN_BIN [STORM] [PUSH] [RATE]
#   defaults 5000 storm devices, 1000 push devices, 1000 pushes/s (issue 23's storm).
#   PORT (default 28930) is the first of three loopback ports; OUT (default .) where
#   the JSON summaries go; PER_TURN sets [limits] tls_handshakes_per_turn; HS_THREADS
#   and HS_NICE set [limits] tls_handshake_threads and tls_handshake_nice
#   (HS_THREADS=shards: handshakes on the shards); STORM_NICE=19 runs the storm's clients at
#   the lowest CPU priority.
set -u
gw=${1:?gateway binary}; lg=${2:?loadgen binary}
storm=${3:-5000}; push=${4:-1000}; rate=${5:-1000}
port=${PORT:-28930}; out=${OUT:-.}/tls-storm; mkdir -p "$out"
mqtt=$port; tls=$((port + 1)); http=$((port + 2))
dir=$(mktemp -d)
ulimit -n "$(ulimit -Hn)"
. "$(dirname "$0")/bench_lib.sh"
make_tls_certs "$dir"

write_tls_config "$dir" "$mqtt" "$tls" "$http"
# STORM_NICE=N runs the storm's clients at nice N (they share this machine's cores with
# the gateway; on a real network they are other machines): the default 0 does not.
storm_nice=""; [ "${STORM_NICE:-0}" != 0 ] && storm_nice="nice -n $STORM_NICE"
# PER_TURN: the gateway's [limits] tls_handshakes_per_turn (default: the shipped one)
[ -n "${PER_TURN:-}" ] && sed -i "/^\[limits\]/a tls_handshakes_per_turn = $PER_TURN" "$dir/gateway.toml"
# HS_THREADS / HS_NICE: the TLS handshake threads (default: the shipped ones)
case "${HS_THREADS:-}" in
  "") ;;
  shards) sed -i "/^\[limits\]/a tls_handshakes_on_shards = true" "$dir/gateway.toml" ;;
  *) sed -i "/^\[limits\]/a tls_handshake_threads = $HS_THREADS" "$dir/gateway.toml" ;;
esac
[ -n "${HS_NICE:-}" ] && sed -i "/^\[limits\]/a tls_handshake_nice = $HS_NICE" "$dir/gateway.toml"

tls_args="--tls --ca $dir/ca.pem"
metric() {
  curl -sf "http://127.0.0.1:$http/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

start() {
  start_gateway "$gw" "$dir" gateway.toml "$http"
}

stop() {
  stop_gateway
}

pushes() {
  "$lg" push --target "127.0.0.1:$tls" $tls_args --http "http://127.0.0.1:$http" \
    --conns "$push" --connect-rate 2000 --rate "$rate" --duration "$1" --qos 1 \
    --client-id 'p-{i}' --json --quiet > "$out/$2-push.json" 2> "$out/$2-push.err"
}

report() {
  python3 - "$out" "$1" "$2" "$3" "$4" "$5" "$6" <<'PY'
import json, os, sys
out, name, full, resumed, deferred, cpu0, cpu1 = sys.argv[1:]
def last(f):
    p = os.path.join(out, f)
    return json.loads(open(p).read().strip().splitlines()[-1]) if os.path.exists(p) else {}
p = last(f"{name}-push.json").get("latency_ms", {})
rounds = last(f"{name}-storm.json").get("rounds") or [{}]
cpu = float(cpu1 or 0) - float(cpu0 or 0)
back = rounds[0].get("time_to_all_back_ms")
print(f"| {name} | {p.get('p50')} / {p.get('p99')} | {back} | {full} / {resumed} | {deferred} | {cpu:.2f} | {float(full or 0) / cpu if cpu else 0:.0f} |")
PY
}

echo "| run ($storm storm, $push push devices at $rate/s) | push p50 / p99 ms | storm: all back after ms | handshakes full / resumed | deferred | gateway CPU s | full handshakes / CPU s |"
echo "|---|---|---|---|---|---|---|"
start
cpu0=$(metric process_cpu_seconds_total)
pushes 10 calm
report calm "$(metric 'gateway_tls_handshakes_total{kind="full"}')" \
  "$(metric 'gateway_tls_handshakes_total{kind="resumed"}')" \
  "$(metric gateway_tls_handshakes_deferred_total)" "$cpu0" "$(metric process_cpu_seconds_total)"
stop
for resume in on off; do
  name=storm-resume-$resume
  start
  cpu0=$(metric process_cpu_seconds_total)
  pushes 20 "$name" &
  pusher=$!
  sleep 3
  $storm_nice "$lg" storm --target "127.0.0.1:$tls" $tls_args --tls-resume $resume --conns "$storm" \
    --connect-rate 5000 --backoff none --settle 2 --round-timeout 60 --client-id 's-{i}' \
    --json --quiet > "$out/$name-storm.json" 2> "$out/$name-storm.err"
  wait $pusher
  report "$name" "$(metric 'gateway_tls_handshakes_total{kind="full"}')" \
    "$(metric 'gateway_tls_handshakes_total{kind="resumed"}')" \
    "$(metric gateway_tls_handshakes_deferred_total)" "$cpu0" "$(metric process_cpu_seconds_total)"
  stop
done
rm -rf "$dir"
