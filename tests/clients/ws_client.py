"""The client matrix's WebSocket checks with Python's `websockets`.

    python3 ws_client.py URL TOKEN
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect

url, token = sys.argv[1:3]


def check(name, condition, detail=""):
    if not condition:
        print(f"FAILED {name}: {detail}")
        sys.exit(1)
    print(f"ok {name}")


async def main():
    async with connect(url, max_size=None) as ws:
        first = json.loads(await ws.recv())
        check(
            "handshake carried the token and User-Agent",
            first["authorization"] == "Bearer " + token and first["user-agent"].startswith("bearer-proxy/"),
            first,
        )
        check("path", first["path"] == "/ws?room=1", first)
        await ws.send("hello")
        check("text both ways", await ws.recv() == "hello")
        await ws.send(b"\x00\x01\xfe\xff")
        check("binary both ways", await ws.recv() == b"\x00\x01\xfe\xff")
        big = bytes(range(256)) * 4096
        await ws.send(big)
        check("1 MiB message", await ws.recv() == big)
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        check("ping, pong", True)
        await ws.close(code=4001, reason="done here")
        check("close code", ws.close_code == 4001 and ws.close_reason == "done here", (ws.close_code, ws.close_reason))


asyncio.run(main())
