#!/usr/bin/env bash
# Runs the local stack in the foreground: an SMTP sink that prints what it receives
# (127.0.0.1:3025), the router (REST 8000, SQLite koukan.sqlite3 in the current directory)
# and the gateway (REST 8001, SMTP MX 1025, submission 1587). Ctrl-C stops everything.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
cargo build --bins ${CARGO_PROFILE:+--profile "$CARGO_PROFILE"}
bin="target/${CARGO_PROFILE:-debug}"

pids=()
cleanup() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin/koukan" sink --listen 127.0.0.1:3025 --print &
pids+=($!)
"$bin/koukan-router" config/router.yaml &
pids+=($!)
"$bin/koukan-gateway" config/gateway.yaml &
pids+=($!)

cat <<MSG
Koukan is running:
  SMTP MX          127.0.0.1:1025   (example.com and localhost recipients)
  SMTP submission  127.0.0.1:1587
  REST             http://127.0.0.1:8000/senders/submission/transactions
  deliveries go to the sink on 127.0.0.1:3025, which prints them here.
MSG
wait -n
