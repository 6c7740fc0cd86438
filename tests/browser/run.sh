#!/usr/bin/env bash
# The browser tests: MQTT.js (pinned by package-lock.json) in headless Chromium, over
# WebSocket, against the gateway's ws_listen and against Mosquitto's websockets listener
# (tests/browser_ws.rs; the Mosquitto one is ignored). Installs what is missing first:
# Debian's chromium and mosquitto, and node_modules (npm ci). Extra arguments go to the
# test binary (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -f node_modules/mqtt/dist/mqtt.min.js ] || npm ci --no-audit --no-fund

cd ../..
cargo test --test browser_ws -- --include-ignored "$@"
