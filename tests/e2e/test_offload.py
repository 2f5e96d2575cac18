"""End to end: kernel offload's life cycle with a real mcrd, tc and packets.

What the kernel holds follows the rules and the interfaces: attached at
start (over a crash's leftover), replaced atomically on reload with the
counters carried, moved back to user space and again to the kernel as
interfaces and next hops come and go, removed at exit with the qdisc mcrd
created; filters and qdiscs mcrd did not create are never touched. (The
relay suite itself runs offloaded too, in test_relay_e2e.py; the program's
rewriting is checked packet by packet in test_ebpf.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lab.net import Receiver, TrafficSender, collecting
from tests.helpers.daemon import Daemon, Net, mcrctl, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]

AUTO = '[daemon]\noffload = "auto"\n'

TWO = """
[[rule]]
name = "a"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]

[[rule]]
name = "b"
input = { interface = "in0", group = "239.1.1.2", port = 5000 }
outputs = [ { interface = "out1", group = "239.3.3.3", port = %d } ]
"""


def tc_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["tc", "-n", ns, "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def filters(ns: str, dev: str) -> dict[str, tuple[int, int]]:
    """The ingress bpf filters of `dev`: name -> (priority, program id)."""
    return {
        f["options"]["bpf_name"]: (f["pref"], f["options"]["prog"]["id"])
        for f in tc_json(ns, "filter", "show", "dev", dev, "ingress")
        if "options" in f
    }


def has_clsact(ns: str, dev: str) -> bool:
    return any(q["kind"] == "clsact" for q in tc_json(ns, "qdisc", "show", "dev", dev))


def ours(ns: str) -> list[str]:
    """mcrd's filters on any interface of `ns`."""
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True, check=True)
    devs = [link["ifname"] for link in json.loads(out.stdout)]
    return [name for dev in devs for name in filters(ns, dev) if name.startswith("mcrd:")]


def attach(ns: str, dev: str, name: str, prio: int) -> None:
    """Attach a program that lets everything through, as another tool (or a
    crashed mcrd) would, from a process that is gone when this returns."""
    code = f"""
from pyroute2 import IPRoute
from mcrd.offload import asm, bpf
a = asm.EbpfAsm(); a.mov(0, -1); a.exit()
fd = bpf.load_program(a.assemble(), "other")
with IPRoute() as ipr:
    index = ipr.link_lookup(ifname="{dev}")[0]
    if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index)):
        ipr.tc("add", "clsact", index)
    ipr.tc("add-filter", "bpf", index, handle=1, fd=fd, name="{name}", parent=0xFFFFFFF2,
           classid=1, direct_action=True, prio={prio}, protocol=0x0800)
"""
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True)


def paths(daemon: Daemon) -> dict[str, tuple[str, str]]:
    return {r["name"]: (r["path"], r["path_reason"]) for r in mcrctl_json(daemon.socket, "list")["rules"]}


def test_installed_over_a_leftover_removed_at_exit_others_untouched(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    attach(net.relay, "in0", "mcrd:in0", 1)  # what a crashed mcrd leaves
    attach(net.relay, "in0", "theirs", 2)
    attach(net.relay, "out1", "also-theirs", 1)
    leftover = filters(net.relay, "in0")["mcrd:in0"]
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    assert paths(daemon) == {"a": ("kernel", ""), "b": ("kernel", "")}
    found = filters(net.relay, "in0")
    assert set(found) == {"mcrd:in0", "theirs"} and found["mcrd:in0"][0] == 1
    assert found["mcrd:in0"] != leftover  # the leftover was replaced by mcrd's own
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=1, count=100)
    assert rx.wait_for(lambda a: len(rx.seqs(1)) == 100) and rx.seqs(1) == list(range(100))
    wait_until(lambda: daemon.rule_stats("a")["outputs"][0]["packets"] == 100, what="the kernel's counters")
    assert daemon.rule_stats("a")["packets"] == 100 and daemon.rule_stats("a")["bytes"] > 0
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    assert set(filters(net.relay, "in0")) == {"theirs"} and has_clsact(net.relay, "in0")
    assert set(filters(net.relay, "out1")) == {"also-theirs"}


def test_after_a_crash_the_leftover_is_inert_and_the_next_mcrd_clears_it(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    crashed = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    before = filters(net.relay, "in0")["mcrd:in0"]
    assert crashed.proc is not None
    crashed.proc.kill()  # SIGKILL: nothing is cleaned up
    crashed.proc.wait(10)
    assert filters(net.relay, "in0")["mcrd:in0"] == before, "the crash should have left the filter"
    # Its rules' programs went with the process (a program array empties when
    # its last holder goes): the leftover passes everything on to the stack.
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=8, count=20)
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    assert filters(net.relay, "in0")["mcrd:in0"] != before
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=9, count=50)
    assert rx.wait_for(lambda a: len(rx.seqs(9)) == 50) and rx.seqs(9) == list(range(50))
    assert rx.seqs(8) == [], "nothing should have relayed between the crash and the restart"
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    assert ours(net.relay) == [] and not has_clsact(net.relay, "in0")


