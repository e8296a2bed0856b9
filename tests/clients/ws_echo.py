"""A WebSocket echo server (Python `websockets`) for the client matrix:
its first message says what the handshake carried (Authorization and
User-Agent), then it echoes every message back.

    python3 ws_echo.py PORT
"""

import asyncio
import json
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    headers = ws.request.headers
    await ws.send(json.dumps({
        "authorization": headers.get("Authorization"),
        "user-agent": headers.get("User-Agent"),
        "path": ws.request.path,
    }))
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        # A close code other than 1000 (the client's test of close codes).
        pass


async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=None) as server:
        await server.serve_forever()


asyncio.run(main())
