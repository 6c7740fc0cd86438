#!/usr/bin/env bash
# Where a broker's threads spend the per-device benchmark (per_device.sh's scenario:
# 10,000 MQTT 3.1.1 devices on dev/<id>/cmd at QoS 1, one publisher at RATE QoS 0
# messages a second, 64-byte payloads), measured over a 10 s window in the middle of the
# run: each thread's time on a CPU and its voluntary and involuntary context switches
# (/proc/PID/task/*/schedstat and status), and its sendto calls (perf stat, a tracepoint
# count that does not slow the broker). RATE (5000), SECS (20).
#
# Usage: per_device_threads.sh gateway|gateway-1shard|mosquitto GATEWAY_BIN LOADGEN_BIN OUT
set -u
broker=$1 gw=$2 lg=$3 out=$4
rate=${RATE:-5000} secs=${SECS:-20}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
dir=$(mktemp -d)
write_per_device_configs "$dir"
case $broker in
  gateway*) start_gateway "$gw" "$dir" "$broker.toml" ;;
  mosquitto) start_peer "$dir" mosquitto -c "$dir/mosquitto.conf" ;;
  *) echo "unknown broker $broker" >&2; exit 2 ;;
esac || exit 1
"$lg" fanout --target 127.0.0.1:18830 --protocol 4 --subscribers 10000 \
  --connect-rate 5000 --topic 'dev/{id}/cmd' --client-id 'pd-{i}' --rate "$rate" \
  --duration "$secs" --qos 0 --sub-qos 1 --size 64 --drain 5 --server-pid "$PID" \
  --json > "$out.json" 2> "$out.err" &
load=$!
threads() {
  for t in /proc/"$PID"/task/*; do
    echo "$(cat "$t/comm") $(cut -d' ' -f1 "$t/schedstat") $(grep -h nonvol "$t/status" | cut -f2) $(grep -h '^voluntary' "$t/status" | cut -f2)"
  done
}
sleep $((secs / 2 - 2))
echo "== progress: measuring 10 s of $broker" >&2
threads > "$out.before"
perf stat --per-thread -e syscalls:sys_enter_sendto -p "$PID" -o "$out.sendto" -- sleep 10 > /dev/null 2>&1
threads > "$out.after"
wait $load
stop_gateway
echo "$broker, 10 s window: thread, ms on a CPU, involuntary and voluntary switches"
paste "$out.before" "$out.after" | awk '$6 > $2 { printf "  %s %.1f ms, %d involuntary, %d voluntary\n", $1, ($6-$2)/1e6, $7-$3, $8-$4 }'
grep sendto "$out.sendto" | awk '$2 ~ /^[0-9]+$/ { printf "  %s sendto %s\n", $1, $2 }'
echo "  run: $(tail -c 330 "$out.json")"
rm -rf "$dir"
