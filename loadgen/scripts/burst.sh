#!/usr/bin/env bash
# The two bursts of issue 18, measured the way a new user would, side by side with
# Mosquitto and rumqttd in one run (docs/BENCHMARKS.md, "Bursts with the shipped
# defaults"): one publisher, 100 MQTT 3.1.1 subscribers of one topic, 64-byte payloads,
#   QoS 0: 200,000 messages as fast as the publisher can write them;
#   QoS 1: QoS 1 subscriptions, 20,000 messages with 100 unacknowledged at most.
# The gateway runs with the shipped defaults except [acl] enabled = false (the topic is
# outside devices/<id>/) and [limits] publish_rate / bytes_rate raised (one publisher);
# Mosquitto with allow_anonymous and no persistence; rumqttd with its sample router
# settings and one v4 listener. Each broker is fresh for each run.
#
# Usage: burst.sh GATEWAY_BIN LOADGEN_BIN RUMQTTD_BIN OUT_DIR [REPEATS]
#   QOS="0 1" and BROKERS="gateway mosquitto rumqttd" (the defaults) pick the runs.
set -u
gw=$1 lg=$2 rumqttd=$3 out=$4 repeats=${5:-1}
qos_list=${QOS:-0 1} brokers=${BROKERS:-gateway mosquitto rumqttd}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
mkdir -p "$out"
dir=$(mktemp -d)
write_configs "$dir"
cat "$dir/defaults.toml" - > "$dir/burst.toml" <<'TOML'
[acl]
enabled = false
[limits]
publish_rate = 1000000
bytes_rate = 1073741824
TOML
cat > "$dir/mosquitto.conf" <<'CONF'
listener 18830 127.0.0.1
allow_anonymous true
persistence false
CONF
cat > "$dir/rumqttd.toml" <<'TOML'
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:18830"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
dynamic_filters = true
TOML

burst() { # NAME QOS
  local name=$1 qos=$2
  case $qos in
    0) "$lg" fanout --target 127.0.0.1:18830 --protocol 4 --subscribers 100 --burst 200000 \
         --qos 0 --size 64 --drain 10 --server-pid "$PID" --json ;;
    1) "$lg" fanout --target 127.0.0.1:18830 --protocol 4 --subscribers 100 --burst 20000 \
         --qos 1 --sub-qos 1 --window 100 --size 64 --drain 15 --client-id 'q1-{i}' \
         --server-pid "$PID" --json ;;
  esac > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: $(tail -c 400 "$out/$name.json")"
}

for r in $(seq "$repeats"); do
  for qos in $qos_list; do
    for b in $brokers; do
      case $b in
        gateway) start_gateway "$gw" "$dir" burst.toml ;;
        mosquitto) start_peer "$dir" mosquitto -c "$dir/mosquitto.conf" ;;
        rumqttd) start_peer "$dir" "$rumqttd" -c "$dir/rumqttd.toml" ;;
      esac && burst "$b-q$qos-$r" "$qos"
      stop_gateway
    done
  done
done
rm -rf "$dir"
