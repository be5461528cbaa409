#!/usr/bin/env bash
# Run every test, including the etcd backend's, which start a real etcd.
#
# Those need two Debian packages: protobuf-compiler (etcd-client runs protoc when it builds) and
# etcd-server (the tests start etcd on free loopback ports); one test reads listen queues with
# `ss`, from iproute2. This script installs whichever is
# missing with apt-get, then runs the tests of the whole workspace (the router, with the etcd
# feature, and the emulated Loom in crates/loom-emulator). Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v protoc > /dev/null || need+=(protobuf-compiler)
command -v etcd > /dev/null || need+=(etcd-server)
command -v ss > /dev/null || need+=(iproute2)
command -v chromium > /dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "tests/run.sh: installing ${need[*]}" >&2
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
exec cargo test --workspace --features loom-router/etcd "$@"
