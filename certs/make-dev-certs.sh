#!/usr/bin/env bash
# Make a development CA and one certificate per DC, for trying TLS and router-to-router mTLS on
# one machine. DEVELOPMENT ONLY: the CA key sits next to the certificates, unprotected.
#
# Usage: certs/make-dev-certs.sh [dir] [dc ...]   (default: certs/dev us-east us-west eu-central)
# Writes <dir>/ca.pem, <dir>/ca-key.pem and, per DC, <dir>/<dc>.pem and <dir>/<dc>-key.pem,
# valid for localhost and 127.0.0.1, for serverAuth and clientAuth (a router presents the same
# certificate to its peers), for 30 days. Needs openssl.
set -euo pipefail
dir=${1:-"$(dirname "$0")/dev"}
shift || true
dcs=("$@")
[ ${#dcs[@]} -gt 0 ] || dcs=(us-east us-west eu-central)
mkdir -p "$dir"
cd "$dir"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -keyout ca-key.pem -out ca.pem -subj "/CN=loom-router development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2> /dev/null
for dc in "${dcs[@]}"; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dc-key.pem" -out "$dc.csr" -subj "/CN=loom-router $dc" 2> /dev/null
    openssl x509 -req -in "$dc.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
        -out "$dc.pem" -extfile <(printf '%s\n' \
            "subjectAltName=DNS:localhost,IP:127.0.0.1" \
            "extendedKeyUsage=serverAuth,clientAuth" \
            "keyUsage=critical,digitalSignature") 2> /dev/null
    rm -f "$dc.csr"
done
rm -f ca.srl
echo "wrote $(pwd): ca.pem and $(printf '%s.pem ' "${dcs[@]}")(development only)"
