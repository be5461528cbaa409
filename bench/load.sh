#!/usr/bin/env bash
# Load benchmark (issue 5): loom-router against nginx and HAProxy on the same machine, in one
# run, as ratios of medians over interleaved rounds. Method: docs/performance.md.
#
# One nginx (1 worker) is the backend for everyone: it answers every path and method with a
# fixed cluster JSON, so no proxy is measured through a slow backend. Scenarios, per round:
#   direct          oha → backend
#   nginx           oha → nginx proxy_pass (1 worker, upstream keepalive) → backend
#   haproxy         oha → haproxy (nbthread 1, http-reuse always) → backend
#   router-read     oha → loom-router us-east (GET, local read) → backend
#   router-write    oha → loom-router us-east → loom-router us-west (forwarded write) → backend
#   router-swaps    router-read while us-east's table is swapped every 100 ms (reloads)
# nginx and HAProxy are configured to do the router's header work too (X-Forwarded-*, a
# generated X-Request-Id sent both ways, Via both ways), so each proxy does the same job.
# Before the rounds, bench/idle_conns.py holds $LOAD_IDLE_CONNS (10 000) idle keep-alive client
# connections open against each proxy and reads its RSS growth per connection.
# Proxies and backend are pinned to CPU 0, oha to CPU 1; the router runs one request worker,
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

source bench/lib.sh
install_missing nginx:nginx-light haproxy:haproxy
command -v oha > /dev/null || cargo install oha --locked
cargo build --release --quiet

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}" $(cat "$work/swapper.pid" 2> /dev/null); do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap "exit 130" INT TERM
ports
backend_conf > "$work/backend.conf"
nginx_conf "worker_processes 1;" > "$work/nginx.conf"
haproxy_cfg > "$work/haproxy.cfg"
# taskset execs the program, so $! is the server's own pid (for its CPU time).
taskset -c 0 nginx -c "$work/backend.conf" & pids+=($!); backend_pid=$!
taskset -c 0 nginx -c "$work/nginx.conf" & pids+=($!); nginx_pid=$!
taskset -c 0 haproxy -f "$work/haproxy.cfg" & pids+=($!); haproxy_pid=$!
sleep 0.5
for p in "$backend_pid" "$nginx_pid" "$haproxy_pid"; do
    kill -0 "$p" 2> /dev/null || { echo "a baseline server did not start (see above)" >&2; exit 1; }
done

# --- two routers: us-east (measured) and us-west (owner of the forwarded writes) -----------
router_config us-east "$east" "$east_admin" > "$work/east.toml"
router_config us-west "$west" "$west_admin" > "$work/west.toml"
RUST_LOG=warn taskset -c 0 ./target/release/loom-router run --config "$work/east.toml" 2> "$work/east.log" & pids+=($!); east_pid=$!
RUST_LOG=warn taskset -c 0 ./target/release/loom-router run --config "$work/west.toml" 2> "$work/west.log" & pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$east_admin/readyz" > /dev/null \
        && curl -fs "http://127.0.0.1:$west_admin/readyz" > /dev/null && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$east_admin/readyz" > /dev/null && curl -fs "http://127.0.0.1:$west_admin/readyz" > /dev/null \
    || { echo "the routers did not become ready:" >&2; cat "$work/east.log" "$work/west.log" >&2; exit 1; }

# --- memory: RSS per idle keep-alive client connection, before any load ---------------------
conns=${LOAD_IDLE_CONNS:-10000}
memory() { # name count port pid... -> one JSON line in memory.jsonl
    local name=$1 count=$2 port=$3; shift 3
    local line; line=$(taskset -c 1 python3 bench/idle_conns.py "$port" "$count" "$@")
    echo "memory $name: $line" >&2
    python3 -c 'import json, sys; d = json.loads(sys.argv[2]); d["scenario"] = sys.argv[1]; print(json.dumps(d))' \
        "$name" "$line" >> "$work/memory.jsonl"
}
memory nginx "$conns" "$nginx_proxy" "$nginx_pid" $(pgrep -P "$nginx_pid")
# HAProxy reserves two descriptors per connection against its maxconn: 9 000 is what fits.
memory haproxy $((conns < 9000 ? conns : 9000)) "$haproxy_port" "$haproxy_pid"
memory router "$conns" "$east" "$east_pid"

# Table swaps applied by us-east so far (its reload counter), to prove the swap scenario swapped.
reloads() {
    curl -fs "http://127.0.0.1:$east_admin/metrics" \
        | awk '/^loom_router_config_reloads_total\{result="ok"\}/ { print $2; found=1 } END { if (!found) print 0 }'
}

