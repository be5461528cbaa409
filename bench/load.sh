#!/usr/bin/env bash
# Load benchmark (issue 5): loom-router against nginx and HAProxy on the same machine, in one
# run, as ratios of medians over interleaved rounds. Method: reference/proxy-anchors.md §3.
#
# One nginx (1 worker) is the backend for everyone: it answers every path and method with a
# fixed cluster JSON, so no proxy is measured through a slow backend. Scenarios, per round:
#   direct          oha → backend
#   nginx           oha → nginx proxy_pass (1 worker, upstream keepalive) → backend
#   haproxy         oha → haproxy (nbthread 1, http-reuse always) → backend
#   router-read     oha → loom-router us-east (GET, local read) → backend
#   router-write    oha → loom-router us-east → loom-router us-west (forwarded write) → backend
#   router-swaps    router-read while us-east's table is swapped every 100 ms (reloads)
# Proxies and backend are pinned to CPU 0, oha to CPU 1; the router runs one tokio worker,
# like the single nginx worker and HAProxy thread. Each scenario runs closed loop (capacity,
# `-c 32`) and at a fixed rate with --latency-correction (latency). Every run's status codes
# are checked (oha counts 5xx as success); any non-2xx aborts. CPU µs per request comes from
# /proc/<pid>/stat around each run.
#
# Usage: bench/load.sh [rounds] [seconds]   (default 3 rounds of 10 s)
# Writes bench/results/<date>.json and bench/results/<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
rate=${LOAD_RATE:-5000}

need=()
command -v nginx > /dev/null || need+=(nginx-light)
command -v haproxy > /dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v oha > /dev/null || cargo install oha --locked
cargo build --release --quiet

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap "exit 130" INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(port); nginx_proxy=$(port); haproxy_port=$(port)
east=$(port); east_admin=$(port); west=$(port); west_admin=$(port)

# --- backend and baselines ---------------------------------------------------------------
cat > "$work/backend.conf" << EOF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend;
    location / { default_type application/json;
      return 200 '{"id":"00000011","name":"bench","status":"active"}'; } } }
EOF
cat > "$work/nginx.conf" << EOF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$nginx_proxy;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat > "$work/haproxy.cfg" << EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$haproxy_port
  default_backend be
backend be
  server s1 127.0.0.1:$backend
EOF
# taskset execs the program, so $! is the server's own pid (for its CPU time).
taskset -c 0 nginx -c "$work/backend.conf" & pids+=($!); backend_pid=$!
taskset -c 0 nginx -c "$work/nginx.conf" & pids+=($!); nginx_pid=$!
taskset -c 0 haproxy -f "$work/haproxy.cfg" & pids+=($!); haproxy_pid=$!

# --- two routers: us-east (measured) and us-west (owner of the forwarded writes) -----------
router_config() { # name id_start http admin
    cat << EOF
datacenter = "$1"
global_home = "us-east"
[listen]
http = "127.0.0.1:$3"
admin = "127.0.0.1:$4"
[loom]
upstream = "http://127.0.0.1:$backend"
[ids]
increment = 10
[log]
access = "off"
[[datacenters]]
name = "us-east"
id_start = 1
router = "http://127.0.0.1:$east"
replicas = ["us-west"]
[[datacenters]]
name = "us-west"
id_start = 2
router = "http://127.0.0.1:$west"
replicas = ["us-east"]
EOF
}
router_config us-east 1 "$east" "$east_admin" > "$work/east.toml"
router_config us-west 2 "$west" "$west_admin" > "$work/west.toml"
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 ./target/release/loom-router run --config "$work/east.toml" 2> "$work/east.log" & pids+=($!); east_pid=$!
TOKIO_WORKER_THREADS=1 RUST_LOG=warn taskset -c 0 ./target/release/loom-router run --config "$work/west.toml" 2> "$work/west.log" & pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$east_admin/readyz" > /dev/null \
        && curl -fs "http://127.0.0.1:$west_admin/readyz" > /dev/null && break
    sleep 0.1
done

swapper() { # reload us-east every 100 ms with a growing [[shards]] epoch: a new table each time
    local epoch=2
    while true; do
        { router_config us-east 1 "$east" "$east_admin"
          printf '[[shards]]\nresidue = 5\nowner = "us-west"\nepoch = %d\n' "$epoch"; } > "$work/east.next"
        mv "$work/east.next" "$work/east.toml"
        curl -fs -X POST "http://127.0.0.1:$east_admin/admin/reload" > /dev/null || true
        epoch=$((epoch + 1))
        sleep 0.1
    done
}

# utime + stime of a process and its children (nginx's work happens in its worker).
cpu_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$total"
}
hz=$(getconf CLK_TCK)
hdr=(-H 'Coopr-UserID: admin' -H 'Coopr-TenantID: bench')

