"""The Python `websockets` echo server, as people paste it.

The pasted example is `websockets.serve(echo, "localhost", port)`; here the host is 127.0.0.1
because "localhost" with port 0 binds ::1 and 127.0.0.1 on two different free ports, and the
port announced could be the one the agent does not dial. Prints `LISTENING <port>` first; exits
when its stdin pipe closes or after MAX_LIFETIME_S.

    python websockets_echo_server.py [--host 127.0.0.1]
"""

import argparse
import asyncio
import os
import stat
import sys

import websockets

MAX_LIFETIME_S = 600


async def echo(websocket):
    async for message in websocket:
        await websocket.send(message)


async def stdin_closed():
    """Resolves when a piped stdin reaches EOF; never, if stdin is not a pipe."""
    if not stat.S_ISFIFO(os.fstat(0).st_mode):
        await asyncio.Future()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def main(host):
    async with websockets.serve(echo, host, 0) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"LISTENING {port}", flush=True)
        try:
            await asyncio.wait_for(stdin_closed(), MAX_LIFETIME_S)
        except TimeoutError:
            pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    asyncio.run(main(parser.parse_args().host))
