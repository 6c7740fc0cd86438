#!/usr/bin/env bash
# Before/after benchmark of the shard restructure: same loadgen, same commands, each
# gateway fresh per run, results in $OUT/results-LABEL (default: here). Usage:
#   loadgen/scripts/before_after.sh LABEL GATEWAY_BIN LOADGEN_BIN
set -u
label=$1; gw=$2; lg=$3
out=${OUT:-.}/results-$label; mkdir -p $out
dir=$(mktemp -d)
cat > $dir/gateway.toml <<TOML
[mqtt]
listen = "127.0.0.1:18830"
[http]
listen = "127.0.0.1:18080"
[log]
level = "warn"
TOML
cat > $dir/fanout.toml <<TOML
[mqtt]
listen = "127.0.0.1:18830"
[http]
listen = "127.0.0.1:18080"
[log]
level = "warn"
[acl]
enabled = false
[limits]
max_connect_rate = 1000000
connect_burst = 1000000
max_handshaking = 1000000
publish_rate = 1000000
bytes_rate = 1073741824
[store]
enabled = false
TOML
start() { (cd $dir && rm -rf data && exec $gw --config $1 > $dir/gw.log 2>&1) & PID=$!; for i in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done; }
stop() { kill $PID; wait $PID 2>/dev/null; }
start gateway.toml
$lg connect --target 127.0.0.1:18830 --conns 19000 --rate 5000 --hold 15 --keepalive 180 --sub-qos 1 --client-id 'gateway-bench-d{i}' --server-pid $PID --metrics-url http://127.0.0.1:18080/metrics --json > $out/idle.json 2>$out/idle.err
stop
start gateway.toml
$lg push --target 127.0.0.1:18830 --http http://127.0.0.1:18080 --conns 10000 --connect-rate 5000 --rate 2000 --duration 10 --batch 1 --qos 1 --server-pid $PID --json > $out/push.json 2>$out/push.err
stop
start fanout.toml
$lg fanout --target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 5 --qos 0 --size 64 --drain 10 --server-pid $PID --json > $out/fanout0.json 2>$out/fanout0.err
stop
start fanout.toml
$lg fanout --target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 1 --qos 1 --size 64 --drain 15 --client-id 'q1-{i}' --server-pid $PID --json > $out/fanout1.json 2>$out/fanout1.err
stop
rm -rf $dir
echo done $label
