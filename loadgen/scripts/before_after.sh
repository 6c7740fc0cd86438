#!/usr/bin/env bash
# Before/after benchmark of the shard restructure: same loadgen, same commands, each
# gateway fresh per run, results in $OUT/results-LABEL (default: here). Usage:
#   loadgen/scripts/before_after.sh LABEL GATEWAY_BIN LOADGEN_BIN
set -u
label=$1; gw=$2; lg=$3
out=${OUT:-.}/results-$label; mkdir -p $out
. "$(dirname "$0")/bench_lib.sh"
dir=$(mktemp -d)
write_configs $dir
start_gateway $gw $dir defaults.toml
$lg connect --target 127.0.0.1:18830 --conns 19000 --rate 5000 --hold 15 --keepalive 180 --sub-qos 1 --client-id 'gateway-bench-d{i}' --server-pid $PID --metrics-url http://127.0.0.1:18080/metrics --json > $out/idle.json 2>$out/idle.err
stop_gateway
start_gateway $gw $dir defaults.toml
$lg push --target 127.0.0.1:18830 --http http://127.0.0.1:18080 --conns 10000 --connect-rate 5000 --rate 2000 --duration 10 --batch 1 --qos 1 --server-pid $PID --json > $out/push.json 2>$out/push.err
stop_gateway
start_gateway $gw $dir fanout.toml
$lg fanout --target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 5 --qos 0 --size 64 --drain 10 --server-pid $PID --json > $out/fanout0.json 2>$out/fanout0.err
stop_gateway
start_gateway $gw $dir fanout.toml
$lg fanout --target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 1 --qos 1 --size 64 --drain 15 --client-id 'q1-{i}' --server-pid $PID --json > $out/fanout1.json 2>$out/fanout1.err
stop_gateway
rm -rf $dir
echo done $label
