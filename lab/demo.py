"""The built-in demo: `scripts/demo`, or `python -m lab.demo` from a checkout (as root).

Builds two network segments from namespaces and veth pairs, starts mcrd with
a demo rule file, sends a sequenced stream into one segment and shows it
arriving rewritten in the other, with mcrd's live statistics; then tears
everything down. Exits 0 when every datagram arrived intact and in order.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lab.launch import LaunchError, McrdProcess, mcrctl_json
from lab.net import Lab, Receiver, TrafficSender

RULES = """\
# mcrd demo: relay 239.1.1.1:5000 arriving on in0 (segment A) to segment B,
# rewritten to another group and port, and to a unicast host.
[[rule]]
name = "demo-camera"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [
  { interface = "out0", group = "239.2.2.2", port = 6000 },
  { interface = "out0", group = "198.51.100.2", port = 7000, ttl = 8 },
]
"""


def say(text: str) -> None:
    print(text, flush=True)


def show_second(sock: Path, *receivers: Receiver) -> None:
    """One line of what segment B received, one of what mcrd counted."""
    seen = []
    for rx in receivers:
        if rx.arrivals:
            a = rx.arrivals[-1]
            seen.append(f"{a.group}:{a.port} (from {a.source}, ttl {a.ttl}) x{len(rx.arrivals)}")
    say("  segment B received: " + ("; ".join(seen) or "nothing yet"))
    try:
        stats = mcrctl_json(sock, "stats")
    except LaunchError as exc:
        say(f"  mcrd stats unavailable: {exc}")
        return
    for rule in stats["rules"]:
        outs = ", ".join(f"{o['destination'].split(' ')[0]} {o['packets']}" for o in rule["outputs"])
        say(f"  mcrd {rule['name']}: in {rule['packets']} ({rule['pps']:.0f}/s) -> {outs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to stream (default 5)")
    parser.add_argument("--rate", type=float, default=200.0, help="datagrams per second (default 200)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    count = int(args.seconds * args.rate)
    with Lab("mcrdemo") as lab, tempfile.TemporaryDirectory(prefix="mcrd-demo-") as tmp:
        src, relay, dst = lab.netns("sender"), lab.netns("relay"), lab.netns("receiver")
        lab.link(src, "eth0", relay, "in0", "192.0.2.10/24", "192.0.2.1/24")
        lab.link(relay, "out0", dst, "eth0", "198.51.100.1/24", "198.51.100.2/24")
        say("segment A: sender 192.0.2.10 (eth0) <-> relay in0 192.0.2.1")
        say("segment B: relay out0 198.51.100.1 <-> receiver 198.51.100.2 (eth0)")
        config = Path(tmp) / "mcr.toml"
        config.write_text(RULES)
        sock = Path(tmp) / "control.sock"
        say(f"\nrule file {config}:\n{RULES}")
        mcrd = McrdProcess(relay, config, sock, runtime_rules=Path(tmp) / "runtime.toml")
        try:
            try:
                mcrd.start()
            except LaunchError as exc:
                raise SystemExit(f"demo: {exc}") from exc
            say(f"$ mcrctl --socket {sock} list")
            subprocess.run([sys.executable, "-m", "mcrd.ctl", "--socket", str(sock), "list"], check=False)
            group_rx = Receiver(dst, "239.2.2.2", 6000, "eth0")
            host_rx = Receiver(dst, "198.51.100.2", 7000)
            sender = TrafficSender(src, "eth0")
            say(f"\nsending {count} datagrams to 239.1.1.1:5000 in segment A at {args.rate:.0f}/s ...")
            thread = threading.Thread(
                target=sender.stream, args=("239.1.1.1", 5000, 1, count, args.rate, 120)
            )
            thread.start()
            deadline = time.monotonic() + args.seconds + 3
            while time.monotonic() < deadline:
                tick = time.monotonic() + 1.0
                while time.monotonic() < tick:
                    group_rx.poll(0.1)
                    host_rx.poll(0)
                show_second(sock, group_rx, host_rx)
                if not thread.is_alive() and len(group_rx.seqs(1)) >= count and len(host_rx.seqs(1)) >= count:
                    break
            thread.join()
            say(f"\n$ mcrctl --socket {sock} stats")
            subprocess.run([sys.executable, "-m", "mcrd.ctl", "--socket", str(sock), "stats"], check=False)
            ok = True
            for rx, what in ((group_rx, "239.2.2.2:6000"), (host_rx, "198.51.100.2:7000")):
                seqs = rx.seqs(1)
                intact = seqs == list(range(count))
                ok &= intact
                say(
                    f"{what}: {len(seqs)}/{count} datagrams, "
                    f"{'all intact and in order' if intact else 'LOSS OR DISORDER'}"
                )
        finally:
            mcrd.stop()
        say("demo: namespaces removed, mcrd stopped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
