#!/usr/bin/env bash
# Koukan relay benchmark: the whole stack (gateway SMTP/REST ingress -> router -> gateway
# outbound -> `koukan sink`) on SQLite and PostgreSQL, side by side with a stock Postfix
# relay over the same loopback path. See BENCHMARKS.md.
#
#   bench/run.sh [--quick] [--backend sqlite|postgres|both] [--no-postfix] [--no-build]
#                [--duration S] [--warmup S] [--big] [--idle] [--only-extra] [--out DIR]
#                [--cells "smtp 50 2k 1,rest 10 2k 1"]   (only these matrix cells)
# KOUKAN_BENCH_PRELOAD=/path/lib.so runs the router and the gateway with it preloaded
# (an allocator A/B without a rebuild); KOUKAN_BENCH_BIN=DIR takes the three binaries from
# DIR instead of target/release (a before/after A/B of two builds, alternated).
#
# Ports (chosen not to collide with config/run-local.sh): sink 13025, router REST 18000,
# gateway REST 18001, gateway MX 11025, Postfix 12025. Results: DIR/results.jsonl (one JSON
# object per cell) and DIR/results.md (the table), DIR defaults to bench/out/<timestamp>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$here/.."
cd "$repo"

quick=0
backends="sqlite postgres"
postfix=1
build=1
duration=""
warmup=""
big=0
idle=0
matrix=1
out=""
cells=""
pg_url_base="${KOUKAN_BENCH_PG:-postgresql://postgres@127.0.0.1:5432}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --backend) shift; [[ "$1" == both ]] && backends="sqlite postgres" || backends="$1" ;;
        --no-postfix) postfix=0 ;;
        --no-build) build=0 ;;
        --duration) shift; duration="$1" ;;
        --warmup) shift; warmup="$1" ;;
        --big) big=1 ;;
        --idle) idle=1 ;;
        --only-extra) matrix=0 ;;
        --out) shift; out="$1" ;;
        --cells) shift; cells="$1" ;;
        -h|--help) sed -n 2,15p "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ $quick == 1 ]]; then
    duration="${duration:-5}"
    warmup="${warmup:-1}"
    [[ "$backends" == "sqlite postgres" ]] && backends="sqlite"
else
    duration="${duration:-8}"
    warmup="${warmup:-2}"
    big=1
    idle=1
fi

bin="${KOUKAN_BENCH_BIN:-$repo/target/release}"
if [[ $build == 1 ]]; then
    cargo build --release --bins
fi
out="${out:-$here/out/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
work="$(mktemp -d /tmp/koukan-bench.XXXXXX)"
results="$out/results.jsonl"
: > "$results"
echo "results in $out, scratch in $work" >&2

# The shipped configs allow 100 deliveries in flight (router output, gateway executor):
# 200 clients would get 451s by design, so the bench raises the limit.
MAX_INFLIGHT=1000
SINK=13025 ROUTER=18000 GATEWAY=18001 MX=11025 MSA=11587 POSTFIX=12025
clk=$(getconf CLK_TCK)
pids=()
postfix_dir=""

cleanup() {
    stop_stack
    if [[ -n "$postfix_dir" ]]; then
        postfix -c "$postfix_dir" stop >/dev/null 2>&1 || true
    fi
    [[ -n "${sink_pid:-}" ]] && kill -TERM "$sink_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 did not open" >&2
    return 1
}

# utime+stime of a process, in ticks (with reaped children's when $2 = all).
ticks() {
    local f
    f=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    f="${f##*) }"
    set -- $f
    # fields after "comm) ": $12 = utime (field 14), $13 stime, $14 cutime, $15 cstime
    echo $(( ${12} + ${13} + ${14} + ${15} ))
}

# A Postfix instance's CPU: the master (with reaped children) plus its live children.
postfix_ticks() {
    local master total c
    master=$(head -1 "$postfix_dir/queue/pid/master.pid" 2>/dev/null | tr -d ' ') || { echo 0; return; }
    total=$(ticks "$master")
    for c in $(pgrep -P "$master"); do
        total=$(( total + $(ticks "$c") ))
    done
    echo "$total"
}

hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
reset_hwm() { echo 5 > "/proc/$1/clear_refs" 2>/dev/null || true; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }

