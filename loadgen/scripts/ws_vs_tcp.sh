#!/usr/bin/env bash
# Fan-out and push over WebSocket vs TCP, the same gateway config, each run against a
# fresh gateway. Usage: loadgen/scripts/ws_vs_tcp.sh GATEWAY_BIN LOADGEN_BIN
set -u
gw=${1:?gateway binary}; lg=${2:?loadgen binary}; out=${OUT:-.}/ws-vs-tcp; mkdir -p $out
dir=$(mktemp -d)
cat > $dir/fanout.toml <<TOML
[mqtt]
listen = "127.0.0.1:18830"
ws_listen = "127.0.0.1:18083"
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
cat > $dir/push.toml <<TOML
[mqtt]
listen = "127.0.0.1:18830"
ws_listen = "127.0.0.1:18083"
[http]
listen = "127.0.0.1:18080"
[log]
level = "warn"
TOML
start() { (cd $dir && rm -rf data && exec $gw --config $1 > $dir/gw.log 2>&1) & PID=$!; for i in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done; }
stop() { kill $PID; wait $PID 2>/dev/null; }
for t in tcp ws; do
  port=18830; [ $t = ws ] && port=18083
  start fanout.toml
  $lg fanout --transport $t --target 127.0.0.1:$port --publisher-target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 5 --qos 0 --size 64 --drain 10 --server-pid $PID --json > $out/fanout0-$t.json 2>$out/fanout0-$t.err
  stop
  start fanout.toml
  $lg fanout --transport $t --target 127.0.0.1:$port --publisher-target 127.0.0.1:18830 --subscribers 100 --rate 20000 --duration 1 --qos 1 --size 64 --drain 15 --client-id 'q1-{i}' --server-pid $PID --json > $out/fanout1-$t.json 2>$out/fanout1-$t.err
  stop
  start push.toml
  $lg push --transport $t --target 127.0.0.1:$port --http http://127.0.0.1:18080 --conns 10000 --connect-rate 5000 --rate 2000 --duration 10 --batch 1 --qos 1 --server-pid $PID --json > $out/push-$t.json 2>$out/push-$t.err
  stop
done
rm -rf $dir; echo done
