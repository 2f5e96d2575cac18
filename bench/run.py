"""mcrd's benchmark: mcrd against socat and the kernel's multicast forwarding.

    python bench/run.py [--rounds 3] [--seconds 2] [--quick]

Builds a topology of namespaces (generator -> relay -> four sinks, each on its
own veth), compiles the C generator, then for each case (payload size x
number of outputs) runs the relays in turn, interleaved and repeated
(A B C A B C ...), and finds for each the highest offered rate delivered with
at most 0.1% loss to every sink (a doubling ladder, then bisection). Delivery
is counted from the sinks' interface counters, so sinks cost nothing. Also
measured at the end of each ladder: the relay's CPU time per datagram.
Prints a table of medians (min-max) and ratios measured in this run.
Needs root; removes everything it created.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import latency  # bench/latency.py, beside this file

from lab.launch import McrdProcess
from lab.net import Lab

HERE = Path(__file__).resolve().parent
LOSS = 0.001
GEN_CPU, RELAY_CPU = "0", "1"
BUSY_POLL_US = 2000  # mcrd-bp's busy_poll: longer than the gaps at 1,000/s
SINKS = 4


@dataclass
class Net:
    lab: Lab
    gen: str
    relay: str
    sinks: list[str]


SINK_DROP = """
table netdev sink {
    chain in { type filter hook ingress device "eth0" priority 0; policy drop; }
}
"""


RPS_BACKLOG = 10_000  # net.core.netdev_max_backlog for --rps runs


def build_net(lab: Lab, rps: bool = False) -> Net:
    gen, relay = lab.netns("gen"), lab.netns("relay")
    lab.link(gen, "eth0", relay, "in0", "192.0.2.10/24", "192.0.2.1/24")
    # The generator sends runs with UDP GSO: cut into datagrams as they leave it.
    in_ns(gen, "ethtool", "-K", "eth0", "tx-udp-segmentation", "off")
    # A veth frame is received on the sender's core, as a NIC's frames are on
    # the core that takes its interrupts: the relay's core is left to the
    # relay. With --rps, receive work moves to the relay's core instead.
    if rps:
        mask = f"{1 << int(RELAY_CPU):x}"
        in_ns(relay, "sh", "-c", f"echo {mask} > /sys/class/net/in0/queues/rx-0/rps_cpus")
    sinks = []
    for k in range(SINKS):
        sink = lab.netns(f"sink{k}")
        lab.link(relay, f"out{k}", sink, "eth0", f"198.51.100.{64 * k + 1}/26", f"198.51.100.{64 * k + 2}/26")
        # Sinks count at the interface and drop at ingress: they cost almost nothing.
        in_ns(sink, "nft", "-f", "-", stdin=SINK_DROP)
        # A veth passes UDP GSO super-packets through whole, and its receive
        # counter would count one; a NIC without UDP segmentation offload
        # makes the kernel segment in software, as here.
        in_ns(relay, "ethtool", "-K", f"out{k}", "tx-udp-segmentation", "off")
        sinks.append(sink)
    return Net(lab, gen, relay, sinks)


def export(commit: str, build: Path) -> Path:
    """The mcrd package as of `commit`, in a directory of its own."""
    tree = build / f"baseline-{commit}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", commit, "mcrd"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, text=True, check=True)


def rx_packets(ns: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/rx_packets"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            continue
    return total / tick


class Relay:
    name = "?"

    def start(self, net: Net, outputs: int) -> None: ...

    def pids(self) -> list[int]:
        return []

    def stop(self) -> None: ...


class Mcrd(Relay):
    name = "mcrd"

    def __init__(
        self,
        workdir: Path,
        rules: int = 1,
        offload: bool = False,
        faithful: bool = False,
        busy_poll: int = 0,
        baseline: tuple[str, Path] | None = None,
    ) -> None:
        self.mcrd: McrdProcess | None = None
        self.dir = workdir
        self.rules = rules
        self.offload = offload
        self.faithful = faithful
        self.busy_poll = busy_poll
        self.baseline = baseline
        if rules > 1:
            self.name = f"mcrd-{rules}"
        if offload:
            self.name = "mcrd-k"  # relayed by the kernel (offload = "auto")
        if faithful:
            self.name = "mcrd-f"  # faithful outputs: headers per datagram, raw sockets
        if busy_poll:
            self.name = "mcrd-bp"  # workers keep polling their ring (busy_poll)
        if baseline:
            self.name = f"mcrd@{baseline[0]}"  # mcrd as of another commit

    def start(self, net: Net, outputs: int) -> None:
        keep = ', source_port = "keep"' if self.faithful else ""
        outs = ", ".join(
            f'{{ interface = "out{k}", group = "239.2.2.2", port = 6000{keep} }}' for k in range(outputs)
        )
        config = self.dir / "mcr.toml"
        text = "[daemon]\n"
        text += 'offload = "auto"\n' if self.offload else ""
        text += f"busy_poll = {self.busy_poll}\n" if self.busy_poll else ""
        text += (
            f'[[rule]]\ninput = {{ interface = "in0", group = "239.1.1.1", port = 5000 }}\n'
            f"outputs = [ {outs} ]\n"
        )
        # Decoys: other groups on the same input, below and above the measured
        # one, each with an output: the worker's table and the kernel filter
        # hold them all, and none of their traffic arrives.
        for n in range(self.rules - 1):
            group = f"239.{0 if n % 2 else 9}.{n // 250}.{n % 250 + 1}"
            out = f"239.200.{n // 250}.{n % 250 + 1}"
            text += (
                f'[[rule]]\ninput = {{ interface = "in0", group = "{group}", port = {5001 + n % 7} }}\n'
                f'outputs = [ {{ interface = "out0", group = "{out}", port = 6000 }} ]\n'
            )
        config.write_text(text)
        sock = self.dir / "control.sock"
        runtime = self.dir / "runtime.toml"
        # an older mcrd: its package first on the path, for the workers too
        env = {"PYTHONPATH": str(self.baseline[1])} if self.baseline else None
        self.mcrd = McrdProcess(
            net.relay, config, sock, quiet=True, runtime_rules=runtime, cpu=RELAY_CPU, env=env
        )
        self.mcrd.start()

    def pids(self) -> list[int]:
        return self.mcrd.pids() if self.mcrd is not None else []

    def stop(self) -> None:
        if self.mcrd is not None:
            self.mcrd.stop(10)
            self.mcrd = None


class Socat(Relay):
    """As MCR's own comparison runs it: one socat per output."""

    name = "socat"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, net: Net, outputs: int) -> None:
        for k in range(outputs):
            self.procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        net.relay,
                        "taskset",
                        "-c",
                        RELAY_CPU,
                        "socat",
                        "-u",
                        "UDP4-RECV:5000,ip-add-membership=239.1.1.1:in0,reuseaddr,rcvbuf=8388608",
                        f"UDP4-SENDTO:239.2.2.2:6000,ip-multicast-if=198.51.100.{64 * k + 1},sndbuf=8388608",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.3)  # socat has no readiness signal; its sockets open within milliseconds

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(10)
        self.procs.clear()


