# Shared by bench/load.sh and bench/instructions.sh: the ports, the one nginx backend, the
# baseline proxies and the routers' config, so both benchmarks measure the same setup.
# Sourced, not run (from the repository root). Uses $work (a scratch folder) and the port variables set by `ports`.

# apt-get install whichever of these programs is missing: install_missing command:package...
install_missing() {
    local need=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" > /dev/null || need+=("${pair#*:}")
    done
    [ ${#need[@]} -gt 0 ] || return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
}

# Seven distinct free ports, all bound at once so none is handed out twice:
# backend nginx_proxy haproxy_port east east_admin west west_admin.
ports() {
    read -r backend nginx_proxy haproxy_port east east_admin west west_admin < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
}

# The backend every proxy is measured through: one nginx worker answering every path and
# method with a fixed cluster JSON.
backend_conf() {
    cat << EOF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend;
    location / { default_type application/json;
      return 200 '{"id":"00000011","name":"bench","status":"active"}'; } } }
EOF
}

# The baselines do the header work the router does on every request: X-Forwarded-For/-Proto/
# -Host upstream, an X-Request-Id generated when absent and sent both ways, and Via both ways
# (Envoy's benchmarking advice: compare proxies doing the same work).
# $1: how nginx runs its one worker, e.g. "worker_processes 1;" or "master_process off;".
nginx_conf() {
    cat << EOF
$1 daemon off; pid $work/nginx.pid; error_log $work/nginx.err warn;
worker_rlimit_nofile 20000;
events { worker_connections 16384; }
http { access_log off; keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$backend; keepalive 128; }
  map \$http_x_request_id \$rid { "" \$request_id; default \$http_x_request_id; }
  server { listen 127.0.0.1:$nginx_proxy;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme; proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Request-Id \$rid; proxy_set_header Via "1.1 nginx";
      add_header X-Request-Id \$rid; add_header Via "1.1 nginx"; } } }
EOF
}

haproxy_cfg() {
    cat << EOF
global
  nbthread 1
  # 2 fds per connection must fit this machine's hard limit of 20 000 open files.
  maxconn 9900
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$haproxy_port
  option forwardfor
  unique-id-format %{+X}o%ci%cp%fp%Ts%rt%pid
  http-request set-header X-Request-Id %[unique-id] unless { req.hdr(x-request-id) -m found }
  http-request set-var(txn.rid) req.hdr(x-request-id)
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via "1.1 haproxy"
  http-response set-header X-Request-Id %[var(txn.rid)]
  http-response add-header Via "1.1 haproxy"
  default_backend be
backend be
  server s1 127.0.0.1:$backend
EOF
}

# Two DCs: us-east (measured) and us-west (owner of the forwarded writes), both in front of the
# backend. $1 name, $2 http port, $3 admin port, $4 more tables (optional).
router_config() {
    cat << EOF
datacenter = "$1"
global_home = "us-east"
[listen]
http = "127.0.0.1:$2"
admin = "127.0.0.1:$3"
[loom]
upstream = "http://127.0.0.1:$backend"
[ids]
increment = 10
[log]
access = "off"
[runtime]
workers = 1
${4:-}
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
