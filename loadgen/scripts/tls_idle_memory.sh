#!/usr/bin/env bash
# User-space memory per idle connection: plain MQTT vs MQTT over TLS 1.3 and TLS 1.2
# (`loadgen --tls-version 1.2`), on the gateway
# and on Mosquitto's TLS listener (OpenSSL), measured the same way: N devices connect
# (CONNECT/CONNACK, one SUBSCRIBE, then idle) and loadgen reads the server's RSS before
# and while they are held (`server.bytes_per_conn` = RSS growth / connections). Each
# run gets a fresh server. Certificates: a throwaway ECDSA P-256 CA and server
# certificate for 127.0.0.1 made with the openssl CLI.
#
# Usage: loadgen/scripts/tls_idle_memory.sh GATEWAY_BIN LOADGEN_BIN [N]
#   N (default 3000) connections per run; the issue-23 figure is N=19000 on a quiet
#   machine with release builds. PORT (default 28830) is the first of five loopback
#   ports used; OUT (default .) where the JSON summaries go; MOSQUITTO=0 skips Mosquitto;
#   HS_THREADS=shards runs the gateway's TLS handshakes on its shards.
set -u
gw=${1:?gateway binary}; lg=${2:?loadgen binary}; n=${3:-3000}
port=${PORT:-28830}; out=${OUT:-.}/tls-idle-memory; mkdir -p "$out"
mqtt=$port; tls=$((port + 1)); http=$((port + 2)); mq=$((port + 3)); mqtls=$((port + 4))
dir=$(mktemp -d)
ulimit -n "$(ulimit -Hn)"

. "$(dirname "$0")/bench_lib.sh"
make_tls_certs "$dir"

write_tls_config "$dir" "$mqtt" "$tls" "$http"
# HS_THREADS=shards: the TLS handshakes on the shards (tls_handshakes_on_shards).
[ "${HS_THREADS:-}" = shards ] && sed -i "/^\[limits\]/a tls_handshakes_on_shards = true" "$dir/gateway.toml"

cat > "$dir/mosquitto.conf" <<CONF
per_listener_settings false
user $(id -un)
allow_anonymous true
persistence false
log_dest none
max_connections -1
listener $mq 127.0.0.1
listener $mqtls 127.0.0.1
cafile $dir/ca.pem
certfile $dir/server.pem
keyfile $dir/server.key
CONF

# run NAME TARGET_PORT [LOADGEN_ARGS...]: N idle devices against the server $PID.
run() {
  local name=$1 target=$2; shift 2
  "$lg" connect --target "127.0.0.1:$target" --conns "$n" --rate 5000 --hold 5 \
    --server-pid "$PID" --json --quiet "$@" > "$out/$name.json" 2> "$out/$name.err"
  python3 - "$out/$name.json" "$name" <<'PY'
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
srv = s.get("server") or {}
print(f"| {sys.argv[2]} | {s.get('connected')} | {srv.get('rss_before_mb')} | {srv.get('rss_loaded_mb')} | {srv.get('bytes_per_conn')} |")
PY
}

start_mosquitto() {
  mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
  PID=$!
  wait_port "$mqtls"
}

stop() {
  kill "$PID"
  wait "$PID" 2> /dev/null
}

echo "| server, $n idle connections | connected | RSS before (MB) | RSS loaded (MB) | bytes per connection |"
echo "|---|---|---|---|---|"
start_gateway "$gw" "$dir" gateway.toml "$http" && run gateway-plain "$mqtt"; stop
start_gateway "$gw" "$dir" gateway.toml "$http" && run gateway-tls "$tls" --tls --ca "$dir/ca.pem"; stop
start_gateway "$gw" "$dir" gateway.toml "$http" && run gateway-tls1.2 "$tls" --tls --ca "$dir/ca.pem" --tls-version 1.2; stop
if [ "${MOSQUITTO:-1}" != 0 ] && command -v mosquitto > /dev/null; then
  start_mosquitto && run mosquitto-plain "$mq"; stop
  start_mosquitto && run mosquitto-tls "$mqtls" --tls --ca "$dir/ca.pem"; stop
  start_mosquitto && run mosquitto-tls1.2 "$mqtls" --tls --ca "$dir/ca.pem" --tls-version 1.2; stop
fi
rm -rf "$dir"
