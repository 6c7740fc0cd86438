# Shared by the benchmark scripts here (source it): the gateway configs they measure
# with, and starting and stopping a fresh gateway for each run.
#
#   write_configs DIR [EXTRA]   DIR/defaults.toml: the shipped defaults with loopback
#                               listen addresses and [log] level = "warn";
#                               DIR/fanout.toml: the same with the ACL off, [limits]
#                               raised and the store off (docs/BENCHMARKS.md);
#                               EXTRA: more [mqtt] lines for both (e.g. ws_listen)
#   fleet_configs, start_fleet, stop_fleet: a two-node fleet on nats-server (below)
#   write_per_device_configs DIR the per-device benchmark's gateway and Mosquitto configs
#                               (below)
#   start_gateway GW DIR CONFIG [HTTP_PORT]
#                               starts GW in DIR on DIR/CONFIG with an empty store and
#                               waits for /readyz (on HTTP_PORT, default 18080); its PID
#                               is in $PID
#   start_peer DIR CMD...        starts a peer broker (CMD) listening on 127.0.0.1:18830,
#                               its output in DIR/peer.log; its PID is in $PID
#   stop_gateway                 SIGTERM to $PID, and waits for it (a peer too)
#   wait_port PORT               waits (up to 10 s) until something listens on
#                               127.0.0.1:PORT
#   start_nats DIR PORT          starts nats-server with JetStream on 127.0.0.1:PORT, its
#                               store in DIR/nats, its output in DIR/nats.log, and waits
#                               until it listens; its PID is in $PID
#   cpu_secs PID...              the CPU seconds (user + system) the processes used so far
#                               (/proc/PID/stat), summed
#   connections HTTP_PORT        the gateway's open connections on that HTTP port,
#                               summed over its shards
#   make_tls_certs DIR           DIR/ca.pem, DIR/server.pem, DIR/server.key: a throwaway
#                               ECDSA P-256 CA and a server certificate for 127.0.0.1
#   write_tls_config DIR MQTT TLS HTTP
#                               DIR/gateway.toml: loopback listeners on those ports (TLS
#                               with DIR's certificates), connect limits raised, no store

write_configs() {
  local dir=$1 extra=${2:-}
  local base
  base=$(printf '[mqtt]\nlisten = "127.0.0.1:18830"\n%s\n[http]\nlisten = "127.0.0.1:18080"\n[log]\nlevel = "warn"\n' "$extra")
  printf '%s\n' "$base" > "$dir/defaults.toml"
  cat > "$dir/fanout.toml" <<TOML
$base
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
}

# The per-device benchmark's brokers in DIR (per_device.sh, per_device_threads.sh):
# gateway.toml (the shipped defaults, [acl] off for the one publisher writing to every
# device's topic, [limits] raised for it and the connect ramp), gateway-nointerest.toml
# ([shards] interest_buckets = 0), gateway-1shard.toml ([shards] count = 1), and
# mosquitto.conf (anonymous, no persistence).
write_per_device_configs() {
  local dir=$1
  write_configs "$dir"
  cat "$dir/defaults.toml" - > "$dir/gateway.toml" <<'TOML'
[acl]
enabled = false
[limits]
publish_rate = 1000000
bytes_rate = 1073741824
max_connect_rate = 1000000
connect_burst = 1000000
max_handshaking = 1000000
TOML
  cp "$dir/gateway.toml" "$dir/gateway-nointerest.toml"
  printf '[shards]\ninterest_buckets = 0\n' >> "$dir/gateway-nointerest.toml"
  cp "$dir/gateway.toml" "$dir/gateway-1shard.toml"
  printf '[shards]\ncount = 1\n' >> "$dir/gateway-1shard.toml"
  printf 'listener 18830 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000\n' > "$dir/mosquitto.conf"
}

start_gateway() {
  local gw dir=$2 config=$3 http=${4:-18080}
  # Absolute: the gateway runs in DIR (its store goes there).
  gw=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
  (cd "$dir" && rm -rf data && exec "$gw" --config "$config" > "$dir/gw.log" 2>&1) &
  PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$http/readyz" > /dev/null && return 0
    sleep 0.1
  done
  echo "gateway did not become ready; see $dir/gw.log" >&2
  return 1
}

