"""A Python `websockets` client against an echo server.

Sends text messages (empty, ASCII, non-ASCII, 256 KiB), optionally binary ones, then closes
with 1000 and checks the server answered 1000. Dials 127.0.0.1 (or --connect) while the URL's
host, `NAME.localhost:PORT`, goes out in the Host header; a wss:// URL is verified against
--ca for that host. Prints `OK websockets-echo ...` and exits 0, or `FAIL websockets-echo: ...` on stderr and exits 1; never runs past --timeout-ms.

With --idle-ms N it then stays silent for N ms (while the edge's keepalive pings arrive and
`websockets` answers them) and checks the connection still echoes.

    python websockets_echo_client.py ws://NAME.localhost:PORT/ [--prefix 'Echo: '] [--binary]
        [--expect-extension permessage-deflate] [--idle-ms N]
"""

import argparse
import asyncio
import os
import ssl
import sys
from urllib.parse import urlsplit

from websockets.asyncio.client import connect

SCENARIO = "websockets-echo"
DEFAULT_TIMEOUT_MS = 20_000
TEXTS = ["hello", "", "héllo wörld, 你好 🌍", "x" * (256 * 1024)]
BINARY_SIZES = [1, 125, 126, 65535, 65536, 300_000]


def expect_equal(what, actual, expected):
    if actual != expected:
        show = lambda v: repr(v) if len(repr(v)) <= 120 else f"{repr(v)[:100]}… ({len(v)} long)"
        raise AssertionError(f"{what}: expected {show(expected)}, got {show(actual)}")


async def scenario(args):
    url = urlsplit(args.url)
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        dial_host, dial_port = host.strip("[]"), int(port)
    else:
        dial_host, dial_port = "127.0.0.1", url.port or (443 if url.scheme == "wss" else 80)

    tls = {}
    if url.scheme == "wss":
        # Verified against --ca (else the system roots) for the URL's host, not the dialled IP.
        tls = {"ssl": ssl.create_default_context(cafile=args.ca), "server_hostname": url.hostname}
    # max_size raised so the 256 KiB message plus prefix and the 300 KB binary fit.
    async with connect(
        args.url, host=dial_host, port=dial_port, proxy=None, max_size=2**20, **tls
    ) as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        if args.expect_extension and args.expect_extension not in extensions:
            raise AssertionError(
                f"extension {args.expect_extension} not negotiated (got {extensions!r})"
            )
        for text in TEXTS:
            await ws.send(text)
            reply = await ws.recv()
            expect_equal("reply", reply, args.prefix + text)
        binaries = 0
        if args.binary:
            for size in BINARY_SIZES:
                payload = os.urandom(size)
                await ws.send(payload)
                reply = await ws.recv()
                if reply != payload:
                    raise AssertionError(f"binary echo of {size} bytes differs")
                binaries += 1
        idle = ""
        if args.idle_ms > 0:
            await asyncio.sleep(args.idle_ms / 1000)
            await ws.send("still here")
            expect_equal("reply after idling", await ws.recv(), args.prefix + "still here")
            idle = f", idle for {args.idle_ms} ms and still echoing"
        await ws.close(1000, "done")
        expect_equal("close code from the server", ws.close_code, 1000)
    ext = f', extensions "{extensions}"' if extensions else ""
    return f"{len(TEXTS)} text + {binaries} binary messages echoed{idle}, close 1000{ext}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--binary", action="store_true")
    parser.add_argument("--expect-extension")
    parser.add_argument("--connect", help="HOST:PORT to dial instead of 127.0.0.1:<url port>")
    parser.add_argument("--idle-ms", type=int, default=0)
    parser.add_argument("--ca", help="PEM file to verify a wss:// server against")
    parser.add_argument("--timeout-ms", type=int, default=DEFAULT_TIMEOUT_MS)
    args = parser.parse_args()
    try:
        summary = asyncio.run(asyncio.wait_for(scenario(args), args.timeout_ms / 1000))
    except TimeoutError:
        print(f"FAIL {SCENARIO}: no verdict within {args.timeout_ms} ms", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # any failure is the verdict, reported in one line
        print(f"FAIL {SCENARIO}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"OK {SCENARIO} {summary}", flush=True)


if __name__ == "__main__":
    main()
