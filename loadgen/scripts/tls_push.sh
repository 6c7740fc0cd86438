#!/usr/bin/env bash
# Pushes to TLS devices on the gateway's own record layer, TLS 1.2 and TLS 1.3
# (docs/BENCHMARKS.md, "Seventh session"): 10,000 devices on the TLS listener of
# bench_lib.sh's write_tls_config, each version once at the highest rate (batches of
# 1000, 8 in flight, 2,000,000 pushes) and once at 2,000 pushes/s one per request; 7 s
# into each run the gateway's metrics say how many connections are on the record layer.
# Each run gets a fresh gateway.
#
# Usage: tls_push.sh GATEWAY_BIN LOADGEN_BIN OUT [VERSIONS]
#   VERSIONS: "1.2 1.3" (default); ports 28830-28832
set -u
gw=$1 lg=$2 out=$3 versions=${4:-1.2 1.3}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
mkdir -p "$out"
d=$(mktemp -d)
make_tls_certs "$d"
write_tls_config "$d" 28830 28831 28832
summary() {
  python3 -c "
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); l = s['latency_ms']
print(sys.argv[2], s['delivered'], 'lost', s['lost'], 'duplicated', s['duplicated'], 'pushes/s', round(s['push_rate']),
      'gateway CPU s/100k', (s.get('server') or {}).get('cpu_s_per_100k_msgs'), 'p50/p99 ms', l['p50'], l['p99'])" "$1" "$2"
}
for v in $versions; do
  for rate in 200000 2000; do
    batch=1000; [ "$rate" = 2000 ] && batch=1
    name="tls${v}_$rate"
    start_gateway "$gw" "$d" gateway.toml 28832 || exit 1
    "$lg" push --target 127.0.0.1:28831 --tls --tls-ca "$d/ca.pem" --tls-version "$v" \
      --http http://127.0.0.1:28832 --conns 10000 --connect-rate 5000 --rate "$rate" \
      --duration 10 --batch "$batch" --concurrency 8 --client-id "t$v-$rate-{i}" --qos 1 \
      --server-pid "$PID" --json > "$out/$name.json" 2> "$out/$name.err" &
    lp=$!
    sleep 7
    curl -s http://127.0.0.1:28832/metrics \
      | grep -E '^gateway_tls_record_connections|^gateway_tls_handshake_failures_total' \
      | tr '\n' ' '
    echo
    wait "$lp"
    stop_gateway
    summary "$out/$name.json" "TLS $v, $rate/s:"
  done
done
rm -rf "$d"
