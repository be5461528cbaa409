#!/usr/bin/env bash
# Instructions per request (issue 11): the router, nginx and HAProxy, each run under
# `valgrind --tool=callgrind` with the same client load on the same backend, counted in CPU
# instructions, the figure that machine noise barely moves. Method: docs/performance.md.
#
# One nginx (1 worker, not measured) is the backend for everyone and answers every path with a
# fixed cluster JSON. nginx and HAProxy do the router's header work too (X-Forwarded-*, an
# X-Request-Id generated when absent and sent both ways, Via both ways), as in bench/load.sh.
# Scenarios:
#   nginx           client → nginx proxy_pass (1 worker, upstream keepalive) → backend
#   haproxy         client → haproxy (nbthread 1, http-reuse always) → backend
#   router-read     client → loom-router us-east (GET, local read) → backend
#   router-read-ryw the same with [consistency] read_your_writes on and no cluster tracked:
#                   what reading your own writes costs a read it does not redirect
#   router-write    client → loom-router us-east → loom-router us-west (forwarded DELETE);
#                   both routers are counted
# Each scenario runs twice, with W and then W + N requests on one keep-alive connection; the
# difference of the two totals, divided by N, cancels start-up, warm-up and shutdown. Every
# answer must be 2xx. The routers probe health once an hour here, so that background probes do
# not count as request cost.
#
# Usage: bench/instructions.sh [warm-up requests] [measured requests]   (default 500 5000)
# LOOM_ROUTER=path measures another router binary (an older build, say); LOOM_SCENARIOS picks
# scenarios (default: all five).
set -euo pipefail
cd "$(dirname "$0")/.."
warm=${1:-500}
more=${2:-5000}

source bench/lib.sh
install_missing valgrind:valgrind nginx:nginx-light haproxy:haproxy
router_bin=${LOOM_ROUTER:-./target/release/loom-router}
[ -n "${LOOM_ROUTER:-}" ] || cargo build --release --quiet
scenarios=${LOOM_SCENARIOS:-nginx haproxy router-read router-read-ryw router-write}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap "exit 130" INT TERM
ports
backend_conf > "$work/backend.conf"
# One process (no master): a forked worker's counts are not written out under callgrind, and the
# master does no per-request work.
nginx_conf "master_process off;" > "$work/nginx.conf"
haproxy_cfg > "$work/haproxy.cfg"
# The routers probe health once an hour here, so that background probes do not count.
hourly='[health]
interval = "1h"
timeout = "2s"
unhealthy_after = 1
healthy_after = 1'
router_config us-east "$east" "$east_admin" "$hourly" > "$work/east.toml"
router_config us-west "$west" "$west_admin" "$hourly" > "$work/west.toml"
router_config us-east "$east" "$east_admin" "$hourly
[consistency]
read_your_writes = \"5s\"" > "$work/east-ryw.toml"

nginx -c "$work/backend.conf" & pids+=($!)

# Send `count` requests on one keep-alive connection; fail on any non-2xx answer.
client() { # port method path count
    python3 - "$@" << 'PY'
import http.client, sys, time
port, method, path, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
for _ in range(600):  # up to a minute for a server starting under valgrind
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(f"nothing listens on {port}")
for i in range(count):
    conn.request(method, path)
    answer = conn.getresponse()
    answer.read()
    if not 200 <= answer.status < 300:
        sys.exit(f"request {i}: status {answer.status}")
conn.close()
PY
}

# Until the admin listener says ready (the routers only).
ready() { # admin port
    for _ in $(seq 600); do
        curl -fs "http://127.0.0.1:$1/readyz" > /dev/null && return 0
        sleep 0.1
    done
    echo "router on admin port $1 did not become ready" >&2
    return 1
}

callgrind() { # out-prefix command...
    local out=$1; shift
    valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out.%p" "$@" 2> "$out.log"
}

router() { # out-prefix east|west
    RUST_LOG=warn callgrind "$1" "$router_bin" run --config "$work/$2.toml"
}

# Total instructions in every callgrind file with this prefix (one per process).
total() { # out-prefix
    local sum=0 file
    for file in "$1".[0-9]*; do
        sum=$((sum + $(awk '/^totals:/ { t = $2 } /^summary:/ { s = $2 } END { print (t ? t : s) + 0 }' "$file")))
    done
    echo "$sum"
}

# One measured run: start the servers, send `count` requests, stop them gracefully, and print
# the total instructions they executed.
run() { # scenario count
    local scenario=$1 count=$2 out="$work/cg.$1.$2"
    local started=()
    case $scenario in
        nginx)
            callgrind "$out" nginx -c "$work/nginx.conf" & started+=($!)
            client "$nginx_proxy" GET /v2/clusters/00000011 "$count"
            kill -QUIT "$(cat "$work/nginx.pid")" ;;
        haproxy)
            callgrind "$out" haproxy -f "$work/haproxy.cfg" & started+=($!)
            client "$haproxy_port" GET /v2/clusters/00000011 "$count"
            pkill -USR1 -f "haproxy -f $work/haproxy.cfg" ;;
        router-read | router-read-ryw | router-write)
            # The owner first: us-east probes it once, at start, and must find it ready.
            if [ "$scenario" = router-write ]; then
                router "$out" west & started+=($!)
                ready "$west_admin"
            fi
            if [ "$scenario" = router-read-ryw ]; then
                router "$out" east-ryw & started+=($!)
            else
                router "$out" east & started+=($!)
            fi
            ready "$east_admin"
            if [ "$scenario" != router-write ]; then
                client "$east" GET /v2/clusters/00000011 "$count"
            else
                client "$east" DELETE /v2/clusters/00000012 "$count"
            fi
            pkill -TERM -f " run --config $work/" ;;
    esac
    for p in "${started[@]}"; do wait "$p" || true; done
    total "$out"
}

printf '%-14s %14s %14s %12s\n' scenario "Ir ($warm req)" "Ir (+$more req)" "Ir/request" >&2
declare -A per
for scenario in $scenarios; do
    a=$(run "$scenario" "$warm")
    b=$(run "$scenario" $((warm + more)))
    per[$scenario]=$(( (b - a) / more ))
    printf '%-14s %14d %14d %12d\n' "$scenario" "$a" "$b" "${per[$scenario]}" >&2
done
python3 - << PY
per = {$(for k in "${!per[@]}"; do printf '"%s": %s, ' "$k" "${per[$k]}"; done)}
print("instructions per request: " + ", ".join(f"{k} {v}" for k, v in sorted(per.items())))
read = per.get("router-read")
best = min((per[k] for k in ("nginx", "haproxy") if k in per), default=None)
if read and best:
    print(f"router read / best baseline = {read / best:.2f}")
if read and "router-write" in per:
    print(f"forwarded write / read = {per['router-write'] / read:.2f}")
if read and "router-read-ryw" in per:
    print(f"read with read_your_writes on / off = {per['router-read-ryw'] / read:.4f}")
PY