run() { # scenario mode(capacity|latency) -> one JSON line
    local name=$1 mode=$2 url method=GET pid=$east_pid swap=""
    case $name in
        direct) url="http://127.0.0.1:$backend/v2/clusters/00000011"; pid=$backend_pid ;;
        nginx) url="http://127.0.0.1:$nginx_proxy/v2/clusters/00000011"; pid=$nginx_pid ;;
        haproxy) url="http://127.0.0.1:$haproxy_port/v2/clusters/00000011"; pid=$haproxy_pid ;;
        router-read) url="http://127.0.0.1:$east/v2/clusters/00000011" ;;
        router-write) url="http://127.0.0.1:$east/v2/clusters/00000012/abort"; method=POST ;;
        router-swaps) url="http://127.0.0.1:$east/v2/clusters/00000011"; swap=1 ;;
    esac
    local args=(-z "${secs}s" -c 32 --no-tui --output-format json -m "$method" "${hdr[@]}")
    [ "$mode" = latency ] && args+=(-q "$rate" --latency-correction)
    local swap_pid=""
    if [ -n "$swap" ]; then swapper & swap_pid=$!; fi
    # Warm up pools and pages, then measure.
    taskset -c 1 oha -z 2s -c 32 --no-tui --output-format quiet -m "$method" "${hdr[@]}" "$url" > /dev/null
    local before; before=$(cpu_ticks "$pid")
    taskset -c 1 oha "${args[@]}" "$url" > "$work/run.json"
    local after; after=$(cpu_ticks "$pid")
    [ -n "$swap_pid" ] && { kill "$swap_pid"; wait "$swap_pid" 2> /dev/null || true; }
    python3 - "$name" "$mode" "$before" "$after" "$hz" "$work/run.json" << 'PY'
import json, sys
name, mode, before, after, hz, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
r = json.load(open(path))
codes = r["statusCodeDistribution"]
if not codes or any(not c.startswith("2") for c in codes):
    sys.exit(f"{name} {mode}: non-2xx responses {codes}")
total = sum(codes.values())
cpu_us = (after - before) / hz * 1e6 / total if total else 0.0
lat = r["latencyPercentiles"]
print(json.dumps({"scenario": name, "mode": mode, "rps": r["summary"]["requestsPerSec"],
                  "p50_us": lat["p50"] * 1e6, "p99_us": lat["p99"] * 1e6,
                  "cpu_us_per_req": cpu_us, "requests": total}))
PY
}

mkdir -p bench/results
stamp=$(date +%Y-%m-%d)
raw="$work/raw.jsonl"
for round in $(seq "$rounds"); do
    for scenario in direct nginx haproxy router-read router-write router-swaps; do
        for mode in capacity latency; do
            line=$(run "$scenario" "$mode")
            echo "round $round: $line" >&2
            echo "$line" >> "$raw"
        done
    done
done

python3 - "$raw" "bench/results/$stamp.json" "bench/results/$stamp.md" "$rounds" "$secs" "$rate" << 'PY'
import json, statistics, subprocess, sys
raw, out_json, out_md, rounds, secs, rate = sys.argv[1:7]
runs = [json.loads(l) for l in open(raw)]
def med(s, m, k):
    return statistics.median(r[k] for r in runs if r["scenario"] == s and r["mode"] == m)
scen = ["direct", "nginx", "haproxy", "router-read", "router-write", "router-swaps"]
table = {s: {"rps": med(s, "capacity", "rps"), "cpu_us": med(s, "capacity", "cpu_us_per_req"),
             "p50_us": med(s, "latency", "p50_us"), "p99_us": med(s, "latency", "p99_us")} for s in scen}
d99 = table["direct"]["p99_us"]
best_rps = max(table["nginx"]["rps"], table["haproxy"]["rps"])
best_cpu = min(table["nginx"]["cpu_us"], table["haproxy"]["cpu_us"])
added = {s: table[s]["p99_us"] - d99 for s in scen}
div = lambda a, b: a / b if b else None
ratios = {
    "throughput router-read / max(nginx, haproxy)": div(table["router-read"]["rps"], best_rps),
    "cpu-us/req router-read / min(nginx, haproxy)": div(table["router-read"]["cpu_us"], best_cpu),
    "added p99 router-read (us)": added["router-read"],
    "added p99 min(nginx, haproxy) (us)": min(added["nginx"], added["haproxy"]),
    "added p99 router-write / router-read": div(added["router-write"], added["router-read"]),
    "p99 shift during swaps": (div(table["router-swaps"]["p99_us"], table["router-read"]["p99_us"]) or 1) - 1,
}
machine = subprocess.run(["uname", "-sr"], capture_output=True, text=True).stdout.strip()
json.dump({"rounds": int(rounds), "seconds": int(secs), "rate": int(rate), "machine": machine,
           "medians": table, "ratios": ratios, "runs": runs}, open(out_json, "w"), indent=2)
lines = [f"Medians of {rounds} interleaved rounds of {secs} s; capacity: oha -c 32 closed loop; "
         f"latency: oha -q {rate} --latency-correction. Proxies and backend on CPU 0, oha on CPU 1. {machine}.", "",
         "| scenario | req/s (capacity) | CPU µs/req | p50 µs @ fixed rate | p99 µs @ fixed rate |",
         "|---|---|---|---|---|"]
for s in scen:
    t = table[s]
    lines.append(f"| {s} | {t['rps']:.0f} | {t['cpu_us']:.1f} | {t['p50_us']:.0f} | {t['p99_us']:.0f} |")
lines += ["", "| ratio | value |", "|---|---|"]
for k, v in ratios.items():
    lines.append(f"| {k} | {'n/a' if v is None else f'{v:.2f}'} |")
open(out_md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "wrote bench/results/$stamp.json and bench/results/$stamp.md" >&2
