"""Memory and load time of mcrd by number of rules and workers.

    python bench/memory.py [--rules 1 100 1000] [--workers 1 2]

For each count, starts mcrd in a namespace of its own with that many rules on
one input interface (each its own group and an output), waits until it is
ready, and reads the resident memory (PSS: shared pages divided among the
processes sharing them) of the supervisor and of each worker from
/proc/PID/smaps_rollup, and the time from start to ready. Then it rewrites
one rule and times `mcrctl reload`. The receive rings are kernel memory
mapped into the workers whole; they are printed apart from the rest of a
worker's memory. Needs root; removes what it created.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.launch import McrdProcess, descendants
from lab.net import Lab


def pss_kib(pid: int) -> tuple[int, int]:
    """(PSS of the process, PSS of its packet-socket ring mappings), KiB."""
    total = ring = 0
    in_ring = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            in_ring = len(fields) >= 6 and fields[5].startswith("socket:")
        elif fields[0] == "Pss:":
            total += int(fields[1])
            ring += int(fields[1]) if in_ring else 0
    return total, ring


def rules_text(count: int, workers: int, variant: int = 0) -> str:
    text = f"[daemon]\nworkers = {workers}\nmax_rules = {max(count, 1000)}\n"
    for n in range(count):
        port = 5000 + (variant if n == 0 else 0)
        low = f"{n // 250}.{n % 250 + 1}"
        text += (
            f'[[rule]]\ninput = {{ interface = "in0", group = "239.1.{low}", port = {port} }}\n'
            f'outputs = [ {{ interface = "out0", group = "239.2.{low}", port = 6000 }} ]\n'
        )
    return text


def measure(lab: Lab, relay: str, workdir: Path, count: int, workers: int) -> dict[str, float]:
    config = workdir / "mcr.toml"
    config.write_text(rules_text(count, workers))
    sock = workdir / "control.sock"
    began = time.monotonic()
    mcrd = McrdProcess(relay, config, sock, quiet=True, runtime_rules=workdir / "runtime.toml")
    try:
        proc = mcrd.spawn()
        mcrd.wait_ready()
        ready = time.monotonic() - began
        time.sleep(1.5)  # a stats sample or two: the steady state
        supervisor, _ = pss_kib(proc.pid)
        worker_pss = [pss_kib(p) for p in descendants(proc.pid)]
        config.write_text(rules_text(count, workers, variant=1))
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "mcrd.ctl", "--socket", str(sock), "reload"],
            check=True,
            capture_output=True,
        )
        reload = time.monotonic() - t0
    finally:
        mcrd.stop(20)
    return {
        "ready": ready,
        "reload": reload,
        "supervisor": supervisor / 1024,
        "worker": sum(t - r for t, r in worker_pss) / max(len(worker_pss), 1) / 1024,
        "ring": sum(r for _t, r in worker_pss) / max(len(worker_pss), 1) / 1024,
        "workers": len(worker_pss),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", type=int, nargs="+", default=[1, 100, 1000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("memory: needs root", file=sys.stderr)
        return 2
    rows = []
    with Lab("mcrm-") as lab, tempfile.TemporaryDirectory(prefix="mcrm-") as tmp:
        relay, other = lab.netns("relay"), lab.netns("peer")
        lab.link(other, "eth0", relay, "in0", "192.0.2.10/24", "192.0.2.1/24")
        peer2 = lab.netns("peer2")
        lab.link(relay, "out0", peer2, "eth0", "198.51.100.1/24", "198.51.100.2/24")
        for workers in args.workers:
            for count in args.rules:
                m = measure(lab, relay, Path(tmp), count, workers)
                rows.append((count, workers, m))
                print(f"  {count} rules, {workers} worker(s): {m}", file=sys.stderr, flush=True)
    print("PSS in MiB (proportional set size), times in seconds\n")
    header = ("rules", 6), ("workers", 8), ("supervisor", 12), ("per worker", 12), ("its ring", 10)
    print("".join(f"{name:>{width}}" for name, width in header) + f"{'start':>8}{'reload':>8}")
    for count, workers, m in rows:
        print(
            f"{count:>6}{workers:>8}{m['supervisor']:>12.1f}{m['worker']:>12.1f}{m['ring']:>10.1f}"
            f"{m['ready']:>8.2f}{m['reload']:>8.2f}"
        )
    base = {w: m for c, w, m in rows if c == min(args.rules)}
    for count, workers, m in rows:
        if count == max(args.rules) and count > min(args.rules):
            b = base[workers]
            per_rule = (m["supervisor"] - b["supervisor"] + workers * (m["worker"] - b["worker"])) * 1024
            print(
                f"\n{workers} worker(s): {per_rule / (count - min(args.rules)):.1f} KiB per rule "
                f"(supervisor and workers together, {min(args.rules)} -> {count} rules)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