start_sink() {
    "$bin/koukan" sink --listen "127.0.0.1:$SINK" > "$work/sink.log" 2>&1 &
    sink_pid=$!
    wait_port "$SINK"
}

configs() {
    local url="$1"
    sed -e "s/\b8000\b/$ROUTER/g; s/\b8001\b/$GATEWAY/g; s/\b3025\b/$SINK/g" \
        -e "s|url: sqlite:///koukan.sqlite3|url: $url|" \
        -e "s/level: INFO/level: WARN/" \
        -e "s/max_inflight: 100\$/max_inflight: $MAX_INFLIGHT/" \
        config/router.yaml > "$work/router.yaml"
    sed -e "s/\b8000\b/$ROUTER/g; s/\b8001\b/$GATEWAY/g; s/\b1025\b/$MX/g; s/\b1587\b/$MSA/g" \
        -e "s/\b3025\b/$SINK/g" \
        -e "s/level: INFO/level: WARN/" \
        -e "s/^\(    tag: smtp-m[xs]a*\)$/\1\n    max_message_size: 2147483648/" \
        -e "s/max_inflight: 100\$/max_inflight: $MAX_INFLIGHT/" \
        config/gateway.yaml > "$work/gateway.yaml"
}

router_pid="" gateway_pid=""
start_stack() {
    local backend="$1" url
    case "$backend" in
        sqlite)
            rm -f "$work"/koukan.sqlite3*
            url="sqlite:///$work/koukan.sqlite3" ;;
        postgres)
            psql "$pg_url_base/postgres" -q -c "DROP DATABASE IF EXISTS koukan_bench" \
                -c "CREATE DATABASE koukan_bench" >/dev/null
            url="$pg_url_base/koukan_bench" ;;
    esac
    configs "$url"
    (cd "$work" && exec env ${KOUKAN_BENCH_PRELOAD:+LD_PRELOAD="$KOUKAN_BENCH_PRELOAD"} "$bin/koukan-router" router.yaml) > "$work/router-$backend.log" 2>&1 &
    router_pid=$!
    wait_port "$ROUTER"
    (cd "$work" && exec env ${KOUKAN_BENCH_PRELOAD:+LD_PRELOAD="$KOUKAN_BENCH_PRELOAD"} "$bin/koukan-gateway" gateway.yaml) > "$work/gateway-$backend.log" 2>&1 &
    gateway_pid=$!
    wait_port "$GATEWAY"
    wait_port "$MX"
}

stop_stack() {
    for p in $router_pid $gateway_pid; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in $router_pid $gateway_pid; do
        wait "$p" 2>/dev/null || true
    done
    router_pid="" gateway_pid=""
}

# Writes a local-only Postfix relay (own config, queue and data directories) listening on
# $POSTFIX and relaying everything for example.com to the sink. Stock settings except what
# a 200-client test needs (process and per-client connection limits).
start_postfix() {
    if ! command -v postfix >/dev/null; then
        echo "installing postfix" >&2
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
    fi
    postfix_dir="$work/postfix"
    mkdir -p "$postfix_dir/queue" "$postfix_dir/data"
    chmod 755 "$work" "$postfix_dir"
    chown postfix "$postfix_dir/data"
    cat > "$postfix_dir/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $postfix_dir/queue
data_directory = $postfix_dir/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = example.com localhost
relayhost = [127.0.0.1]:$SINK
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
default_process_limit = 400
smtpd_client_connection_count_limit = 0
maillog_file_prefixes = $postfix_dir
maillog_file = $postfix_dir/maillog
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
EOF
    cat > "$postfix_dir/master.cf" <<EOF
127.0.0.1:$POSTFIX inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    postfix -c "$postfix_dir" set-permissions >/dev/null 2>&1 || true
    # postfix reports a fatal start-up error only on a terminal (or syslog).
    script -qc "postfix -c $postfix_dir start" /dev/null
    wait_port "$POSTFIX"
}

