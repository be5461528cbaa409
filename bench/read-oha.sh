#!/usr/bin/env bash
# A local read through loom-router versus the same read straight from the emulated Loom, in one
# run: `oha -z 10s -c 32`, interleaved rounds, medians of requests per second.
#
# This is the first load number (issue 2). The full comparison with nginx and HAProxy on a shared
# nginx backend is bench/load.sh's job (issue 5).
#
# Usage: bench/read-oha.sh [rounds]   (default 3; needs oha: cargo install oha --locked)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
base=${PORT_BASE:-18080}
command -v oha > /dev/null || cargo install oha --locked
command -v python3 > /dev/null || { echo "needs python3 to read oha's JSON" >&2; exit 1; }
cargo build --release --quiet

router="http://127.0.0.1:$((base + 1))"
loom="http://127.0.0.1:$((base + 1001))"
RUST_LOG=warn ./target/release/loom-router demo --port-base "$base" > /dev/null &
demo=$!
trap 'kill -INT $demo 2> /dev/null; wait $demo 2> /dev/null || true' EXIT
for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$((base + 1821))/readyz" > /dev/null && break
    sleep 0.1
done
hdr=(-H 'Coopr-UserID: admin' -H 'Coopr-TenantID: bench')
curl -fs -X POST "$router/v2/clusters" "${hdr[@]}" -d '{"name":"b","clusterTemplate":"t","numMachines":1}' > /dev/null

run() { # name url -> requests/s, after checking every response was 200
    oha -z 10s -c 32 --no-tui --output-format json "${hdr[@]}" "$2" | python3 -c '
import json, sys
r = json.load(sys.stdin)
codes = r["statusCodeDistribution"]
if set(codes) != {"200"}:
    sys.exit(f"non-200 responses: {codes}")
print(round(r["summary"]["requestsPerSec"]))'
}

declare -a through direct
for i in $(seq "$rounds"); do
    through+=("$(run router "$router/v2/clusters/00000001")")
    direct+=("$(run loom "$loom/v2/clusters/00000001")")
    echo "round $i: router ${through[-1]} req/s, direct ${direct[-1]} req/s"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
r=$(median "${through[@]}"); d=$(median "${direct[@]}")
echo "median: router $r req/s, direct $d req/s, ratio $(python3 -c "print(f'{$r/$d:.2f}')")"
