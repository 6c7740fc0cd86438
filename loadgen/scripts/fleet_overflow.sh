#!/usr/bin/env bash
# The registry queue overflowing on a real fleet, at scale: DEVICES MQTT 3.1.1 devices
# connect to node a at RATE a second while nats-server is stopped (SIGSTOP) for PAUSE
# seconds, with node a's [cluster] registry_queue_capacity = QUEUE, so node a's registry
# queue drops most of their `connected` changes. Then how long after NATS resumes every
# device is reachable through node b: GET /v1/clients/{id} on node b answers for each
# one from node a (polled over all devices, progress printed each round). Also node a's
# dropped changes, and its failed lease renewals and registry writes (0 when only the
# overflow listing, not a rejoin after an outage, wrote the devices back).
#
# Usage: fleet_overflow.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR
#   DEVICES (10000), RATE (5000), PAUSE (3), QUEUE (1000); bench_lib.sh's fleet ports.
set -u
gw=$1 lg=$2 out=$3
devices=${DEVICES:-10000} rate=${RATE:-5000} pause=${PAUSE:-3} queue=${QUEUE:-1000}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
fleet_workdir "$out"
printf 'registry_queue_capacity = %s\n' "$queue" >> "$dir/a/gateway.toml"
LG_PID=
trap '[ -n "$LG_PID" ] && kill "$LG_PID" 2> /dev/null; stop_fleet; rm -rf "$dir"' EXIT

metric() { # HTTP_PORT SAMPLE
  curl -sf "http://127.0.0.1:$1/metrics" |
    awk -v s="$2" '$1 == s { print $2; f = 1 } END { if (!f) print 0 }'
}

start_fleet "$gw" "$dir" || exit 1
nats_pid=${FLEET_PIDS[0]}
echo "== progress: $devices devices to node a at $rate/s; NATS stopped for ${pause}s" >&2
"$lg" connect --target 127.0.0.1:18830 --conns "$devices" --rate "$rate" --hold 600 \
  --client-id 'ov-{i}' --json > "$out/connect.json" 2> "$out/connect.err" &
LG_PID=$!
sleep 0.2
kill -STOP "$nats_pid"
sleep "$pause"
kill -CONT "$nats_pid"
resumed=$(date +%s.%N)
for _ in $(seq 600); do
  [ "$(connections 18080)" -ge "$devices" ] && break
  sleep 0.1
done
connected=$(date +%s.%N)

python3 - "$devices" "$resumed" "$connected" > "$out/reach.txt" <<'PY'
import concurrent.futures, json, sys, time, urllib.request
devices, resumed, connected = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])

def on_a(i):
    """Whether node b answers for device i from node a."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:18081/v1/clients/ov-{i}", timeout=5) as r:
            return json.load(r).get("node") == "a"
    except Exception:
        return False

left = list(range(devices))
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    while left and time.time() < resumed + 120:
        left = [i for i, ok in zip(left, pool.map(on_a, left)) if not ok]
        print(f"== progress: {devices - len(left)} of {devices} reachable through node b, "
              f"{time.time() - resumed:.1f} s after NATS resumed", file=sys.stderr)
        if left:
            time.sleep(0.5)
done = time.time()
print(f"reachable {devices - len(left)} of {devices}; all connected {connected - resumed:.1f} s "
      f"after NATS resumed; all reachable {done - resumed:.1f} s after it "
      f"(the last poll round included)")
PY
cat "$out/reach.txt"
echo "node a: dropped $(metric 18080 'gateway_events_dropped_total{sink="registry",reason="queue_full_oldest"}')," \
  "lease errors $(metric 18080 'gateway_fleet_registry_ops_total{op="lease",outcome="error"}')," \
  "rejected writes $(metric 18080 'gateway_events_dropped_total{sink="registry",reason="rejected"}')," \
  "registry updates $(metric 18080 'gateway_fleet_registry_ops_total{op="update",outcome="ok"}')" |
  tee -a "$out/reach.txt"
grep -h -e "registry queue was full" -e "missed written" "$dir/a/gw.log" | tail -3 | tee -a "$out/reach.txt"
