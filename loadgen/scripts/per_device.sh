#!/usr/bin/env bash
# Issue 25's device-command benchmark, side by side with Mosquitto in one run
# (docs/BENCHMARKS.md, "Per-device topics"): 10,000 MQTT 3.1.1 devices, each subscribed at
# QoS 1 to its own topic dev/<client id>/cmd, one publisher sending QoS 0 messages round
# robin to their topics at RATE a second for SECS seconds (64-byte payloads).
# The gateway runs with the shipped defaults except [acl] enabled = false (the publisher
# writes to other devices' topics) and [limits] raised for the one publisher and the
# connect ramp; three variants: the default shard count (one per core), interest routing
# off ([shards] interest_buckets = 0), and one shard. Mosquitto with allow_anonymous and no
# persistence. Each broker is fresh for each run; the runs are interleaved.
#
# Usage: per_device.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR [REPEATS]
#   BROKERS="gateway gateway-nointerest gateway-1shard mosquitto" (the default) picks the
#   runs; RATE (5000), SECS (30), DEVICES (10000).
set -u
gw=$1 lg=$2 out=$3 repeats=${4:-1}
brokers=${BROKERS:-gateway gateway-nointerest gateway-1shard mosquitto}
rate=${RATE:-5000} secs=${SECS:-30} devices=${DEVICES:-10000}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
mkdir -p "$out"
dir=$(mktemp -d)
write_per_device_configs "$dir"

run() { # NAME
  "$lg" fanout --target 127.0.0.1:18830 --protocol 4 --subscribers "$devices" \
    --connect-rate 5000 --topic 'dev/{id}/cmd' --client-id 'pd-{i}' --rate "$rate" \
    --duration "$secs" --qos 0 --sub-qos 1 --size 64 --drain 10 --server-pid "$PID" \
    --json > "$out/$1.json" 2> "$out/$1.err"
  echo "$1: $(tail -c 400 "$out/$1.json")"
}

for r in $(seq "$repeats"); do
  for b in $brokers; do
    case $b in
      gateway*) start_gateway "$gw" "$dir" "$b.toml" ;;
      mosquitto) start_peer "$dir" mosquitto -c "$dir/mosquitto.conf" ;;
    esac && run "$b-$r"
    stop_gateway
  done
done
rm -rf "$dir"