class Kernel(Relay):
    """The kernel's multicast routing: forwards without rewriting."""

    name = "kernel"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def start(self, net: Net, outputs: int) -> None:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                net.relay,
                sys.executable,
                str(HERE / "mrt.py"),
                "192.0.2.10",
                "239.1.1.1",
                "in0",
                *[f"out{k}" for k in range(outputs)],
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("mrt.py failed")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None


@dataclass
class Trial:
    offered: float
    sent: int
    delivered: int  # by the worst sink

    @property
    def loss(self) -> float:
        return 1 - self.delivered / self.sent if self.sent else 1.0


def trial(net: Net, gen: Path, outputs: int, size: int, pps: float, seconds: float) -> Trial:
    before = [rx_packets(s) for s in net.sinks[:outputs]]
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            net.gen,
            "taskset",
            "-c",
            GEN_CPU,
            str(gen),
            "239.1.1.1",
            "5000",
            str(size),
            str(pps),
            str(seconds),
            "eth0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    sent, achieved = out.stdout.split()
    time.sleep(0.3)  # let queues drain before reading the counters
    after = [rx_packets(s) for s in net.sinks[:outputs]]
    delivered = min(a - b for a, b in zip(after, before, strict=True))
    return Trial(float(achieved), int(sent), delivered)


def confirmed(run_trial: Callable[[float], Trial]) -> Callable[[float], Trial]:
    """A trial that lost more than allowed is run once more, and the better
    of the two counts: on a shared machine one stall of the relay's core
    loses a burst, and a single trial would end the ladder on noise."""

    def run(rate: float) -> Trial:
        t = run_trial(rate)
        if t.loss > LOSS and t.offered >= rate * 0.97:
            again = run_trial(rate)
            if again.loss < t.loss:
                return again
        return t

    return run