def test_a_reload_replaces_the_program_without_a_gap_and_counters_carry_over(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    assert not has_clsact(net.relay, "in0")
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001, "--no-watch")
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    programs = [filters(net.relay, "in0")["mcrd:in0"][1]]
    with collecting(rx):
        with tx.streaming("239.1.1.1", 5000, stream=2, rate=2000) as sent:
            for n in range(10):  # rule b changes ten times while a streams
                daemon.config.write_text(AUTO + TWO % (6002 + n))
                result = json.loads(mcrctl(daemon.socket, "--json", "reload").stdout)
                assert result["result"] == "applied" and result["changed"] == ["b"], result
                programs.append(filters(net.relay, "in0")["mcrd:in0"][1])
        total = sent[0]
        wait_until(lambda: len(rx.seqs(2)) >= total, what="the whole stream")
    assert len(set(programs)) == 1, "in0's dispatcher should stay; only rule b's program changes"
    assert rx.seqs(2) == list(range(total)), "rule a lost, duplicated or reordered datagrams"
    wait_until(lambda: daemon.rule_stats("a")["packets"] == total, what="kernel counters across reloads")
    assert daemon.rule_stats("a")["outputs"][0]["packets"] == total
    rx2 = Receiver(net.dst2, "239.3.3.3", 6011, "eth0")  # b as the last reload left it
    tx.stream("239.1.1.2", 5000, stream=7, count=20)
    assert rx2.wait_for(lambda a: len(rx2.seqs(7)) == 20)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    assert not has_clsact(net.relay, "in0"), "the qdisc mcrd added should go with it"


def test_interfaces_going_and_coming_back_move_a_rule_between_paths(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    net.lab.ip(net.relay, "link", "del", "out1")  # rule b's output, and dst2's eth0 with it
    wait_until(lambda: paths(daemon)["b"][0] == "user", what="rule b to leave the kernel")
    assert "no interface named 'out1'" in paths(daemon)["b"][1]
    assert paths(daemon)["a"] == ("kernel", "")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=3, count=100)  # a is not disturbed
    assert rx.wait_for(lambda a: len(rx.seqs(3)) == 100)
    net.lab.link(net.relay, "out1", net.dst2, "eth0", "203.0.113.1/25", "203.0.113.2/25")
    wait_until(lambda: paths(daemon)["b"] == ("kernel", ""), what="rule b back in the kernel")
    rx2 = Receiver(net.dst2, "239.3.3.3", 6001, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.2", 5000, stream=4, count=100)
    assert rx2.wait_for(lambda a: len(rx2.seqs(4)) == 100) and rx2.seqs(4) == list(range(100))
    wait_until(lambda: daemon.rule_stats("b")["packets"] == 100, what="the kernel's count of b")
    # the input itself goes: both rules pending, nothing left hooked to it
    net.lab.ip(net.src, "link", "del", "eth0")
    wait_until(lambda: all(p == "user" for p, _ in paths(daemon).values()), what="rules out of the kernel")
    assert ours(net.relay) == []
    # what the kernel relayed stays counted: totals never go back
    assert daemon.rule_stats("b")["packets"] == 100
    assert daemon.rule_stats("b")["outputs"][0]["packets"] == 100


def test_a_unicast_output_moves_to_the_kernel_once_its_next_hop_resolves(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    config = (
        AUTO
        + """
[[rule]]
name = "u"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "198.51.100.2", port = 7000 } ]
"""
    )
    daemon = start_mcrd(net, tmp_path, daemons, config)
    unresolved = "output 198.51.100.2:7000 on out0 ttl 64: next hop 198.51.100.2 is not resolved yet"
    assert paths(daemon)["u"] == ("user", unresolved)
    rx = Receiver(net.dst1, "198.51.100.2", 7000)
    tx = TrafficSender(net.src, "eth0")
    tx.stream("239.1.1.1", 5000, stream=5, count=50)  # relayed from user space, which resolves it
    assert rx.wait_for(lambda a: len(rx.seqs(5)) == 50)
    wait_until(lambda: paths(daemon)["u"] == ("kernel", ""), what="the rule to move to the kernel")
    tx.stream("239.1.1.1", 5000, stream=6, count=50)
    assert rx.wait_for(lambda a: len(rx.seqs(6)) == 50) and rx.seqs(6) == list(range(50))
    assert all(a.ttl == 64 and a.source == "198.51.100.1" for a in rx.arrivals)
    wait_until(lambda: daemon.rule_stats("u")["packets"] == 100, what="user and kernel counts together")


def test_mcrctl_list_shows_the_path(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    slow = """
[[rule]]
name = "slow"
input = { interface = "in0", group = "239.1.1.3", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.3" } ]
rate_limit = { pps = 100 }
"""
    config = AUTO + TWO % 6001 + slow
    daemon = start_mcrd(net, tmp_path, daemons, config)
    out = mcrctl(daemon.socket, "list").stdout
    lines: dict[str, Any] = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert lines["a"].rstrip().endswith("kernel")
    assert lines["slow"].rstrip().endswith("user (rate limits are policed in user space)")


def test_a_second_mcrd_refused_on_the_socket_leaves_the_programs_alone(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    before = filters(net.relay, "in0")
    argv = ["ip", "netns", "exec", net.relay, sys.executable, "-m", "mcrd.daemon"]
    second = subprocess.run(
        [*argv, "--config", str(daemon.config), "--control-socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1 and "another mcrd is already listening" in second.stderr
    assert filters(net.relay, "in0") == before  # nothing was touched
    assert paths(daemon)["a"] == ("kernel", "")
