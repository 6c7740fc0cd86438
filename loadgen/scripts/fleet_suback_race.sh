#!/usr/bin/env bash
# A message published on node a right after a device on node b read its SUBACK: does it
# arrive? TRIALS rounds on a two-node fleet (bench_lib.sh's): each round a new MQTT
# 3.1.1 device on node b subscribes at QoS 0 to a topic no one holds yet, and as soon as
# its SUBACK is read, one publisher connected to node a publishes on that topic; the
# device waits up to 1 s for it. Prints the rounds whose message never came and the
# SUBACK latency (SUBSCRIBE written to SUBACK read) percentiles. Waits for both nodes'
# routing connections first (gateway_fleet_route_connected).
#
# Usage: fleet_suback_race.sh GATEWAY_BIN OUT_DIR     TRIALS (500); needs python3.
set -u
gw=$1 out=$2
trials=${TRIALS:-500}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench_lib.sh
. "$here/bench_lib.sh"
fleet_workdir "$out"
trap 'stop_fleet; rm -rf "$dir"' EXIT
start_fleet "$gw" "$dir" || exit 1
for http in 18080 18081; do
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$http/metrics" | grep -q '^gateway_fleet_route_connected 1' && break
    sleep 0.1
  done
done
echo "== progress: $trials rounds" >&2
python3 - "$trials" <<'PY' | tee "$out/suback_race.txt"
import socket, struct, sys, time

def varint(n):
    out = b""
    while True:
        d, n = n % 128, n // 128
        out += bytes([d | 0x80 if n else d])
        if not n:
            return out

def s16(b):
    return struct.pack(">H", len(b)) + b

def packet(first, body):
    return bytes([first]) + varint(len(body)) + body

def read_packet(s, timeout):
    s.settimeout(timeout)
    head = s.recv(1)
    if not head:
        return None
    n, mult = 0, 1
    while True:
        b = s.recv(1)[0]
        n += (b & 127) * mult
        mult *= 128
        if b < 128:
            break
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    return head[0], data

def connect(port, cid):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = s16(b"MQTT") + bytes([4, 2]) + struct.pack(">H", 60) + s16(cid.encode())
    s.sendall(packet(0x10, body))
    assert read_packet(s, 10)[0] == 0x20, "no CONNACK"
    return s

trials = int(sys.argv[1])
publisher = connect(18830, "race-pub")
missed, lat = 0, []
for i in range(trials):
    sub = connect(18831, f"race-sub-{i}")
    topic = f"race/{i}".encode()
    t0 = time.perf_counter()
    sub.sendall(packet(0x82, struct.pack(">H", 1) + s16(topic) + b"\x00"))
    assert read_packet(sub, 10)[0] == 0x90, "no SUBACK"
    lat.append(time.perf_counter() - t0)
    publisher.sendall(packet(0x30, s16(topic) + b"x"))
    try:
        p = read_packet(sub, 1.0)
        missed += p is None or p[0] >> 4 != 3
    except socket.timeout:
        missed += 1
    sub.close()
    if (i + 1) % 100 == 0:
        print(f"== progress: {i + 1} rounds, {missed} missed", file=sys.stderr)
lat.sort()
ms = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1e3
print(f"rounds {trials}, missed {missed}; SUBACK ms p50 {ms(0.5):.3f} p99 {ms(0.99):.3f} max {lat[-1] * 1e3:.3f}")
PY
