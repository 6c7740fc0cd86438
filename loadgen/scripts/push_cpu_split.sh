#!/usr/bin/env bash
# Where a push run's CPU goes on this machine, where the gateway and the load generator
# share the cores (docs/BENCHMARKS.md, "Sixth session"): one fresh gateway (the shipped
# defaults with loopback listeners), 10,000 QoS 1 devices, batched pushes (1000 a
# request, 8 in flight) at RATE a second for 12 s; for 6 s in the middle, `perf stat`
# (root) on the gateway, loadgen's parent (the HTTP pusher) and its child (the
# devices): CPU time and system calls per delivered message.
#
# Usage: push_cpu_split.sh GATEWAY_BIN LOADGEN_BIN OUT [RATE]
#   MQTT_PORT (28830), HTTP_PORT (28080)
set -u
gw=$1 lg=$2 out=$3 rate=${4:-30000}
mqtt=${MQTT_PORT:-28830} http=${HTTP_PORT:-28080}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
mkdir -p "$out"
d=$(mktemp -d)
printf '[mqtt]\nlisten = "127.0.0.1:%s"\n[http]\nlisten = "127.0.0.1:%s"\n[log]\nlevel = "warn"\n' \
  "$mqtt" "$http" > "$d/gw.toml"
start_gateway "$gw" "$d" gw.toml "$http" || exit 1
gpid=$PID
"$lg" push --target "127.0.0.1:$mqtt" --http "http://127.0.0.1:$http" --conns 10000 \
  --connect-rate 5000 --rate "$rate" --duration 12 --batch 1000 --concurrency 8 \
  --client-id 'split-{i}' --qos 1 --json > "$out/push.json" 2> "$out/push.err" &
lpid=$!
sleep 5
cpid=$(pgrep -P "$lpid" loadgen | head -1)
events=task-clock,raw_syscalls:sys_enter,sched:sched_switch
perfs=()
for p in "gateway:$gpid" "pusher:$lpid" "devices:$cpid"; do
  perf stat -x, -e "$events" -p "${p#*:}" -o "$out/${p%%:*}.stat" -- sleep 6 &
  perfs+=($!)
done
wait "$lpid"
wait "${perfs[@]}"
stop_gateway
rm -rf "$d"
msgs=$((rate * 6))
for p in gateway pusher devices; do
  awk -F, -v p="$p" -v m="$msgs" '
    $3 == "task-clock" { cpu = $1 * 1000 / m }
    $3 == "raw_syscalls:sys_enter" { sys = $1 / m }
    $3 == "sched:sched_switch" { sw = $1 / m }
    END { printf "%-8s %6.2f us CPU  %5.2f system calls  %5.3f context switches per message\n", p, cpu, sys, sw }
  ' "$out/$p.stat"
done
python3 -c "
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print('delivered', s['delivered'], 'lost', s['lost'], 'duplicated', s['duplicated'])" "$out/push.json"
