#!/usr/bin/env python3
"""RSS per idle keep-alive client connection (issue 5), for bench/load.sh.

Usage: idle_conns.py PORT COUNT PID...

Opens COUNT connections to 127.0.0.1:PORT, sends one Loom read on each and reads its whole
answer (so every connection has served a request and sits idle in keep-alive, the state a load
balancer leaves it in), then reads the summed VmRSS of PID... (a server and its workers). Prints
one JSON line: the RSS before and after, and the growth per connection in KiB. Any answer that
is not a 200 aborts, as the load script's status checks do.
"""
import json
import socket
import sys
import time

REQUEST = (
    b"GET /v2/clusters/00000011 HTTP/1.1\r\nHost: bench\r\n"
    b"Coopr-UserID: admin\r\nCoopr-TenantID: bench\r\n\r\n"
)


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def one_answer(sock):
    """Read one response with a Content-Length body; return its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("connection closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("connection closed in the response body")
        body += chunk
    return int(lines[0].split()[1])


def main():
    port, count, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    before = rss_kib(pids)
    conns = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(REQUEST)
        status = one_answer(sock)
        if status != 200:
            sys.exit(f"answer {status} on connection {len(conns) + 1}")
        conns.append(sock)
    time.sleep(1)  # let the server settle its buffers
    after = rss_kib(pids)
    # Every connection must still be open: a closed one would make the figure too small.
    for sock in conns:
        sock.setblocking(False)
        try:
            if sock.recv(1) == b"":
                sys.exit("the server closed an idle connection during the measurement")
        except BlockingIOError:
            pass
    for sock in conns:
        sock.close()
    print(json.dumps({"connections": count, "rss_before_kib": before, "rss_after_kib": after,
                      "kib_per_connection": (after - before) / count}))


if __name__ == "__main__":
    main()