# Swap us-east's table every 100 ms: rewrite its config with a growing [[shards]] epoch and ask
# for a reload. One long-lived process on oha's CPU: a curl started every 100 ms costs more CPU
# than the swap and showed up in oha's own p99 (measured: +230 % for a GET /healthz loop).
router_config us-east "$east" "$east_admin" > "$work/east.base"
swapper() {
    exec taskset -c 1 python3 - "$work/east.base" "$work/east.toml" "$east_admin" "$t0" << 'PY'
import http.client, os, sys, time
base, path, port, t0 = open(sys.argv[1]).read(), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
admin = http.client.HTTPConnection("127.0.0.1", port)
while True:
    # The epoch keeps growing across runs (a reload to an older table is refused): 10 ms ticks
    # since the script started.
    epoch = (time.time_ns() - t0) // 10_000_000 + 2
    with open(path + ".next", "w") as f:
        f.write(base + f'[[shards]]\nresidue = 5\nowner = "us-west"\nepoch = {epoch}\n')
    os.replace(path + ".next", path)
    admin.request("POST", "/admin/reload")
    answer = admin.getresponse()
    answer.read()
    if answer.status != 200:
        print(f"swapper: reload refused ({answer.status})", file=sys.stderr)
    time.sleep(0.1)
PY
}
t0=$(date +%s%N)

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
    local swap_pid="" swaps_before swaps_after
    swaps_before=$(reloads)
    # The swapper runs inside this function's command substitution: keep it off its stdout, and
    # note its pid so that cleanup stops it if this run dies first.
    if [ -n "$swap" ]; then swapper > /dev/null & swap_pid=$!; echo "$swap_pid" > "$work/swapper.pid"; fi
    # Warm up pools and pages, then measure.
    taskset -c 1 oha -z 2s -c 32 --no-tui --output-format quiet -m "$method" "${hdr[@]}" "$url" > /dev/null
    local before; before=$(cpu_ticks "$pid")
    taskset -c 1 oha "${args[@]}" "$url" > "$work/run.json"
    local after; after=$(cpu_ticks "$pid")
    [ -n "$swap_pid" ] && { kill "$swap_pid"; wait "$swap_pid" 2> /dev/null || true; }
    swaps_after=$(reloads)
    python3 - "$name" "$mode" "$before" "$after" "$hz" "$work/run.json" "$swaps_before" "$swaps_after" << 'PY'
import json, sys
name, mode, before, after, hz, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
swaps = int(float(sys.argv[8])) - int(float(sys.argv[7]))
if name == "router-swaps" and swaps < 5:
    sys.exit(f"{name} {mode}: only {swaps} table swaps were applied")
r = json.load(open(path))
codes = r["statusCodeDistribution"]
if not codes or any(not c.startswith("2") for c in codes):
    sys.exit(f"{name} {mode}: non-2xx responses {codes}")
total = sum(codes.values())
cpu_us = (after - before) / hz * 1e6 / total if total else 0.0
lat = r["latencyPercentiles"]
print(json.dumps({"scenario": name, "mode": mode, "rps": r["summary"]["requestsPerSec"],
                  "p50_us": lat["p50"] * 1e6, "p99_us": lat["p99"] * 1e6,
                  "cpu_us_per_req": cpu_us, "requests": total, "swaps": swaps}))
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

python3 - "$raw" "$work/memory.jsonl" "bench/results/$stamp.json" "bench/results/$stamp.md" "$rounds" "$secs" "$rate" << 'PY'
import json, statistics, subprocess, sys
raw, memory, out_json, out_md, rounds, secs, rate = sys.argv[1:8]
runs = [json.loads(l) for l in open(raw)]
mem = {m["scenario"]: m for m in map(json.loads, open(memory))}
def med(s, m, k):
    return statistics.median(r[k] for r in runs if r["scenario"] == s and r["mode"] == m)
def spread(s, m, k):
    v = [r[k] for r in runs if r["scenario"] == s and r["mode"] == m]
    return min(v), max(v)
scen = ["direct", "nginx", "haproxy", "router-read", "router-write", "router-swaps"]
table = {s: {"rps": med(s, "capacity", "rps"), "rps_range": spread(s, "capacity", "rps"),
             "cpu_us": med(s, "capacity", "cpu_us_per_req"),
             "p50_us": med(s, "latency", "p50_us"), "p99_us": med(s, "latency", "p99_us")} for s in scen}
