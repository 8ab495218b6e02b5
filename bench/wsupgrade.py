"""The raw WebSocket upgrade the Python bench scripts send (standard library only, so what
they time or provoke is their own and nothing hides in a library's buffering)."""
import sys


def request(host, path="/"):
    """The upgrade request for `path` with Host `host`, as bytes."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def read_101(sock, chunk=4096):
    """Reads the answer's head from `sock`, `chunk` bytes at a time (1 reads nothing past it);
    returns the bytes read past the head. Ends the script with a sentence when the connection
    closes first or the answer is not a 101."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(chunk)
        if not data:
            sys.exit(f"the connection closed before the 101: {head[:200]!r}")
        head += data
    head, rest = head.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        sys.exit(f"expected 101, got {status!r}")
    return rest
