"""Visitors that stop reading downloads, against an agent's whole connection window.

What waits unread in HTTP/2 for a stream counts against the window of the whole agent
connection, so enough stalled downloads used to leave no window for any other stream: every
tunnel of the agent froze. The edge now lets readers that stopped hold at most half of it
(docs/architecture.md, `--stopped-reader-grace-ms`).

    mkdir -p /tmp/www && head -c 50000000 /dev/urandom > /tmp/www/big && echo hi > /tmp/www/small
    (cd /tmp/www && python3 -m http.server 17200 --bind 127.0.0.1) &
    burrow-edge ... --http 127.0.0.1:19280 ...                # and an agent for it:
    burrow http 17200 --subdomain dl ...
    python3 bench/stalled_downloads.py 19280 dl.localhost 40

It opens N downloads of /big that never read (4 KiB receive buffers), waits 3 s, then asks
for /small ten times, 5 s each, and reports how many answers came. Measured 2026-11-24 at
defaults (debug builds, plain link): 009585a answered 0 of 10 with 40 stalled downloads;
b02e60a answered 10 of 10 with 40 and with 100 (each in about 2 ms).
"""
import socket
import sys
import time


def main(port, host, n):
    held = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        held.append(s)
    time.sleep(3)
    ok = 0
    for i in range(10):
        c = socket.socket()
        c.settimeout(5)
        c.connect(("127.0.0.1", port))
        started = time.time()
        c.sendall(f"GET /small HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        try:
            data = b""
            while True:
                d = c.recv(4096)
                if not d:
                    break
                data += d
            status = data.split(b" ")[1].decode() if data else "nothing"
            print(f"small GET {i}: {status} in {1000 * (time.time() - started):.0f} ms")
            ok += 1
        except socket.timeout:
            print(f"small GET {i}: no answer in 5 s")
        c.close()
    print(f"{ok}/10 small GETs answered with {n} stalled downloads")
    return 0 if ok == 10 else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