start_peer() {
  local dir=$1
  shift
  ("$@" > "$dir/peer.log" 2>&1) &
  PID=$!
  wait_port 18830 || { echo "$1 did not listen; see $dir/peer.log" >&2; return 1; }
}

wait_port() {
  for _ in $(seq 100); do
    (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

stop_gateway() {
  kill "$PID"
  wait "$PID" 2> /dev/null
}

start_nats() {
  local dir=$1 port=$2
  (exec nats-server -js -a 127.0.0.1 -p "$port" -sd "$dir/nats" > "$dir/nats.log" 2>&1) &
  PID=$!
  wait_port "$port" || { echo "nats-server did not listen; see $dir/nats.log" >&2; return 1; }
}

# A two-node fleet in DIR: nats-server with JetStream on FLEET_NATS_PORT (14222), nodes a (MQTT 18830,
# HTTP 18080) and b (18831, 18081) on the shipped defaults plus [cluster] enabled,
# [acl] enabled = false and [limits] publish_rate / bytes_rate raised (fleet_fanout.sh,
# fleet_wills.sh). fleet_configs writes the configs; start_fleet starts all three
# (fresh NATS storage, fresh stores) with their PIDs in FLEET_PIDS; stop_fleet stops
# them, gateways first.
FLEET_NATS_PORT=14222
fleet_configs() { # DIR
  local node mqtt http
  for node in a:18830:18080 b:18831:18081; do
    IFS=: read -r node mqtt http <<< "$node"
    mkdir -p "$1/$node"
    cat > "$1/$node/gateway.toml" <<TOML
[mqtt]
listen = "127.0.0.1:$mqtt"
[http]
listen = "127.0.0.1:$http"
[log]
level = "warn"
[acl]
enabled = false
[limits]
publish_rate = 1000000
bytes_rate = 1073741824
[cluster]
enabled = true
node_id = "$node"
nats_url = "nats://127.0.0.1:$FLEET_NATS_PORT"
TOML
  done
}

# Makes OUT and a temporary directory, in $dir, holding the fleet's configs.
fleet_workdir() { # OUT
  mkdir -p "$1" && dir=$(mktemp -d) && fleet_configs "$dir"
}

FLEET_PIDS=()
start_fleet() { # GW DIR
  rm -rf "$2/nats"
  start_nats "$2" "$FLEET_NATS_PORT" && FLEET_PIDS=("$PID") &&
    start_gateway "$1" "$2/a" gateway.toml 18080 && FLEET_PIDS+=("$PID") &&
    start_gateway "$1" "$2/b" gateway.toml 18081 && FLEET_PIDS+=("$PID")
}

stop_fleet() { # only the PIDs start_fleet started, gateways first
  local i
  for ((i = ${#FLEET_PIDS[@]} - 1; i >= 0; i--)); do
    kill "${FLEET_PIDS[i]}" 2> /dev/null
    wait "${FLEET_PIDS[i]}" 2> /dev/null
  done
  FLEET_PIDS=()
}

connections() {
  curl -sf "http://127.0.0.1:$1/metrics" |
    awk '$1 ~ /^gateway_connections[{]/ { s += $2 } END { print s + 0 }'
}

cpu_secs() {
  local ticks=0 pid stat f
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat") || continue
    # The fields after the ") " that ends the command name: utime is the 12th, stime the 13th.
    read -ra f <<< "${stat##*) }"
    ticks=$((ticks + f[11] + f[12]))
  done
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f\n", t / hz }'
}

make_tls_certs() {
  local dir=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=test-ca -keyout "$dir/ca.key" -out "$dir/ca.pem" 2> /dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2> /dev/null
  printf 'subjectAltName=IP:127.0.0.1\n' > "$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/san.ext" -out "$dir/server.pem" 2> /dev/null
}

write_tls_config() {
  local dir=$1 mqtt=$2 tls=$3 http=$4
  cat > "$dir/gateway.toml" <<TOML
[mqtt]
listen = "127.0.0.1:$mqtt"
tls_listen = "127.0.0.1:$tls"
tls_cert = "$dir/server.pem"
tls_key = "$dir/server.key"
[http]
listen = "127.0.0.1:$http"
[log]
level = "warn"
[limits]
max_connect_rate = 1000000
connect_burst = 1000000
max_handshaking = 1000000
max_connections_per_ip = 0
[store]
enabled = false
TOML
}
