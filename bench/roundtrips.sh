#!/usr/bin/env bash
# Counts, per relayed message, the HTTP requests between gateway and router (through two
# counting proxies, bench/http_count.py) and the router's durable commits (fsync/fdatasync
# calls of the router process, via strace; with SQLite WAL + synchronous=FULL every commit
# syncs the WAL once). One client, sequential messages, so no group commit merges them.
#
#   bench/roundtrips.sh [N]      (default 50 messages per ingress; release binaries)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
n="${1:-50}"
bin=target/release
work="$(mktemp -d /tmp/koukan-rt.XXXXXX)"
SINK=13025 ROUTER=18000 GATEWAY=18001 MX=11025 MSA=11587 PR=18100 PG=18101
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

sed -e "s/\b3025\b/$SINK/g; s/level: INFO/level: WARN/" \
    -e "s|addr: \[\"127.0.0.1\", 8000\]|addr: [\"127.0.0.1\", $ROUTER]|" \
    -e "s|session_uri: http://127.0.0.1:8000|session_uri: http://127.0.0.1:$PR|" \
    -e "s|http://127.0.0.1:8001/|http://127.0.0.1:$PG/|" \
    -e "s|url: sqlite:///koukan.sqlite3|url: sqlite:///$work/koukan.sqlite3|" \
    config/router.yaml > "$work/router.yaml"
sed -e "s/\b3025\b/$SINK/g; s/\b1025\b/$MX/g; s/\b1587\b/$MSA/g; s/level: INFO/level: WARN/" \
    -e "s|addr: \[\"127.0.0.1\", 8001\]|addr: [\"127.0.0.1\", $GATEWAY]|" \
    -e "s|session_uri: http://127.0.0.1:8001|session_uri: http://127.0.0.1:$PG|" \
    -e "s|http://127.0.0.1:8000/|http://127.0.0.1:$PR/|" \
    config/gateway.yaml > "$work/gateway.yaml"

"$bin/koukan" sink --listen "127.0.0.1:$SINK" > "$work/sink.log" 2>&1 &
pids+=($!)
(cd "$work" && exec "$OLDPWD/$bin/koukan-router" router.yaml) > "$work/router.log" 2>&1 &
router_pid=$!
pids+=($router_pid)
(cd "$work" && exec "$OLDPWD/$bin/koukan-gateway" gateway.yaml) > "$work/gateway.log" 2>&1 &
pids+=($!)
wait_port "$SINK"; wait_port "$ROUTER"; wait_port "$GATEWAY"; wait_port "$MX"

count_run() {
    local label="$1"
    shift
    python3 bench/http_count.py "$PR" "$ROUTER" "gateway->router" > "$work/pr.txt" &
    local p1=$!
    python3 bench/http_count.py "$PG" "$GATEWAY" "router->gateway" > "$work/pg.txt" &
    local p2=$!
    wait_port "$PR"; wait_port "$PG"
    strace -f -qq -e trace=fsync,fdatasync -p "$router_pid" -o "$work/strace.txt" &
    local st=$!
    sleep 0.5
    "$bin/koukan" load --count "$n" --concurrency 1 --progress 0 "$@" > "$work/load.json"
    sleep 1
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    kill -TERM "$p1" "$p2"; wait "$p1" "$p2" 2>/dev/null || true
    echo "== $label: $n messages: $(cat "$work/load.json")"
    cat "$work/pr.txt" "$work/pg.txt"
    echo "router fsync/fdatasync calls: $(grep -c 'sync(' "$work/strace.txt" || true)" \
        "($(awk -v n="$n" -v c="$(grep -c 'sync(' "$work/strace.txt" || true)" 'BEGIN{printf "%.2f", c/n}') per message)"
}

count_run "SMTP MX, 2 KB, 1 rcpt" --mode smtp --target "127.0.0.1:$MX"
count_run "REST submission, 2 KB, 1 rcpt, --wait" --mode rest --target "127.0.0.1:$PR" --wait