def max_rate(
    run_trial: Callable[[float], Trial], start: float, ceiling: float, steps: int
) -> tuple[float, bool]:
    """Highest offered rate with loss <= 0.1%; True when the generator, not the relay, was the limit."""
    good, bad = 0.0, None
    rate = start
    run_trial = confirmed(run_trial)
    while rate <= ceiling:
        t = run_trial(rate)
        if t.offered < rate * 0.97:  # the generator could not offer this much
            return max(good, t.offered if t.loss <= LOSS else good), True
        if t.loss <= LOSS:
            good = t.offered
            rate *= 2
        else:
            bad = rate
            break
    if bad is None:
        return good, True
    for _ in range(steps):
        mid = (good + bad) / 2
        t = run_trial(mid)
        if t.loss <= LOSS:
            good = max(good, t.offered)
        else:
            bad = mid
    return good, False


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)
    limited: bool = False
    cpu_us: list[float] = field(default_factory=list)
    overload: list[tuple[float, float]] = field(default_factory=list)  # (offered, delivered) per second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each trial")
    p.add_argument("--quick", action="store_true", help="one small case, one round: a smoke run")
    p.add_argument(
        "--rps", action="store_true", help="receive on the relay's core (RPS) instead of the generator's"
    )
    p.add_argument("--case", action="append", metavar="SIZExOUTPUTS", help="only this case (repeatable)")
    p.add_argument(
        "--faithful",
        action="store_true",
        help='also mcrd with faithful outputs (source_port = "keep": headers built per datagram)',
    )
    p.add_argument(
        "--rules", type=int, default=1000, help="rules of the many-rule mcrd (64 B x1 only; 1: skip it)"
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="measure one-way latency added per datagram at 1,000 and 10,000/s instead (bench/latency.py)",
    )
    p.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also run mcrd as of this commit (say, the previous release), interleaved with the others",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 2
    for tool in ("cc", "socat", "taskset", "nft", "ethtool"):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} is missing (apt-get install gcc socat util-linux nftables ethtool)",
                file=sys.stderr,
            )
            return 2
    build = Path(tempfile.mkdtemp(prefix="mcrb-"))
    backlog = Path("/proc/sys/net/core/netdev_max_backlog")
    before = backlog.read_text().strip()
    try:
        if args.rps:
            # With RPS the generator's runs of 64 datagrams queue on the relay
            # core's backlog, whose default of 1,000 frames is less than one
            # NIC ring: with that, every relay loses datagrams to a stall of a
            # few milliseconds of this shared machine long before its
            # capacity. The kernel's setting is global; it is put back.
            backlog.write_text(f"{max(int(before), RPS_BACKLOG)}\n")
        return measure_latency(args, build) if args.latency else measure(args, build)
    finally:
        backlog.write_text(f"{before}\n")
        shutil.rmtree(build, ignore_errors=True)


def measure(args: argparse.Namespace, build: Path) -> int:
    """Build the generator in `build`, run every case, print the report."""
    gen = build / "gen"
    subprocess.run(["cc", "-O2", "-o", str(gen), str(HERE / "gen.c")], check=True)
    cases = [(64, 1)] if args.quick else [(64, 1), (1024, 1), (64, 4), (1024, 4)]
    if args.case:
        cases = [(int(size), int(outputs)) for size, outputs in (c.split("x") for c in args.case)]
    rounds = 1 if args.quick else args.rounds
    seconds = 0.5 if args.quick else args.seconds
    steps = 1 if args.quick else 4
    relays: list[Relay] = [Mcrd(build), Mcrd(build, offload=True), Socat(), Kernel()]
    if args.faithful:
        relays.append(Mcrd(build, faithful=True))
    if args.baseline:
        relays.append(Mcrd(build, baseline=(args.baseline, export(args.baseline, build))))
    many = Mcrd(build, rules=args.rules)
    results: dict[tuple[int, int, str], Result] = {}
    with Lab("mcrb-") as lab:
        net = build_net(lab, args.rps)
        for size, outputs in cases:
            for rnd in range(rounds):
                # the many-rule mcrd runs in the first case only: per-datagram cost is highest there
                for relay in [*relays, many] if (size, outputs) == cases[0] and args.rules > 1 else relays:
                    relay.start(net, outputs)
                    try:
                        rate, limited = max_rate(
                            functools.partial(trial, net, gen, outputs, size, seconds=seconds),
                            20_000.0,
                            4_000_000.0,
                            steps,
                        )
                        res = results.setdefault((size, outputs, relay.name), Result())
                        res.rates.append(rate)
                        res.limited |= limited
                        pids = relay.pids()
                        if pids and rate:
                            c0 = cpu_seconds(pids)
                            t = trial(net, gen, outputs, size, rate * 0.8, seconds)
                            res.cpu_us.append((cpu_seconds(pids) - c0) / max(t.sent, 1) * 1e6)
                        if rate:  # overload: offer four times what it takes
                            t = trial(net, gen, outputs, size, rate * 4, seconds)
                            res.overload.append((t.offered, t.delivered * t.offered / max(t.sent, 1)))
                    finally:
                        relay.stop()
                    print(
                        f"  {size:>5} B x{outputs} round {rnd + 1} {relay.name:>6}: {rate:>10,.0f} pps",
                        file=sys.stderr,
                        flush=True,
                    )
    print(report(results, cases, rounds))
    return 0


