#!/usr/bin/env python3
"""What a user feels: clients that open a new connection for every request,
calling an HTTPS API across a real round trip, directly or through
bearer-proxy on the same machine; and how fast the proxy starts.

    python3 benches/roundtrip.py                 # 20 ms round trip, 5 min of silence
    RTT_MS=20 REQUESTS=50 SILENCE=300 python3 benches/roundtrip.py
    SILENCE=0 ...                                # leave out the quiet spell
    SPELLS=3 ...                                 # quiet spells, one after another (default 1)

The upstream is nginx with TLS (a CA the bench makes; HTTP/1.1 and HTTP/2 by
ALPN, its default idle limit of 75 s). The round trip is a relay on
loopback that holds every piece of data for half the round trip each way,
and a new connection's first bytes for one round trip more (the TCP
handshake a real network costs): this machine's kernel has no netem. Only
loopback addresses are used.

Measured, each for REQUESTS sequential requests, each on a new connection:
  - curl, one process per request (as a script's loop runs it; timed as
    the script waits for it, and by curl's own time_total, which leaves
    out the process's start and exit), and
  - Python requests without a session (requests.get each time),
directly to the upstream (TCP + TLS + the request: three round trips) and
through bearer-proxy (a loopback connection, then the request on the
proxy's warm TLS connection: one round trip). Then the first request after
SILENCE seconds without any (curl, timed both ways, then requests; SPELLS
times, through the proxy first after odd spells and directly first after
even ones), and start-up: from process start to ready
(first token held, from a local fake provider) and to the first proxied
answer, with the warm connection on and off. Writes benches/roundtrip.md
and benches/roundtrip.png.
"""

import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import TokenHandler, free_port, make_ca, wait_port  # noqa: E402

import http.server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BINARY = os.environ.get("BP_BIN", str(ROOT / "target/release/bearer-proxy"))
RTT = float(os.environ.get("RTT_MS", "20")) / 1000
REQUESTS = int(os.environ.get("REQUESTS", "50"))
SILENCE = int(os.environ.get("SILENCE", "300"))
STARTS = int(os.environ.get("STARTS", "5"))
SPELLS = int(os.environ.get("SPELLS", "1"))
# nginx's idle limit for the upstream's connections (its default: 75 s;
# HTTP/2 connections: http2_idle_timeout, 3 min in nginx 1.22).
UPSTREAM_IDLE = os.environ.get("UPSTREAM_IDLE", "")
# The same curl runs by curl's own clock: without the 8 to 11 ms that
# starting and ending a curl process costs here, paid directly and through
# the proxy alike, what is left is the network's part, which the proxy
# changes.
CURL_OWN = "curl, its own time_total"


def install():
    try:
        import requests  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "requests"], check=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)


