#!/usr/bin/env bash
# Issue 19's fan-out across a fleet, in one run: one publisher on node A, SUBS MQTT 3.1.1
# subscribers of one topic at QoS 1, MSGS QoS 1 messages (64 bytes, 100 unacknowledged at
# most) as fast as the publisher can send them, with
#   one-node:  every subscriber on node A,
#   two-nodes: the subscribers spread over A and B (loadgen --targets A,B: every other one),
# and the CPU the fleet spent on it: both gateways and nats-server, from /proc/PID/stat
# just before and after loadgen ran (ramp, burst and drain). Both layouts run on the same
# fleet shape (nats-server with JetStream, nodes a and b), fresh for each run; in the
# one-node run node B stays idle. The added cost of a cross-node message is the two-node
# run's CPU per delivered message minus the one-node run's, times the messages delivered,
# per message node B received from NATS (gateway_fleet_messages_total{direction="in"}:
# with interest routing one per published message, not one per subscriber on B).
# The gateways run the shipped defaults plus [cluster] enabled (node ids a, b, the NATS
# below), [acl] enabled = false (the topic is outside devices/<id>/) and [limits]
# publish_rate / bytes_rate raised for the one publisher, as burst.sh.
#
# Usage: fleet_fanout.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR [REPEATS]
#   SUBS (500), MSGS (10000), LAYOUTS ("one-node two-nodes"); ports 14222 (NATS),
#   18830/18080 (node A's MQTT/HTTP) and 18831/18081 (node B's) must be free.
#   With the defaults one repeat takes well under two minutes. The added cost is a small
#   difference between two large CPU totals with many subscribers; SUBS=2 MSGS=100000
#   (one subscriber on each node, so every other delivery crosses) measures it per
#   message with less noise.
set -u
gw=$1 lg=$2 out=$3 repeats=${4:-1}
subs=${SUBS:-500} msgs=${MSGS:-10000} layouts=${LAYOUTS:-one-node two-nodes}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
lg=$(cd "$(dirname "$lg")" && pwd)/$(basename "$lg")
fleet_workdir "$out"

metric() { # HTTP_PORT SERIES
  curl -sf "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s { print $2; f = 1 } END { if (!f) print 0 }'
}

trap 'stop_fleet; rm -rf "$dir"' EXIT

run() { # NAME LAYOUT
  local name=$1 spread=() cpu0 cpu1 cross
  [ "$2" = two-nodes ] && spread=(--targets 127.0.0.1:18830,127.0.0.1:18831)
  cpu0=$(cpu_secs "${FLEET_PIDS[@]}")
  "$lg" fanout --target 127.0.0.1:18830 "${spread[@]}" --protocol 4 --subscribers "$subs" \
    --burst "$msgs" --qos 1 --sub-qos 1 --window 100 --size 64 --drain 15 \
    --client-id 'ff-{i}' --json > "$out/$name.json" 2> "$out/$name.err"
  cpu1=$(cpu_secs "${FLEET_PIDS[@]}")
  cross=$(metric 18081 'gateway_fleet_messages_total{direction="in"}')
  printf '%s %s %s %s %s\n' "$name" "$2" "$cpu0" "$cpu1" "$cross" >> "$out/runs.txt"
  echo "$name: $(tail -c 300 "$out/$name.json")"
}

: > "$out/runs.txt"
for r in $(seq "$repeats"); do
  for layout in $layouts; do
    start_fleet "$gw" "$dir" && run "$layout-$r" "$layout"
    stop_fleet
  done
done

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
print("| run | delivered/s | delivered | lost | cross-node messages | CPU s (A + B + NATS) | CPU s per 100k delivered |")
print("|---|---|---|---|---|---|---|")
for line in open(f"{out}/runs.txt"):
    name, layout, cpu0, cpu1, cross = line.split()
    try:
        s = json.loads(open(f"{out}/{name}.json").read().strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"| {name} | failed, see {out}/{name}.err | | | | | |")
        continue
    cpu, delivered, cross = float(cpu1) - float(cpu0), s["delivered"], float(cross)
    per = cpu / delivered * 1e5 if delivered else 0.0
    rows.setdefault(layout, []).append((cpu, delivered, cross))
    print(f"| {name} | {s['delivery_rate']:,.0f} | {delivered:,} | {s['lost']} | {cross:,.0f} | {cpu:.2f} | {per:.3f} |")
one, two = rows.get("one-node"), rows.get("two-nodes")
if one and two:
    # Mean CPU per delivered message in each layout; the difference is what the cross-node
    # hop added, spread over the messages that crossed.
    per_one = sum(c for c, _, _ in one) / sum(d for _, d, _ in one)
    per_two = sum(c for c, _, _ in two) / sum(d for _, d, _ in two)
    cross = sum(x for _, _, x in two) / len(two)
    delivered = sum(d for _, d, _ in two) / len(two)
    if cross:
        added = (per_two - per_one) * delivered / cross * 1e5
        print(f"\nadded CPU per 100k cross-node messages: {added:.3f} s "
              f"(one node: {per_one * 1e5:.3f} s per 100k delivered, two nodes: {per_two * 1e5:.3f} s)")
PY
