#!/usr/bin/env python3
"""Benchmark bearer-proxy against nginx and haproxy, side by side, on loopback.

    python3 benches/bench.py            # installs what it needs, 7 rounds
    ROUNDS=3 DURATION=3 python3 benches/bench.py
    QUICK=1 CONNECTIONS=64 ROUNDS=3 python3 benches/bench.py   # throughput only
    BP_WORKERS=2 ...                    # bearer-proxy's proxy.workers (default: its own, 1)
    BP_BASELINE_WORKERS=1 ...           # the same for the baseline
    BP_BASELINE=/path/to/old/bearer-proxy ...   # before and after in one run
    BP_SET="BEARER_PROXY_X=1 ..." BP_BASELINE_SET="..." # more settings for each
                                        # (the same binary twice: two settings side by side)
    BP_MORE_WORKERS=0 ...               # leave out "bearer-proxy x2" (see below)
    UPSTREAM=https ...                  # the upstream speaks TLS (HTTP/1.1 by ALPN)
    UPSTREAM=h2 ...                     # the upstream speaks TLS and offers HTTP/2 by ALPN
    PIN=1 ...                           # the upstream alone on the last CPU (see below)

Starts a fast static upstream (nginx, one worker, `return 200` with 1 KiB;
uploads are stored whole on tmpfs before it answers, so that every proxy
must forward all of them),
a local fake token provider, bearer-proxy, nginx and haproxy as reverse
proxies adding the same headers statically (and, for the wrk figures,
bearer-proxy once more with two serving threads, "bearer-proxy x2", unless
BP_MORE_WORKERS=0 or a baseline is measured), and measures each in turn,
interleaved in random order, round after round:
  - requests/s and p50/p99 latency with wrk at 1, 16, 64 and 256 connections
    (a run during which the hypervisor took more than 5% of the CPU, its
    "steal", is measured again, whichever the contender: STEAL_LIMIT,
    STEAL_RETRIES), and the share of the machine's CPU that no process
    used during each contender's runs ("Machine idle");
  - 1 GiB download and 1 GiB upload: MB/s, and bearer-proxy's peak RSS;
  - bearer-proxy's RSS idle and with 1,000 open keep-alive connections.
With UPSTREAM=https or h2, the upstream nginx terminates TLS (a CA the
bench makes) and each proxy reaches it over TLS with its connections
reused, as each is best configured: nginx `proxy_pass https://` to a
keepalive upstream with session reuse (nginx speaks HTTP/1.1 to upstreams),
haproxy `ssl` with `http-reuse always` (and `alpn h2` for h2), bearer-proxy
with `tls.ca_file` (HTTP/2 when the upstream offers it).
With PIN=1 the upstream runs alone on the last CPU this process may use
and everything else (wrk, curl, every proxy, with one nginx worker or
haproxy thread per CPU it has) on the others: the upstream then stands,
roughly, for a server across the network, which takes no CPU from the
proxy or its client and is not woken on the proxy's CPU (loopback still
does the upstream's side of TCP on the upstream's CPU). A full PIN=1 run
leaves benches/results.md and the plot as they are.
Prints medians and ratios to nginx, writes benches/results.md and
benches/throughput.png (plain HTTP upstream, full run only). Ratios are the headline: absolute figures drift on
shared machines. Only loopback addresses are used.
"""

