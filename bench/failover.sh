#!/usr/bin/env bash
# Failover benchmark: kill a DC repeatedly, per backend (memory, etcd) and profile (5 s and 3 s
# leases); report kill → first write at the new owner (p50, p99), the planned switchover's write
# pause, and dual-owner windows. Then lose the leader of a three-member etcd (killed, frozen)
# under steady writes: write pause p50/p99 and fenced answers. Writes
# bench/results/failover-<date>.md.
#
# Needs etcd and protoc (Debian: etcd-server, protobuf-compiler).
# Usage: bench/failover.sh [rounds] (LOOM_BENCH_ONLY=leader-loss for the leader-loss rows alone)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
command -v etcd > /dev/null && command -v protoc > /dev/null \
    || { echo "needs etcd and protoc: apt-get install -y etcd-server protobuf-compiler" >&2; exit 1; }

dir=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client=$(port); peer=$(port)
etcd --name bench --data-dir "$dir" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" > "$dir/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill $etcd_pid 2> /dev/null; wait $etcd_pid 2> /dev/null || true; rm -rf "$dir"' EXIT

mkdir -p bench/results
out="bench/results/failover-$(date +%Y-%m-%d).md"
{
    echo "# Failover benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $(nproc) cores, $(uname -sr); etcd $(etcd --version | head -1 | awk '{print $3}')."
    echo "Command: bench/failover.sh $rounds"
    echo
    LOOM_BENCH_ROUNDS=$rounds LOOM_BENCH_ETCD="http://127.0.0.1:$client" \
        cargo bench --quiet --features etcd --bench failover
} | tee "$out"
echo "wrote $out" >&2
