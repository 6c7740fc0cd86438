#!/usr/bin/env bash
# Counts of the push path that the machine's noise does not move (docs/BENCHMARKS.md,
# "Push path: where the cost goes"): one fresh gateway (the shipped defaults with
# loopback listeners) for the whole run, 2,000 QoS 1 devices, then pushes:
#   batch        20,000/s for 5 s in batches of 1000, 8 in flight (100,000 pushes)
#   single       2,000/s for 5 s through /v1/push (10,000 pushes)
#   idle-batch, idle-single   the same devices and length with 1 push a second: what the
#                start, the connects and the idle seconds cost, to subtract
# TOOL stat: perf stat over the gateway's life: system calls (all, and by kind) and
#   malloc/calloc/realloc calls (uprobes on libc; needs root; `perf probe` adds them)
# TOOL callgrind: the same under valgrind --tool=callgrind (run at 2,000 pushes/s:
#   10,000 in the batch run), user-space instructions; callgrind_annotate OUT.cg
#
# Usage: push_counts.sh GATEWAY_BIN LOADGEN_BIN OUT TOOL WORKLOAD
#   MQTT_PORT (28830), HTTP_PORT (28080)
set -u
gw=$1 lg=$2 out=$3 tool=$4 workload=$5
mqtt=${MQTT_PORT:-28830} http=${HTTP_PORT:-28080}
d=$(mktemp -d)
printf '[mqtt]\nlisten = "127.0.0.1:%s"\n[http]\nlisten = "127.0.0.1:%s"\n[log]\nlevel = "warn"\n' \
  "$mqtt" "$http" > "$d/gw.toml"
rate=20000
[ "$tool" = callgrind ] && rate=2000
case $workload in
  batch) load=(--rate "$rate" --duration 5 --batch 1000 --concurrency 8) ;;
  single) load=(--rate 2000 --duration 5 --batch 1 --concurrency 32) ;;
  idle-batch) load=(--rate 1 --duration 5 --batch 1 --concurrency 8) ;;
  idle-single) load=(--rate 1 --duration 5 --batch 1 --concurrency 32) ;;
  *) echo "unknown workload $workload" >&2; exit 2 ;;
esac
libc=$(ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}')
case $tool in
  stat)
    for f in malloc calloc realloc; do
      perf probe -l 2> /dev/null | grep -q "probe_libc:$f " || perf probe -q -x "$libc" "$f"
    done
    events=raw_syscalls:sys_enter,probe_libc:malloc,probe_libc:calloc,probe_libc:realloc
    for s in epoll_wait write writev sendto recvfrom read futex; do
      events=$events,syscalls:sys_enter_$s
    done
    wrap=(perf stat -x, -o "$out.perf" -e "$events" --) ;;
  callgrind) wrap=(valgrind --tool=callgrind "--callgrind-out-file=$out.cg") ;;
  *) echo "unknown tool $tool" >&2; exit 2 ;;
esac
gw=$(cd "$(dirname "$gw")" && pwd)/$(basename "$gw")
(cd "$d" && exec "${wrap[@]}" "$gw" --config gw.toml > gw.log 2>&1) &
pid=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$http/readyz" > /dev/null && break
  sleep 0.2
done
"$lg" push --target "127.0.0.1:$mqtt" --http "http://127.0.0.1:$http" --conns 2000 \
  --connect-rate 2000 "${load[@]}" --client-id 'm-{i}' --qos 1 --drain 5 --json \
  > "$out.json" 2> "$out.err"
# The gateway is perf's child (under valgrind, the process itself); its counts are
# written when it ends.
child=$(pgrep -P "$pid")
kill -TERM "${child:-$pid}"
wait "$pid"
tail -1 "$out.json"
case $tool in
  stat) grep -v '^#' "$out.perf" | awk -F, 'NF > 2 {print $3, $1}' ;;
  callgrind) callgrind_annotate "$out.cg" 2> /dev/null | grep 'PROGRAM TOTALS' ;;
esac