import atexit
import http.server
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Seven: a round's figures move by 10% or more on a shared 2-core VM, and the
# median of seven moves less than the median of five.
ROUNDS = int(os.environ.get("ROUNDS", "7"))
DURATION = int(os.environ.get("DURATION", "5"))
CONNECTIONS = [int(c) for c in os.environ.get("CONNECTIONS", "1,16,64,256").split(",")]
QUICK = os.environ.get("QUICK") == "1"  # throughput only: for trying a change
BINARY = os.environ.get("BP_BIN", str(ROOT / "target/release/bearer-proxy"))
BASELINE = os.environ.get("BP_BASELINE")  # another build, measured alongside as "baseline"
# bearer-proxy with more serving threads (proxy.workers), in the wrk figures.
MORE_WORKERS = "" if BASELINE else os.environ.get("BP_MORE_WORKERS", "2").strip("0")
MORE = f"bearer-proxy x{MORE_WORKERS}"
GIB = 1 << 30
STEAL_LIMIT = float(os.environ.get("STEAL_LIMIT", "0.05"))  # see wrk()
STEAL_RETRIES = int(os.environ.get("STEAL_RETRIES", "3"))
TOKEN = "bench-token-" + "x" * 1200  # about the size of an Entra token
UPSTREAM = os.environ.get("UPSTREAM", "http")  # http, https or h2
if UPSTREAM not in ("http", "https", "h2"):
    sys.exit("UPSTREAM: expected http, https or h2")
PIN = os.environ.get("PIN") == "1"
ALLOWED_CPUS = sorted(os.sched_getaffinity(0))
if PIN and len(ALLOWED_CPUS) < 2:
    sys.exit(f"PIN=1: needs at least two CPUs, this process may use {len(ALLOWED_CPUS)}")
UPSTREAM_CPU = str(ALLOWED_CPUS[-1])
OTHER_CPUS = ",".join(map(str, ALLOWED_CPUS[:-1]))
# nginx's workers and haproxy's threads: one per CPU they run on.
PROXY_CORES = len(ALLOWED_CPUS) - 1 if PIN else (os.cpu_count() or 2)
TLS = UPSTREAM != "http"


def settings(variable):
    """BP_SET or BP_BASELINE_SET: NAME=VALUE items, by spaces."""
    items = {}
    for setting in os.environ.get(variable, "").split():
        name, equals, value = setting.partition("=")
        if not equals:
            sys.exit(f"{variable}: expected NAME=VALUE items, got {setting!r}")
        items[name] = value
    return items


# Read (and checked) before anything starts.
EXTRA = settings("BP_SET")
BASELINE_EXTRA = settings("BP_BASELINE_SET")


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw)


def client(*args):
    """A command line for a client or a proxy: on the CPUs beside the
    upstream's with PIN=1 (its threads and children inherit them)."""
    return ["taskset", "-c", OTHER_CPUS, *args] if PIN else list(args)


def upstream_side(*args):
    """The upstream's command line: alone on its CPU with PIN=1."""
    return ["taskset", "-c", UPSTREAM_CPU, *args] if PIN else list(args)


