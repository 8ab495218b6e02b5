#!/usr/bin/env python3
"""Times the phases of a new WebSocket connection, medians over N connections.

    bench/connect_phases.py PORT HOST [N] [LABEL]

Each connection: TCP connect to 127.0.0.1:PORT, a WebSocket upgrade request with Host HOST
(until the 101 head has arrived), then one masked 64-byte binary message and its echo. Prints
LABEL and the median microseconds of each phase and of the whole. Only the standard library,
so the phases are the client's own and nothing is hidden in a library's buffering.
"""
import os
import socket
import statistics
import sys
import time

import wsupgrade

PHASES = ["tcp", "to101", "echo", "total"]
# Seconds any one step may take before the run stops with an error (never a hang).
STEP_TIMEOUT = 10


def once(port, host):
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t1 = time.perf_counter()
    s.sendall(wsupgrade.request(host))
    echoed = wsupgrade.read_101(s)
    t2 = time.perf_counter()
    payload, mask = b"x" * 64, os.urandom(4)
    s.sendall(bytes([0x82, 0x80 | 64]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    while len(echoed) < 66:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("the connection closed before the echo")
        echoed += chunk
    t3 = time.perf_counter()
    s.close()
    return [(t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t3 - t0) * 1e6]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    try:
        port = int(sys.argv[1])
        n = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    except ValueError:
        sys.exit(f"PORT and N must be whole numbers (got {sys.argv[1:4]})\n{__doc__}")
    host = sys.argv[2]
    label = sys.argv[4] if len(sys.argv) > 4 else host
    if not 0 < port < 65536 or n < 1:
        sys.exit("PORT must be 1 to 65535 and N 1 or more")
    try:
        runs = [once(port, host) for _ in range(n)]
    except OSError as e:
        sys.exit(f"cannot reach 127.0.0.1:{port}: {e}")
    medians = " ".join(f"{p}={statistics.median(r[i] for r in runs):.0f}" for i, p in enumerate(PHASES))
    print(f"{label:8} {medians} (µs, median of {n})")


if __name__ == "__main__":
    main()