def measure_latency(args: argparse.Namespace, build: Path) -> int:
    """Each relay with one output, interleaved, at each rate: the latency it adds."""
    rates = [1000.0] if args.quick else [1000.0, 10000.0, 100000.0]
    rounds = 1 if args.quick else args.rounds
    relays: list[Relay] = [
        Mcrd(build),
        Mcrd(build, busy_poll=BUSY_POLL_US),
        Mcrd(build, offload=True),
        Socat(),
        Kernel(),
    ]
    found: dict[tuple[str, float], list[latency.Latency]] = {}
    with Lab("mcrb-") as lab:
        net = build_net(lab, args.rps)
        for _round in range(rounds):
            for rate in rates:
                for relay in relays:
                    relay.start(net, 1)
                    try:
                        got = latency.measure(net.gen, net.relay, net.sinks[0], rate, args.seconds, GEN_CPU)
                    finally:
                        relay.stop()
                    found.setdefault((relay.name, rate), []).append(got)
                    print(
                        f"  {rate:>7,.0f}/s {relay.name:>6}: "
                        f"p50 {got.p50_us:,.0f} us, p99 {got.p99_us:,.0f} us",
                        file=sys.stderr,
                        flush=True,
                    )
    print(latency_report(found, rates, relays, rounds))
    return 0