d99 = table["direct"]["p99_us"]
best_rps = max(table["nginx"]["rps"], table["haproxy"]["rps"])
best_cpu = min(table["nginx"]["cpu_us"], table["haproxy"]["cpu_us"])
added = {s: table[s]["p99_us"] - d99 for s in scen}
added_p50 = {s: table[s]["p50_us"] - table["direct"]["p50_us"] for s in scen}
swaps = sum(r["swaps"] for r in runs if r["scenario"] == "router-swaps")
div = lambda a, b: a / b if b else float("inf")
shift = div(table["router-swaps"]["p99_us"], table["router-read"]["p99_us"]) - 1
kib = mem["router"]["kib_per_connection"]
# (measure, value, target, met)
targets = [
    ("Throughput, router read ÷ max(nginx, haproxy)", f"{div(table['router-read']['rps'], best_rps):.2f}", "≥ 1.0",
     table["router-read"]["rps"] >= best_rps),
    ("CPU-µs per request, router ÷ min(nginx, haproxy)", f"{div(table['router-read']['cpu_us'], best_cpu):.2f}", "≤ 1.0",
     table["router-read"]["cpu_us"] <= best_cpu),
    ("Added p99 over direct, router read (µs)",
     f"{added['router-read']:.0f} (nginx {added['nginx']:.0f}, haproxy {added['haproxy']:.0f})",
     "≤ min(nginx, haproxy) and ≤ 250",
     added["router-read"] <= min(added["nginx"], added["haproxy"]) and added["router-read"] <= 250),
    # The issue names no percentile for this row: the added latency is read at p50, and the
    # p99 ratio is shown beside it.
    ("Forwarded write's added latency ÷ read's, p50 (p99)",
     f"{div(added_p50['router-write'], added_p50['router-read']):.2f} "
     f"({div(added['router-write'], added['router-read']):.2f})", "≤ 2.0",
     added_p50["router-write"] <= 2 * added_p50["router-read"]),
    ("Table swaps: non-2xx; p99 shift", f"0 in {swaps} swaps; {shift * 100:+.0f} %", "0; ≤ 10 %", shift <= 0.10),
    ("RSS per idle keep-alive connection (KiB)",
     f"{kib:.1f} (nginx {mem['nginx']['kib_per_connection']:.1f}, haproxy {mem['haproxy']['kib_per_connection']:.1f})",
     "≤ 16", kib <= 16),
]
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2; nproc; uname -sr"],
                     capture_output=True, text=True).stdout.split("\n")
machine = f"{cpu[0].strip()}, {cpu[1]} cores, {cpu[2]}"
json.dump({"rounds": int(rounds), "seconds": int(secs), "rate": int(rate), "machine": machine,
           "medians": table, "added_p99_us": added, "added_p50_us": added_p50, "memory": mem,
           "targets": [{"measure": t[0], "value": t[1], "target": t[2], "met": t[3]} for t in targets],
           "runs": runs}, open(out_json, "w"), indent=2)
lines = [f"Medians of {rounds} interleaved rounds of {secs} s. Capacity: `oha -c 32`, closed loop. "
         f"Latency: `oha -c 32 -q {rate} --latency-correction`. Proxies and backend on CPU 0, oha on CPU 1; "
         f"one worker each. Machine: {machine}.", "",
         "| scenario | req/s (capacity) | min–max | CPU µs/req | p50 µs @ fixed rate | p99 µs @ fixed rate | added p99 µs |",
         "|---|---|---|---|---|---|---|"]
for s in scen:
    t = table[s]
    lo, hi = t["rps_range"]
    lines.append(f"| {s} | {t['rps']:.0f} | {lo:.0f}–{hi:.0f} | {t['cpu_us']:.1f} | {t['p50_us']:.0f} | "
                 f"{t['p99_us']:.0f} | {'—' if s == 'direct' else f'{added[s]:.0f}'} |")
lines += ["", "Idle keep-alive client connections, RSS growth per connection: "
          + ", ".join(f"{n} {mem[n]['kib_per_connection']:.1f} KiB ({mem[n]['connections']} connections)"
                      for n in ["nginx", "haproxy", "router"]) + ".",
          "", "| target | value | wanted | met |", "|---|---|---|---|"]
for name, value, wanted, met in targets:
    lines.append(f"| {name} | {value} | {wanted} | {'yes' if met else '**no**'} |")
open(out_md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "wrote bench/results/$stamp.json and bench/results/$stamp.md" >&2
