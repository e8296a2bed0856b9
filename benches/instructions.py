#!/usr/bin/env python3
"""Instructions per proxied request, in user space, counted by callgrind.

    python3 benches/instructions.py                   # the release build
    python3 benches/instructions.py old/bearer-proxy new/bearer-proxy

Runs each build under valgrind's callgrind with one worker, in front of the
benchmark's upstream (see bench.py), warms it up with wrk, zeroes the
counters, proxies GETs for a few seconds with wrk -c8, and divides the
instructions executed by the requests served. Unlike requests per second,
the count does not depend on what else the machine is doing, so a change of
a few percent shows. It says nothing of the kernel's share (the same for
every proxy here: see README) nor of cache misses.

For where the instructions go, keep the profile (KEEP=1) and read it with
`callgrind_annotate --inclusive=yes <file>` (build with debug line tables:
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_PROFILE_RELEASE_STRIP=none).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

SECONDS = int(os.environ.get("DURATION", "8"))


def count(binary, work):
    out_dir = Path(tempfile.mkdtemp(prefix="callgrind-"))
    wrapper = work / "under-callgrind.sh"
    wrapper.write_text(
        "#!/bin/sh\nexec valgrind --tool=callgrind "
        f"--callgrind-out-file={out_dir}/callgrind.out.%p {binary}\n"
    )
    wrapper.chmod(0o755)
    bench.BINARY = str(wrapper)
    bench.MORE_WORKERS = ""  # one build, measured alone
    os.environ["BP_WORKERS"] = "1"
    ports, procs, token_server = bench.start_all(work)
    pid = procs["bearer-proxy"].pid
    url = f"http://127.0.0.1:{ports['bearer-proxy']}/"
    try:
        subprocess.run(bench.client("wrk", "-t1", "-c8", "-d3s", url), capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)
        out = subprocess.run(bench.client("wrk", "-t1", "-c8", f"-d{SECONDS}s", url),
                             capture_output=True, text=True, check=True).stdout
        subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        time.sleep(1)
        # The dump made after zeroing: its totals are this run's alone.
        dumps = [f for f in glob.glob(f"{out_dir}/callgrind.out.{pid}.*")]
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        dump = max(dumps, key=os.path.getmtime)
        total = next(int(line.split()[1]) for line in open(dump, errors="replace")
                     if line.startswith(("summary:", "totals:")))
        return requests, total / max(requests, 1), dump
    finally:
        for proc in procs.values():
            proc.terminate()
        token_server.shutdown()
        if not os.environ.get("KEEP"):
            shutil.rmtree(out_dir, ignore_errors=True)


def main():
    bench.install()
    if not shutil.which("valgrind"):
        subprocess.run(["apt-get", "install", "-y", "-q", "valgrind"], check=True)
    binaries = sys.argv[1:] or [str(bench.ROOT / "target/release/bearer-proxy")]
    if not sys.argv[1:]:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=bench.ROOT, check=True)
    results = []
    for binary in binaries:
        work = Path(tempfile.mkdtemp(prefix="bearer-proxy-instructions-"))
        requests, per_request, dump = count(binary, work)
        results.append((binary, requests, per_request))
        kept = f" (profile: {dump})" if os.environ.get("KEEP") else ""
        print(f"{binary}: {per_request:,.0f} instructions per request over {requests:,} requests{kept}",
              flush=True)
    if len(results) > 1:
        first = results[0][2]
        for binary, _, per_request in results[1:]:
            print(f"{binary}: {per_request / first:.3f}x the first")


if __name__ == "__main__":
    main()