# run_cell <system> <backend> <ingress> <concurrency> <size> <rcpts> [extra load args...]
# ingress: smtp (gateway MX or Postfix), rest (POST + wait for the data response),
# rest-accept (POST only: the 201).
run_cell() {
    local system="$1" backend="$2" ingress="$3" conc="$4" size="$5" rcpts="$6"
    shift 6
    local args=(--concurrency "$conc" --size "$size" --rcpts "$rcpts"
        --duration "$duration" --warmup "$warmup" --progress 0)
    case "$system:$ingress" in
        koukan:smtp) args+=(--mode smtp --target "127.0.0.1:$MX") ;;
        postfix:smtp) args+=(--mode smtp --target "127.0.0.1:$POSTFIX") ;;
        koukan:rest|koukan:rest-accept)
            args+=(--mode rest --target "127.0.0.1:$ROUTER")
            [[ $ingress == rest ]] && args+=(--wait)
            # The non-incremental submission endpoint takes exactly one recipient; a
            # multi-recipient REST submission goes through the exploder (tag smtp-msa).
            [[ $rcpts -gt 1 ]] && args+=(--tag smtp-msa) ;;
    esac
    args+=("$@")
    local r0 g0 p0 s0 la json r1 g1 p1 s1
    if [[ $system == koukan ]]; then
        reset_hwm "$router_pid"; reset_hwm "$gateway_pid"
        r0=$(ticks "$router_pid"); g0=$(ticks "$gateway_pid")
    else
        p0=$(postfix_ticks)
    fi
    s0=$(ticks "$sink_pid")
    la=$(loadavg)
    json=$("$bin/koukan" load "${args[@]}") || json='{"ok":0,"first_error":"load tool failed"}'
    s1=$(ticks "$sink_pid")
    local extra
    if [[ $system == koukan ]]; then
        r1=$(ticks "$router_pid"); g1=$(ticks "$gateway_pid")
        extra=$(jq -n --argjson r "$((r1 - r0))" --argjson g "$((g1 - g0))" \
            --argjson rh "$(hwm_kb "$router_pid")" --argjson gh "$(hwm_kb "$gateway_pid")" \
            --argjson clk "$clk" \
            '{router_cpu_s: ($r/$clk), gateway_cpu_s: ($g/$clk),
              router_hwm_mb: ($rh/1024), gateway_hwm_mb: ($gh/1024)}')
    else
        p1=$(postfix_ticks)
        extra=$(jq -n --argjson p "$((p1 - p0))" --argjson clk "$clk" \
            '{postfix_cpu_s: ($p/$clk)}')
    fi
    # CPU during the measured period and the in-flight tail is divided by ok + what
    # completed in warm-up is excluded: a slight overestimate per message.
    echo "$json" | jq -c --arg system "$system" --arg backend "$backend" \
        --arg ingress "$ingress" --argjson load "$la" --argjson extra "$extra" \
        --argjson sink "$((s1 - s0))" --argjson clk "$clk" \
        --argjson total "$(awk "BEGIN{print $duration + $warmup}")" --argjson dur "$duration" \
        '. + {system: $system, backend: $backend, ingress: $ingress, load_avg: $load}
           + $extra + {sink_cpu_s: ($sink/$clk)}
           + (if .ok > 0 then
                {cpu_ms_per_msg_router: ((($extra.router_cpu_s // 0) * 1000 * $dur / $total) / .ok),
                 cpu_ms_per_msg_gateway: ((($extra.gateway_cpu_s // 0) * 1000 * $dur / $total) / .ok),
                 cpu_ms_per_msg_postfix: ((($extra.postfix_cpu_s // 0) * 1000 * $dur / $total) / .ok)}
              else {} end)' | tee -a "$results" >&2
}

matrix_cells() {
    # echo "ingress conc size rcpts" lines
    if [[ -n $cells ]]; then
        tr ',' '\n' <<< "$cells"
    elif [[ $quick == 1 ]]; then
        echo "smtp 1 2k 1"; echo "smtp 10 2k 1"; echo "smtp 50 2k 1"; echo "smtp 50 100k 1"
        echo "smtp 10 2k 3"
        echo "rest 10 2k 1"; echo "rest 50 2k 1"; echo "rest-accept 50 2k 1"
    else
        local i c s r
        for i in smtp rest; do
            for s in 2k 100k; do
                for r in 1 3; do
                    for c in 1 10 50 200; do
                        echo "$i $c $s $r"
                    done
                done
            done
        done
        echo "rest-accept 50 2k 1"
        echo "rest-accept 200 2k 1"
    fi
}

start_sink

if [[ $matrix == 1 ]]; then
    for backend in $backends; do
        start_stack "$backend"
        while read -r ingress conc size rcpts; do
            run_cell koukan "$backend" "$ingress" "$conc" "$size" "$rcpts"
        done < <(matrix_cells)
        stop_stack
    done
    if [[ $postfix == 1 ]]; then
        start_postfix
        while read -r ingress conc size rcpts; do
            [[ $ingress == smtp ]] || continue
            run_cell postfix - smtp "$conc" "$size" "$rcpts"
        done < <(matrix_cells)
        postfix -c "$postfix_dir" stop >/dev/null 2>&1 || true
        postfix_dir=""
    fi
fi

# One 1 GiB message through the MX listener, sampling RSS.
if [[ $big == 1 ]]; then
    start_stack sqlite
    reset_hwm "$router_pid"; reset_hwm "$gateway_pid"
    la=$(loadavg)
    json=$("$bin/koukan" load --mode smtp --target "127.0.0.1:$MX" --size 1g --count 1 \
        --concurrency 1 --no-size-param --progress 0) || json='{"ok":0}'
    echo "$json" | jq -c --argjson load "$la" \
        --argjson rh "$(hwm_kb "$router_pid")" --argjson gh "$(hwm_kb "$gateway_pid")" \
        '. + {system: "koukan", backend: "sqlite", ingress: "smtp-1GiB", load_avg: $load,
              router_hwm_mb: ($rh/1024), gateway_hwm_mb: ($gh/1024)}' | tee -a "$results" >&2
    stop_stack
fi

# 10,000 idle SMTP connections held open on the gateway.
if [[ $idle == 1 ]]; then
    start_stack sqlite
    ulimit -n 65536 2>/dev/null || true
    before=$(rss_kb "$gateway_pid")
    python3 - "$MX" 10000 > "$work/idle.txt" <<'EOF' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    socks.append(s)
ok = 0
for s in socks:
    s.settimeout(30)
    if s.recv(512).startswith(b"220"):
        ok += 1
print(ok, flush=True)
time.sleep(600)
EOF
    idle_pid=$!
    for _ in $(seq 1 120); do
        [[ -s "$work/idle.txt" ]] && break
        sleep 1
    done
    sleep 2
    greeted=$(cat "$work/idle.txt" 2>/dev/null || echo 0)
    after=$(rss_kb "$gateway_pid")
    kill "$idle_pid" 2>/dev/null || true
    wait "$idle_pid" 2>/dev/null || true
    jq -nc --argjson b "$before" --argjson a "$after" --argjson g "${greeted:-0}" \
        --argjson load "$(loadavg)" \
        '{system: "koukan", ingress: "idle-10000", greeted: $g, load_avg: $load,
          gateway_rss_before_mb: ($b/1024), gateway_rss_after_mb: ($a/1024)}' \
        | tee -a "$results" >&2
    stop_stack
fi

# The table.
jq -rs '
  def f: if . == null then "-" elif type == "number" then (. * 10 | round / 10 | tostring) else tostring end;
  "| system | db | ingress | conc | size | rcpts | msg/s | p50 ms | p90 ms | p99 ms | max ms | ok/temp/perm/err | cpu ms/msg router | gateway | postfix | RSS MB router | gateway | load |",
  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  (.[] | select(.msgs_per_s != null) |
   "| \(.system) | \(.backend) | \(.ingress) | \(.concurrency) | \(.size) | \(.rcpts) | \(.msgs_per_s | f) | \(.p50_ms|f) | \(.p90_ms|f) | \(.p99_ms|f) | \(.max_ms|f) | \(.ok)/\(.temp)/\(.perm)/\(.errors) | \(.cpu_ms_per_msg_router|f) | \(.cpu_ms_per_msg_gateway|f) | \(.cpu_ms_per_msg_postfix|f) | \(.router_hwm_mb|f) | \(.gateway_hwm_mb|f) | \(.load_avg) |"),
  "",
  (.[] | select(.msgs_per_s == null) | tostring)
' "$results" | tee "$out/results.md"