def start_upstream(work, port):
    conf = work / "upstream.conf"
    conf.write_text(f"""
worker_processes 1;
pid {work}/upstream.pid;
error_log {work}/upstream.err warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {f"keepalive_timeout {UPSTREAM_IDLE}; http2_idle_timeout {UPSTREAM_IDLE};" if UPSTREAM_IDLE else ""}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {work}/server.pem;
    ssl_certificate_key {work}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


class Relay:
    """A TCP relay on loopback that delays data by half the round trip each
    way, and a new connection's first bytes to the server by one round trip
    more (the TCP handshake)."""

    def __init__(self, target_port):
        self.target = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_until_complete(server.serve_forever())

    async def _handle(self, reader, writer):
        loop = asyncio.get_running_loop()
        opened = loop.time()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        half = RTT / 2

        async def pump(src, dst, not_before):
            queue = asyncio.Queue()

            async def read():
                while True:
                    try:
                        data = await src.read(65536)
                    except OSError:
                        data = b""
                    now = loop.time()
                    await queue.put((max(now, not_before) + half, data))
                    if not data:
                        return

            task = asyncio.ensure_future(read())
            try:
                while True:
                    at, data = await queue.get()
                    delay = at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if not data:
                        try:
                            dst.write_eof()
                        except (OSError, RuntimeError):
                            pass
                        return
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                task.cancel()

        await asyncio.gather(pump(reader, up_writer, opened + RTT), pump(up_reader, writer, opened),
                             return_exceptions=True)
        for w in (writer, up_writer):
            w.close()


def start_proxy(ports, ca, keep_warm=True):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "API_CLIENT_ID": "bench",
        "API_CLIENT_SECRET": "bench-secret",
        "API_TOKEN_URL": f"http://127.0.0.1:{ports['token']}/token",
        "BEARER_PROXY_UPSTREAM": f"https://localhost:{ports['relay']}",
        "BEARER_PROXY_TLS_CA_FILE": str(ca),
        "BEARER_PROXY_LISTEN": f"127.0.0.1:{ports['proxy']}",
        "BEARER_PROXY_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}",
        "BEARER_PROXY_UPSTREAM_KEEP_WARM": "true" if keep_warm else "false",
        "RUST_LOG": os.environ.get("BP_RUST_LOG", "warn"),
    }
    log = open(os.environ["BP_LOG"], "ab") if os.environ.get("BP_LOG") else subprocess.DEVNULL
    return subprocess.Popen([BINARY], env=env, stderr=log)


def ready(admin_port):
    import http.client
    try:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=1)
        conn.request("GET", "/readyz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def curl_run(url, ca):
    """One curl process: the time the script that runs it waits (process
    start and exit included), and curl's own time_total (from the start of
    the transfer: name lookup, connect, TLS, request and answer)."""
    start = time.perf_counter()
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--cacert", str(ca), url],
                         capture_output=True, text=True)
    took = time.perf_counter() - start
    code, _, own = out.stdout.partition(" ")
    if code != "200":
        raise RuntimeError(f"curl {url}: {out.stdout} {out.stderr}")
    return took, float(own)


def curl_once(url, ca):
    return curl_run(url, ca)[0]


def requests_once(url, ca):
    import requests
    start = time.perf_counter()
    answer = requests.get(url, verify=str(ca), timeout=10)
    took = time.perf_counter() - start
    if answer.status_code != 200:
        raise RuntimeError(f"requests {url}: {answer.status_code}")
    return took


def startup(ports, ca, keep_warm):
    """Process start to ready, and to the first proxied answer (seconds)."""
    t0 = time.perf_counter()
    proc = start_proxy(ports, ca, keep_warm)
    try:
        while not ready(ports["admin"]):
            if time.perf_counter() - t0 > 20:
                raise RuntimeError("the proxy did not become ready")
            time.sleep(0.002)
        t_ready = time.perf_counter()
        took = curl_once(f"http://127.0.0.1:{ports['proxy']}/", ca)
        return t_ready - t0, time.perf_counter() - t0, took
    finally:
        proc.terminate()
        proc.wait()


def main():
    # The relay's tasks are cut off at exit: nothing to report.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    install()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = Path(tempfile.mkdtemp(prefix="bearer-proxy-rtt-"))
    ca = make_ca(work)
    ports = {name: free_port() for name in ["upstream", "token", "proxy", "admin"]}
    upstream = start_upstream(work, ports["upstream"])
    relay = Relay(ports["upstream"])
    ports["relay"] = relay.port
    token_server = http.server.ThreadingHTTPServer(("127.0.0.1", ports["token"]), TokenHandler)
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    direct = f"https://localhost:{ports['relay']}/"
    proxied = f"http://127.0.0.1:{ports['proxy']}/"
    lines = []
    series = {}
    try:
        starts = {True: [], False: []}
        for _ in range(STARTS):
            for keep_warm in (True, False):
                starts[keep_warm].append(startup(ports, ca, keep_warm))
        proxy = start_proxy(ports, ca)
        while not ready(ports["admin"]):
            time.sleep(0.01)
        for name, url in [("direct", direct), ("through bearer-proxy", proxied)]:
            runs = [curl_run(url, ca) for _ in range(REQUESTS)]
            series[("curl", name)] = [wall for wall, _ in runs]
            series[(CURL_OWN, name)] = [own for _, own in runs]
        for name, url in [("direct", direct), ("through bearer-proxy", proxied)]:
            series[("requests", name)] = [requests_once(url, ca) for _ in range(REQUESTS)]
        spells = []
        for spell in range(SPELLS if SILENCE else 0):
            print(f"{SILENCE} s of silence ({spell + 1} of {SPELLS})...", file=sys.stderr)
            time.sleep(SILENCE)
            # The client's side wakes first (a curl to the admin port, which
            # touches no upstream connection): after minutes asleep, the
            # first process start on this VM takes tens of ms more, which
            # would be counted against whichever request came first.
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{ports['admin']}/healthz"])
            # curl both ways (by wall and by its own clock), then Python's
            # requests both ways. The first request after a spell also pays
            # for waking the machine (client, relay, upstream): odd spells
            # go through the proxy first, even ones directly first.
            proxy_first = spell % 2 == 0

            def both_ways(once):
                """(through the proxy, direct), in this spell's order."""
                if proxy_first:
                    through = once(proxied, ca)
                    return through, once(direct, ca)
                straight = once(direct, ca)
                return once(proxied, ca), straight

            (proxy_wall, proxy_own), (direct_wall, direct_own) = both_ways(curl_run)
            spells.append({"first": "proxy" if proxy_first else "direct",
                           "curl": (proxy_wall, direct_wall), CURL_OWN: (proxy_own, direct_own),
                           "requests": both_ways(requests_once)})
        proxy.terminate()
        proxy.wait()
    finally:
        upstream.terminate()
        token_server.shutdown()

    ms = lambda s: s * 1000  # noqa: E731
    med = statistics.median
    lines.append(f"Round trip {ms(RTT):.0f} ms (a delaying relay on loopback), HTTPS upstream (nginx, TLS 1.3), "
                 f"{REQUESTS} sequential requests, each on a new connection; {time.strftime('%Y-%m-%d')}, "
                 f"{os.cpu_count()} cores.")
    lines.append("")
    lines.append("| client | direct, ms per request | through bearer-proxy, ms | × direct | first request through the proxy, ms |")
    lines.append("|---|---|---|---|---|")
    for client in ("curl", "requests", CURL_OWN):
        d, p = series[(client, "direct")], series[(client, "through bearer-proxy")]
        lines.append(f"| {client} | {ms(med(d)):.1f} (mean {ms(statistics.mean(d)):.1f}) | {ms(med(p)):.1f} "
                     f"(mean {ms(statistics.mean(p)):.1f}) | {med(p) / med(d):.2f} | {ms(p[0]):.1f} |")
    if spells:
        lines.append("")
        lines.append(f"After {SILENCE} s without a request ({len(spells)} spell(s), one request each way per client):")
        lines.append("")
        lines.append("| spell | first after it | client | through bearer-proxy, ms | direct, ms | × direct |")
        lines.append("|---|---|---|---|---|---|")
        for number, spell in enumerate(spells, 1):
            for client in ("curl", CURL_OWN, "requests"):
                proxy_took, direct_took = spell[client]
                lines.append(f"| {number} | {spell['first']} | {client} | {ms(proxy_took):.1f} | "
                             f"{ms(direct_took):.1f} | {proxy_took / direct_took:.2f} |")
    lines.append("")
    lines.append(f"Start-up, medians of {STARTS} starts (local fake provider):")
    lines.append("")
    lines.append("| keep_warm | start to ready, ms | start to first answer, ms | the first request itself, ms |")
    lines.append("|---|---|---|---|")
    for keep_warm in (True, False):
        rows = starts[keep_warm]
        lines.append(f"| {str(keep_warm).lower()} | {ms(med([r[0] for r in rows])):.1f} | "
                     f"{ms(med([r[1] for r in rows])):.1f} | {ms(med([r[2] for r in rows])):.1f} |")
    report = "\n".join(lines)
    print(report)
    (ROOT / "benches/roundtrip.md").write_text(report + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, client in zip(axes, ("curl", "requests")):
        for name in ("direct", "through bearer-proxy"):
            ax.plot(range(1, REQUESTS + 1), [ms(t) for t in series[(client, name)]], marker=".", label=name)
        ax.set_title(f"{client}, a new connection per request")
        ax.set_xlabel("request")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"HTTPS API across a {ms(RTT):.0f} ms round trip: directly, or through bearer-proxy on the same host")
    fig.tight_layout()
    fig.savefig(ROOT / "benches/roundtrip.png", dpi=110)


if __name__ == "__main__":
    main()
