#!/usr/bin/env python3
"""How often each contender's threads, and the upstream's, sleep and are
preempted per request: the scheduling that the bench's "Machine idle" line
hints at.

    python3 benches/switches.py            # plain HTTP, 64 connections
    UPSTREAM=https CONNECTIONS=16 python3 benches/switches.py

Starts the same contenders as bench.py, runs wrk against each in turn for
DURATION seconds, and prints, for every thread that switched more than a
hundred times, its voluntary switches (it went to sleep: epoll_wait, a
lock) and involuntary ones (it was preempted) per request, read from
/proc/<pid>/task/<tid>/status; then the share of the machine's CPU left
idle during the run.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))


def switches(pids):
    """(pid, tid, thread name) -> (voluntary, involuntary) switches so far."""
    counts = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            name = re.search(r"^Name:\s+(\S+)", status, re.M).group(1)
            voluntary = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
            involuntary = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
            counts[(pid, task.name, name)] = (voluntary, involuntary)
    return counts


def main():
    bench.install()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=bench.ROOT, check=True)
    bench.MORE_WORKERS = ""
    work = Path(tempfile.mkdtemp(prefix="bearer-proxy-switches-"))
    ports, procs, token_server = bench.start_all(work)
    try:
        upstream = bench.with_children(procs["upstream"].pid)
        for name in ("bearer-proxy", "nginx", "haproxy"):
            url = f"http://127.0.0.1:{ports[name]}/"
            bench.sh(*bench.client("wrk", "-t2", f"-c{CONNECTIONS}", "-d1s", url))  # warm-up
            ours = bench.with_children(procs[name].pid)
            before, machine_before = switches(ours + upstream), bench.machine_times()
            out = bench.sh(*bench.client("wrk", "-t2", f"-c{CONNECTIONS}", f"-d{bench.DURATION}s", url)).stdout
            after, machine_after = switches(ours + upstream), bench.machine_times()
            requests = int(re.search(r"(\d+) requests in", out).group(1))
            _, idle = bench.machine_shares(machine_before, machine_after)
            print(f"{name}: {requests / bench.DURATION:,.0f} requests/s, machine idle {idle:.1%}")
            for key, (voluntary, involuntary) in sorted(after.items()):
                if key not in before:
                    continue
                slept = voluntary - before[key][0]
                preempted = involuntary - before[key][1]
                if slept + preempted > 100:
                    whose = "upstream" if key[0] in upstream else name
                    print(f"  {whose:13} {key[2]:22} slept {slept / requests:.3f}/request, "
                          f"preempted {preempted / requests:.3f}/request")
    finally:
        for proc in procs.values():
            proc.terminate()
        token_server.shutdown()


if __name__ == "__main__":
    main()