def latency_report(
    found: dict[tuple[str, float], list[latency.Latency]],
    rates: list[float],
    relays: list[Relay],
    rounds: int,
) -> str:
    lines = [
        "one-way latency added per datagram (relay input to sink), microseconds: "
        f"median of {rounds} round(s)",
        "gap spread: standard deviation of the gaps between consecutive datagrams, in -> out",
        "",
        f"{'rate/s':>8} {'relay':>7} {'p50':>8} {'p99':>8} {'max':>8} {'through':>14} {'gap spread':>18}",
    ]
    for rate in rates:
        for relay in relays:
            runs = found.get((relay.name, rate), [])
            if not runs:
                continue

            def med(values: list[float]) -> float:
                return statistics.median(values)

            lines.append(
                f"{rate:>8,.0f} {relay.name:>7} {med([r.p50_us for r in runs]):>8,.0f}"
                f" {med([r.p99_us for r in runs]):>8,.0f} {med([r.max_us for r in runs]):>8,.0f}"
                f" {min(r.through for r in runs):>6,} of {runs[0].sent:<6,}"
                f" {med([r.gap_in_us for r in runs]):>7,.1f} -> {med([r.gap_out_us for r in runs]):>7,.1f}"
            )
        kernel = found.get(("mcrd-k", rate))
        for name in ("mcrd", "mcrd-bp"):
            user = found.get((name, rate))
            if user and kernel:
                u99, k99 = (
                    statistics.median(r.p99_us for r in user),
                    statistics.median(r.p99_us for r in kernel),
                )
                u50, k50 = (
                    statistics.median(r.p50_us for r in user),
                    statistics.median(r.p50_us for r in kernel),
                )
                lines.append(f"{'':>8} {name}/mcrd-k: p99 {u99 / k99:.1f}x, p50 {u50 - k50:+,.0f} us")
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def report(results: dict[tuple[int, int, str], Result], cases: list[tuple[int, int]], rounds: int) -> str:
    columns = ("mcrd", "mcrd-k", "socat", "kernel")
    lines = [
        f"max rate with <= {LOSS:.1%} loss to every sink, datagrams/s: median (min-max) of {rounds} round(s)",
        'mcrd: user-space data path; mcrd-k: mcrd with offload = "auto" (relayed by eBPF in the kernel)',
        "",
        f"{'case':<11}" + "".join(f"{n:>29}" for n in columns) + f"{'m/socat':>8}{'m/kern':>7}{'mk/socat':>9}"
        f"{'mk/kern':>8}{'m us/pkt':>9}",
    ]
    for size, outputs in cases:
        row = f"{size} B x{outputs}".ljust(11)
        med = {}
        for name in columns:
            res = results.get((size, outputs, name))
            if res is None or not res.rates:
                row += f"{'-':>29}"
                continue
            med[name] = statistics.median(res.rates)
            row += f"{_fmt(res.rates) + (' *' if res.limited else ''):>29}"

        def ratio(a: str, b: str, med: dict[str, float] = med) -> float:
            return med[a] / med[b] if med.get(a) and med.get(b) else float("nan")

        cpu = results.get((size, outputs, "mcrd"))
        row += f"{ratio('mcrd', 'socat'):>8.2f}{ratio('mcrd', 'kernel'):>7.2f}"
        row += f"{ratio('mcrd-k', 'socat'):>9.2f}{ratio('mcrd-k', 'kernel'):>8.2f}"
        row += f"{statistics.median(cpu.cpu_us):>9.2f}" if cpu and cpu.cpu_us else f"{'-':>9}"
        lines.append(row)
    lines.append("")
    lines.append("* the generator, not the relay, was the limit in at least one round")
    lines.append("")
    lines.append("under overload (4x the max rate offered), delivered datagrams/s to the worst sink: median")
    lines.append("")
    names = sorted({name for (_s, _o, name) in results}, key=lambda n: (n != "mcrd", n))
    lines.append(f"{'case':<12}" + "".join(f"{n:>28}" for n in names))
    for size, outputs in cases:
        row = f"{size} B x{outputs}".ljust(12)
        for name in names:
            res = results.get((size, outputs, name))
            if res is None or not res.overload:
                row += f"{'-':>28}"
                continue
            offered = statistics.median(o for o, _d in res.overload)
            delivered = statistics.median(d for _o, d in res.overload)
            row += f"{f'{delivered:,.0f} of {offered:,.0f}':>28}"
        lines.append(row)
    for size, outputs in cases:
        a, f = results.get((size, outputs, "mcrd")), results.get((size, outputs, "mcrd-f"))
        if a and f and a.rates and f.rates:
            lines.append(
                f"mcrd-f ({size} B x{outputs}): {statistics.median(f.rates):,.0f}/s, "
                f"{statistics.median(f.rates) / statistics.median(a.rates):.2f} of mcrd; "
                f"CPU {statistics.median(f.cpu_us) if f.cpu_us else float('nan'):.2f} us/datagram"
            )
    for size, outputs in cases:
        a = results.get((size, outputs, "mcrd"))
        for name in (n for n in names if n.startswith("mcrd@")):
            b = results.get((size, outputs, name))
            if a and b and a.rates and b.rates:
                lines.append(
                    f"{name} ({size} B x{outputs}): {statistics.median(b.rates):,.0f}/s; "
                    f"mcrd is {statistics.median(a.rates) / statistics.median(b.rates):.2f} of it; "
                    f"CPU {statistics.median(b.cpu_us) if b.cpu_us else float('nan'):.2f} us/datagram"
                )
    many = [name for name in names if name.startswith("mcrd-") and name not in ("mcrd-k", "mcrd-f")]
    for name in many:
        a, b = results.get((*cases[0], "mcrd")), results.get((*cases[0], name))
        if a and b and a.rates and b.rates:
            lines.append("")
            lines.append(
                f"{name} ({cases[0][0]} B x{cases[0][1]}): {statistics.median(b.rates):,.0f}/s, "
                f"{statistics.median(b.rates) / statistics.median(a.rates):.2f} of mcrd with one rule; "
                f"CPU {statistics.median(b.cpu_us) if b.cpu_us else float('nan'):.2f} us/datagram"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