def install():
    missing = [p for p, b in [("nginx", "nginx"), ("haproxy", "haproxy"), ("wrk", "wrk")] if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class TokenHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"token_type": "Bearer", "expires_in": 3599, "access_token": TOKEN}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def make_ca(work):
    """A CA (ca.pem) and a certificate for localhost and 127.0.0.1 signed by
    it (server.pem, server.key) in `work`."""
    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:true",
        "-addext", "keyUsage=critical,keyCertSign")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (work / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    for name in ("server.key", "server.pem", "ca.pem"):
        (work / name).chmod(0o644)
    return work / "ca.pem"


def rss_kib(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_all(work):
    ports = {name: free_port() for name in ["upstream", "bearer-proxy", "admin", "nginx", "haproxy", "token"]}
    body = "x" * 1024
    big = work / "1g.bin"
    with open(big, "wb") as f:
        f.truncate(GIB)
    # nginx's workers (www-data) must read it.
    work.chmod(0o755)
    big.chmod(0o644)
    # Uploads are stored whole (WebDAV PUT, on tmpfs) before the upstream
    # answers, so every proxy must forward the whole body: an upstream that
    # answered at once would let a proxy discard the rest (nginx does).
    shm = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None,
                                prefix="bearer-proxy-bench-"))
    (shm / "tmp").mkdir()
    for d in (shm, shm / "tmp"):
        d.chmod(0o777)
    atexit.register(shutil.rmtree, shm, True)
    ca = make_ca(work) if TLS else None
    tls_listen = (" ssl http2" if UPSTREAM == "h2" else " ssl") if TLS else ""
    tls_lines = f"""
    ssl_certificate {work}/server.pem;
    ssl_certificate_key {work}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;""" if TLS else ""
    scheme = "https" if TLS else "http"
    up_conf = work / "upstream.conf"
    up_conf.write_text(f"""
worker_processes 1;
pid {work}/upstream.pid;
error_log {work}/upstream.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{ports['upstream']}{tls_listen} backlog=4096;{tls_lines}
    client_max_body_size 0;
    location = / {{ default_type text/plain; return 200 "{body}"; }}
    location = /1g {{ alias {big}; sendfile on; }}
    location = /upload {{ root {shm}; client_body_temp_path {shm}/tmp; dav_methods PUT; }}
  }}
}}
""")
    cores = PROXY_CORES
    ua = "bearer-proxy-bench"
    nginx_tls = f"""
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;""" if TLS else ""
    alpn = "h2,http/1.1" if UPSTREAM == "h2" else "http/1.1"
    haproxy_tls = f" ssl verify required ca-file {ca} sni str(localhost) alpn {alpn}" if TLS else ""
    nginx_conf = work / "nginx.conf"
    nginx_conf.write_text(f"""
worker_processes {cores};
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  # On, as bearer-proxy's is: one line per request, to a file.
  access_log {work}/nginx-access.log;
  keepalive_requests 1000000;
  upstream up {{ server 127.0.0.1:{ports['upstream']}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{ports['nginx']} backlog=4096;
    client_max_body_size 0;
    location / {{
      proxy_pass {scheme}://up;{nginx_tls}
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {TOKEN}";
      proxy_set_header User-Agent "{ua}";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
""")
    haproxy_conf = work / "haproxy.cfg"
    haproxy_conf.write_text(f"""
global
  nbthread {cores}
  maxconn 8192
defaults
  mode http
  timeout connect 10s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{ports['haproxy']}
  http-request set-header Authorization "Bearer {TOKEN}"
  http-request set-header User-Agent "{ua}"
  default_backend be
backend be
  server up 127.0.0.1:{ports['upstream']}{haproxy_tls}
""")
    procs = {}
    procs["upstream"] = subprocess.Popen(upstream_side("nginx", "-c", str(up_conf), "-g", "daemon off;"), stderr=subprocess.DEVNULL)
    procs["nginx"] = subprocess.Popen(client("nginx", "-c", str(nginx_conf), "-g", "daemon off;"), stderr=subprocess.DEVNULL)
    procs["haproxy"] = subprocess.Popen(client("haproxy", "-f", str(haproxy_conf)), stderr=subprocess.DEVNULL)
    token_server = http.server.ThreadingHTTPServer(("127.0.0.1", ports["token"]), TokenHandler)
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "API_CLIENT_ID": "bench",
        "API_CLIENT_SECRET": "bench-secret",
        "API_TOKEN_URL": f"http://127.0.0.1:{ports['token']}/token",
        "BEARER_PROXY_UPSTREAM": f"{scheme}://127.0.0.1:{ports['upstream']}",
        "BEARER_PROXY_LISTEN": f"127.0.0.1:{ports['bearer-proxy']}",
        "BEARER_PROXY_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}",
        "BEARER_PROXY_PROXY_MAX_CONCURRENT": "100000",
        "BEARER_PROXY_USER_AGENT": ua,
        # info: the access log is on, one line per request, as nginx's.
        "RUST_LOG": os.environ.get("BP_RUST_LOG", "info"),
    }
    if TLS:
        env["BEARER_PROXY_TLS_CA_FILE"] = str(ca)
    base_env = dict(env)
    if os.environ.get("BP_WORKERS"):
        env["BEARER_PROXY_PROXY_WORKERS"] = os.environ["BP_WORKERS"]
    if os.environ.get("BP_BASELINE_WORKERS"):
        base_env["BEARER_PROXY_PROXY_WORKERS"] = os.environ["BP_BASELINE_WORKERS"]
    env.update(EXTRA)
    base_env.update(BASELINE_EXTRA)
    # Their logs go to files, as nginx's access log does.
    def log_file(name):
        return open(work / f"{name}.log", "wb")
    procs["bearer-proxy"] = subprocess.Popen(client(BINARY), env=env, stderr=log_file("bearer-proxy"))
    names = ["upstream", "nginx", "haproxy", "bearer-proxy"]
    admins = ["admin"]
    if MORE_WORKERS:
        ports[MORE], ports["more-admin"] = free_port(), free_port()
        procs[MORE] = subprocess.Popen(client(BINARY), env={
            **env, "BEARER_PROXY_PROXY_WORKERS": MORE_WORKERS,
            "BEARER_PROXY_LISTEN": f"127.0.0.1:{ports[MORE]}",
            "BEARER_PROXY_ADMIN_LISTEN": f"127.0.0.1:{ports['more-admin']}"}, stderr=log_file(MORE))
        names.append(MORE)
        admins.append("more-admin")
    if BASELINE:
        # The same settings on other ports: a before-and-after in one run.
        ports["baseline"], ports["baseline-admin"] = free_port(), free_port()
        base_env = {**base_env, "BEARER_PROXY_LISTEN": f"127.0.0.1:{ports['baseline']}",
                    "BEARER_PROXY_ADMIN_LISTEN": f"127.0.0.1:{ports['baseline-admin']}"}
        procs["baseline"] = subprocess.Popen(client(BASELINE), env=base_env, stderr=log_file("baseline"))
        names.append("baseline")
        admins.append("baseline-admin")
    try:
        for name in names:
            wait_port(ports[name])
    except RuntimeError:
        # Nothing is left running when one contender fails to start.
        for proc in procs.values():
            proc.terminate()
        token_server.shutdown()
        raise
    for admin in admins:
        for _ in range(100):
            out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{ports[admin]}/readyz"], capture_output=True, text=True).stdout
            if '"ready":true' in out:
                break
            time.sleep(0.1)
    return ports, procs, token_server


