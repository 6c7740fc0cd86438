#!/usr/bin/env bash
# Fan-out and push over WebSocket vs TCP, the same gateway config, each run against a
# fresh gateway. Usage: loadgen/scripts/ws_vs_tcp.sh GATEWAY_BIN LOADGEN_BIN
set -u
gw=${1:?gateway binary}; lg=${2:?loadgen binary}; out=${OUT:-.}/ws-vs-tcp; mkdir -p $out
. "$(dirname "$0")/bench_lib.sh"
dir=$(mktemp -d)
write_configs $dir 'ws_listen = "127.0.0.1:18083"'
for t in tcp ws; do
  port=18830; [ $t = ws ] && port=18083
  start_gateway $gw $dir fanout.toml
  $lg fanout --transport $t --target 127.0.0.1:$port --publisher-target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 5 --qos 0 --size 64 --drain 10 --server-pid $PID --json > $out/fanout0-$t.json 2>$out/fanout0-$t.err
  stop_gateway
  start_gateway $gw $dir fanout.toml
  $lg fanout --transport $t --target 127.0.0.1:$port --publisher-target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 1 --qos 1 --size 64 --drain 15 --client-id 'q1-{i}' --server-pid $PID --json > $out/fanout1-$t.json 2>$out/fanout1-$t.err
  stop_gateway
  start_gateway $gw $dir defaults.toml
  $lg push --transport $t --target 127.0.0.1:$port --http http://127.0.0.1:18080 --conns 10000 --connect-rate 5000 --rate 2000 --duration 10 --batch 1 --qos 1 --server-pid $PID --json > $out/push-$t.json 2>$out/push-$t.err
  stop_gateway
done
rm -rf $dir; echo done
