#!/usr/bin/env bash
# A node stopped gracefully publishes its devices' wills to the fleet ([mqtt]
# wills_on_stop, the default). On a fresh two-node fleet (bench_lib.sh's: nats-server with
# JetStream, nodes a and b on the shipped defaults plus [cluster] enabled, the ACL off and
# [limits] publish_rate / bytes_rate raised), a QoS 1
# subscriber to status/# on node b (mosquitto_sub), DEVICES clean-session MQTT 3.1.1
# devices on node a, each with a will on status/{id} (loadgen --will-topic, QoS 1); once
# node a holds them all, SIGTERM to node a. Per run: the seconds from the signal to node
# a's exit, and the wills node b's subscriber received within AFTER seconds of it (each
# device's once: the distinct topics and all lines; AFTER is past two of node b's lease
# checks, so a will node b publishes again for node a, gone without its lease, counts).
#
# Usage: wills_on_stop.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR [REPEATS]
#   DEVICES (10000), RATE (5000), AFTER (25); ports 14222, 18830/18080, 18831/18081.
set -u
gw=$1 lg=$2 out=$3 repeats=${4:-1}
devices=${DEVICES:-10000} rate=${RATE:-5000} after=${AFTER:-25}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
lg=$(cd "$(dirname "$lg")" && pwd)/$(basename "$lg")
fleet_workdir "$out"
watch_pid="" lg_pid=""
cleanup() {
  [ -n "$lg_pid" ] && kill "$lg_pid" 2> /dev/null
  [ -n "$watch_pid" ] && kill "$watch_pid" 2> /dev/null
  stop_fleet
  rm -rf "$dir"
}
trap cleanup EXIT

: > "$out/runs.txt"
for r in $(seq "$repeats"); do
  start_fleet "$gw" "$dir" || exit 1
  mosquitto_sub -h 127.0.0.1 -p 18831 -q 1 -t 'status/#' -v > "$out/wills-$r.txt" 2> /dev/null &
  watch_pid=$!
  sleep 1 # its subscription reaches NATS
  echo "== progress: run $r, $devices devices with wills to node a at $rate/s" >&2
  "$lg" connect --target 127.0.0.1:18830 --conns "$devices" --rate "$rate" --hold 600 \
    --client-id 'wos-{i}' --will-topic 'status/{id}' --json > "$out/loadgen-$r.json" 2> "$out/loadgen-$r.err" &
  lg_pid=$!
  for _ in $(seq 600); do
    [ "$(connections 18080)" -ge "$devices" ] && break
    sleep 0.1
  done
  held=$(connections 18080)
  echo "== progress: node a holds $held; SIGTERM" >&2
  t0=$(date +%s.%N)
  kill "${FLEET_PIDS[1]}"
  wait "${FLEET_PIDS[1]}" 2> /dev/null
  t1=$(date +%s.%N)
  FLEET_PIDS=("${FLEET_PIDS[0]}" "${FLEET_PIDS[2]}") # node a is gone
  sleep "$after"
  kill "$lg_pid" "$watch_pid" 2> /dev/null
  wait "$lg_pid" "$watch_pid" 2> /dev/null
  lg_pid="" watch_pid=""
  distinct=$(awk '{ print $1 }' "$out/wills-$r.txt" | sort -u | wc -l)
  lines=$(wc -l < "$out/wills-$r.txt")
  stop_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  echo "run $r: held $held, stop took $stop_secs s, wills received $distinct distinct ($lines lines)" | tee -a "$out/runs.txt"
  stop_fleet
done