def with_children(pid):
    """`pid` and its children (nginx's workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def cpu_seconds(pids):
    """User+system CPU time of these processes and their children (nginx's workers)."""
    total = 0
    for pid in pids:
        for p in with_children(pid):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_times():
    """All CPU time of the machine, the hypervisor's share of it (steal),
    and the time no process wanted (idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0, fields[3] + fields[4]


def machine_shares(before, after):
    """Between two machine_times(): the hypervisor's share (steal) and the
    idle share of all the machine's CPU time."""
    total = max(after[0] - before[0], 1)
    return (after[1] - before[1]) / total, (after[2] - before[2]) / total


def wrk(port, conns, pids=()):
    """One wrk run. A run during which the hypervisor took more than
    STEAL_LIMIT of the machine's CPU is measured again (up to STEAL_RETRIES
    times, whoever the contender): on a shared VM that CPU went to another
    guest, and the figure would measure the neighbours, not the proxy."""
    for attempt in range(STEAL_RETRIES + 1):
        before = machine_times()
        figures = wrk_once(port, conns, pids)
        steal, idle = machine_shares(before, machine_times())
        if steal <= STEAL_LIMIT or attempt == STEAL_RETRIES:
            return (*figures, steal, attempt, idle)
        print(f"port {port}, {conns} connections: the hypervisor took {steal:.0%} of the CPU; measuring again", file=sys.stderr)


# The upstream's port, when wrk calls it directly over TLS.
DIRECT_TLS_PORT = None


def wrk_once(port, conns, pids):
    threads = min(2, conns)
    cpu_before = cpu_seconds(pids)
    scheme = "https" if port == DIRECT_TLS_PORT else "http"
    out = sh(*client("wrk", f"-t{threads}", f"-c{conns}", f"-d{DURATION}s", "--latency", f"{scheme}://127.0.0.1:{port}/")).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\b", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} non-2xx answers from port {port}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    # The proxy's own CPU per request: steadier than req/s on a shared machine.
    cpu_us = 1e6 * (cpu_seconds(pids) - cpu_before) / max(requests, 1) if pids else float("nan")
    return rps, pct(50), pct(99), cpu_us


def curl_speed(args):
    out = sh(*client("curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{speed_upload} %{http_code}", *args)).stdout.split()
    if out[2] != "200":
        raise RuntimeError(f"curl got {out[2]}")
    return max(float(out[0]), float(out[1])) / 1e6


def stream(port, pid):
    if pid:
        # Resets the peak (VmHWM) to the current RSS: the peak is this transfer's.
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    down = curl_speed([f"http://127.0.0.1:{port}/1g"])
    p = subprocess.Popen(client("head", "-c", str(GIB), "/dev/zero"), stdout=subprocess.PIPE)
    res = subprocess.run(client("curl", "-s", "-S", "-o", "/dev/null", "-w", "%{speed_upload} %{http_code} %{size_upload}", "-T", "-", "-H", "Expect:", f"http://127.0.0.1:{port}/upload"), stdin=p.stdout, capture_output=True, text=True)
    p.stdout.close()  # head ends (SIGPIPE) if curl stopped reading
    p.kill()
    p.wait()
    speed, code, sent = (res.stdout.split() + ["0", "000", "0"])[:3]
    if res.returncode != 0 or not code.startswith("2") or int(float(sent)) < GIB:
        # Counted, not fatal.
        print(f"upload to port {port} failed: curl exit {res.returncode}, HTTP {code}, {sent} bytes sent {res.stderr.strip()}", file=sys.stderr)
        up = None
    else:
        up = float(speed) / 1e6
    peak = rss_kib(pid, "VmHWM") if pid else 0
    return down, up, peak


def idle_connections(port, pid, count=1000):
    socks = []
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        socks.append(s)
    for s in socks:
        s.recv(4096)
    time.sleep(0.5)
    rss = rss_kib(pid)
    for s in socks:
        s.close()
    return rss


def main():
    install()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = Path(tempfile.mkdtemp(prefix="bearer-proxy-bench-"))
    ports, procs, token_server = start_all(work)
    if TLS:
        global DIRECT_TLS_PORT
        DIRECT_TLS_PORT = ports["upstream"]
    contenders = {"direct": ports["upstream"], "bearer-proxy": ports["bearer-proxy"], "nginx": ports["nginx"], "haproxy": ports["haproxy"]}
    if BASELINE:
        contenders["baseline"] = ports["baseline"]
    if MORE_WORKERS:
        contenders[MORE] = ports[MORE]
    bp_pid = procs["bearer-proxy"].pid
    ours = {name: procs[name].pid for name in ["bearer-proxy", "baseline"] if name in procs}
    pids = {name: [procs[name].pid] for name in ["bearer-proxy", "nginx", "haproxy", "baseline", MORE] if name in procs}
    results = {(c, n): [] for c in contenders for n in CONNECTIONS}
    streams = {c: [] for c in contenders if c not in ("direct", MORE)}
    try:
        idle = rss_kib(bp_pid)
        for name, port in contenders.items():
            wrk(port, 16)  # warm-up: pools and connections
        for round_no in range(1, ROUNDS + 1):
            for conns in CONNECTIONS:
                order = list(contenders.items())
                random.shuffle(order)
                for name, port in order:
                    results[(name, conns)].append(wrk(port, conns, pids.get(name, ())))
            order = [] if QUICK else [(c, contenders[c]) for c in streams]
            random.shuffle(order)
            for name, port in order:
                try:
                    streams[name].append(stream(port, ours.get(name)))
                except RuntimeError as e:
                    raise RuntimeError(f"{name}: {e}") from e
            print(f"round {round_no}/{ROUNDS} done", file=sys.stderr)
        connected = 0 if QUICK else idle_connections(ports["bearer-proxy"], bp_pid)
    finally:
        for p in procs.values():
            p.terminate()
        token_server.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    lines = []
    upstream_words = {"http": "plain HTTP/1.1", "https": "HTTPS, HTTP/1.1", "h2": "HTTPS offering HTTP/2"}[UPSTREAM]
    if PIN:
        upstream_words += f" alone on CPU {UPSTREAM_CPU} (PIN=1)"
    lines.append(f"Machine: {os.cpu_count()} cores, {platform.machine()}, {platform.release()}; {time.strftime('%Y-%m-%d')}; "
                 f"upstream {upstream_words}; {ROUNDS} rounds of {DURATION} s, medians; ratios are to nginx.")
    lines.append("")
    lines.append("| connections | contender | req/s | × nginx | p50 ms | p99 ms | p99 × nginx | CPU µs/request | CPU × nginx |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    table = {}
    steals, repeats = [], 0
    for conns in CONNECTIONS:
        ng = results[("nginx", conns)]
        ng_rps, ng_p99, ng_cpu = med([r[0] for r in ng]), med([r[2] for r in ng]), med([r[3] for r in ng])
        for name in contenders:
            rs = results[(name, conns)]
            rps, p50, p99, cpu = (med([r[i] for r in rs]) for i in range(4))
            steals.extend(r[4] for r in rs)
            repeats += sum(r[5] for r in rs)
            table[(name, conns)] = (rps, p99)
            cpu_cells = "- | -" if name == "direct" else f"{cpu:.1f} | {cpu / ng_cpu:.2f}"
            lines.append(f"| {conns} | {name} | {rps:,.0f} | {rps / ng_rps:.2f} | {p50:.2f} | {p99:.2f} | {p99 / ng_p99:.2f} | {cpu_cells} |")
    lines.append("")
    lines.append(f"Hypervisor steal during the wrk runs: median {med(steals):.1%}, most {max(steals):.1%} of the machine's CPU; "
                 f"{repeats} run(s) measured again because it exceeded {STEAL_LIMIT:.0%}.")
    # CPU that no process used during the runs: where a contender leaves
    # more, something other than CPU (scheduling, hand-offs) held it back.
    for conns in CONNECTIONS:
        idles = ", ".join(f"{name} {med([r[6] for r in results[(name, conns)]]):.1%}" for name in contenders)
        lines.append(f"Machine idle at {conns} connections (medians): {idles}.")
    if QUICK:
        print("\n".join(lines))
        return
    lines.append("")
    lines.append("| streaming 1 GiB | download MB/s | upload MB/s | × nginx (down / up) | peak RSS MiB |")
    lines.append("|---|---|---|---|---|")
    ng_down = med([s[0] for s in streams["nginx"]])
    ng_up = med([s[1] for s in streams["nginx"] if s[1] is not None] or [float("nan")])
    for name, runs in streams.items():
        ups = [s[1] for s in runs if s[1] is not None]
        down, up = med([s[0] for s in runs]), med(ups) if ups else float("nan")
        peak = f"{max(s[2] for s in runs) / 1024:.1f}" if name in ours else "-"
        failed = len(runs) - len(ups)
        note = f" ({failed} of {len(runs)} uploads failed)" if failed else ""
        lines.append(f"| {name} | {down:,.0f} | {up:,.0f}{note} | {down / ng_down:.2f} / {up / ng_up:.2f} | {peak} |")
    lines.append("")
    lines.append(f"bearer-proxy RSS: idle {idle / 1024:.1f} MiB; with 1,000 open keep-alive connections {connected / 1024:.1f} MiB.")
    report = "\n".join(lines)
    print(report)
    if BASELINE or TLS or PIN:
        return  # a comparison of two builds, TLS or pinned: README's figures stay as they are
    (ROOT / "benches/results.md").write_text(report + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in contenders:
        ax1.plot(CONNECTIONS, [table[(name, c)][0] for c in CONNECTIONS], marker="o", label=name)
        ax2.plot(CONNECTIONS, [table[(name, c)][1] for c in CONNECTIONS], marker="o", label=name)
    for ax, title, unit in [(ax1, "throughput", "requests/s"), (ax2, "p99 latency", "ms")]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONNECTIONS, [str(c) for c in CONNECTIONS])
        ax.set_xlabel("connections")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"bearer-proxy vs nginx and haproxy, loopback, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    fig.savefig(ROOT / "benches/throughput.png", dpi=110)


if __name__ == "__main__":
    main()
