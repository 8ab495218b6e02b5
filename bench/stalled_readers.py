"""Reproduces the known limit in docs/architecture.md ("small DATA frames"): visitors that stop
reading WebSockets fed with tiny messages make the edge hold many small HTTP/2 DATA frames,
until h2 ends the whole agent connection with ENHANCE_YOUR_CALM and every tunnel of that
agent drops.

    python3 bench/stalled_readers.py serve 17100 &          # local server: 1-char messages
    burrow-edge ... --http 127.0.0.1:19180 ...               # and an agent for it:
    burrow http 17100 --subdomain dos ...
    python3 bench/stalled_readers.py visit 19180 dos.localhost 8 60

`visit` opens N WebSockets to /flood that never read (2 KiB receive buffers) and one canary
WebSocket to /echo that echoes every 100 ms, and reports whether the canary survived. With a
sixth argument `reading` the /flood visitors read everything instead: against an edge started
with `--default-max-websocket-bytes-per-second`, the local server's small messages then come
faster than the tunnel's byte rate. Measured at 4096 bytes/s (BENCHMARKS.md, fifth round): the
link dropped after 3.4 s before the rate limit read ahead into the backlog too; since, each
flood WebSocket is closed as over the limit and the canary lives on.
Measured 2026-11-24 (release build, plain agent link): the canary closed after 19 s. Since the
relay's backlog for stalled readers (docs/architecture.md) the edge closes each stalled
WebSocket with 1008 instead and the canary lives on.
"""
import base64
import hashlib
import socket
import sys
import threading
import time

import wsupgrade

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def serve_one(c, gap):
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(4096)
        if not d:
            return
        head += d
    key = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    c.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if head.split(b" ")[1] == b"/echo":
            while c.recv(4096):
                c.sendall(b"\x81\x02ok")
            return
        while True:
            c.send(b"\x81\x01a")  # one unmasked 1-character text frame per write
            time.sleep(gap)
    except OSError:
        pass


def serve(port, gap=0.0001):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(100)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_one, args=(c, gap), daemon=True).start()


def upgrade(port, host, path, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(wsupgrade.request(host, path))
    # One byte at a time: nothing the server sends after the 101 is consumed here.
    wsupgrade.read_101(s, chunk=1)
    return s


def drain(s, closed):
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    closed.append(s)


def visit(port, host, n, secs, reading=False):
    if reading:
        stalled, closed = [upgrade(port, host, "/flood") for _ in range(n)], []
        for s in stalled:
            threading.Thread(target=drain, args=(s, closed), daemon=True).start()
    else:
        stalled = [upgrade(port, host, "/flood", rcvbuf=2048) for _ in range(n)]
    canary = upgrade(port, host, "/echo")
    canary.settimeout(2)
    started, echoes = time.time(), 0
    while time.time() - started < secs:
        try:
            canary.sendall(b"\x81\x81\x00\x00\x00\x00x")  # masked (zero key) 1-byte text
            if not canary.recv(16):
                print(f"canary closed after {time.time() - started:.1f} s ({echoes} echoes)")
                return 1
            echoes += 1
        except OSError as e:
            print(f"canary failed after {time.time() - started:.1f} s ({echoes} echoes): {e}")
            return 1
        time.sleep(0.1)
    if reading:
        print(f"canary alive after {secs:.0f} s ({echoes} echoes); "
              f"{len(closed)} of {n} reading visitors closed")
    else:
        print(f"canary alive after {secs:.0f} s ({echoes} echoes); {n} readers stalled")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif len(sys.argv) in (6, 7) and sys.argv[1] == "visit":
        reading = sys.argv[6:] == ["reading"]
        if len(sys.argv) == 7 and not reading:
            sys.exit(__doc__)
        sys.exit(visit(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), reading))
    else:
        sys.exit(__doc__)
