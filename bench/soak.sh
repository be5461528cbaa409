#!/usr/bin/env bash
# Soak, overload and churn (issue 12; bench/soak.rs says what each does and checks): three
# router processes on an etcd under mixed traffic for [minutes] (default 30) with reloads every
# 2 s and a DC kill every 5 minutes, then a router behind a 1 s Loom past max_concurrent_requests,
# then 10,000 short and 10,000 idle connections. Prints a Markdown report and exits non-zero when
# a check fails. Runs of 10 minutes or more also write bench/results/soak-<date>-<time>.md.
#
# Needs etcd and protoc (Debian: etcd-server, protobuf-compiler). Usage: bench/soak.sh [minutes]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
command -v etcd > /dev/null && command -v protoc > /dev/null \
    || { echo "needs etcd and protoc: apt-get install -y etcd-server protobuf-compiler" >&2; exit 1; }

out=/dev/null
if [ "${minutes%.*}" -ge 10 ]; then
    mkdir -p bench/results
    # Dated to the minute: a second run the same day must not overwrite a result docs cite.
    out="bench/results/soak-$(date +%Y-%m-%d-%H%M).md"
fi
{
    echo "# Soak, overload and churn, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $(nproc) cores, $(uname -sr); etcd $(etcd --version | head -1 | awk '{print $3}')."
    echo "Command: bench/soak.sh $minutes"
    echo
    LOOM_SOAK_MINUTES=$minutes cargo bench --quiet --locked --features etcd --bench soak
} | tee "$out"
