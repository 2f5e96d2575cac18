"""End to end: kernel offload's life cycle with a real mcrd, nft and packets.

What the kernel holds follows the rules and the interfaces: installed at
start (over a crash's leftover), replaced atomically on reload with the
counters carried, moved back to user space and again to the kernel as
interfaces and next hops come and go, removed at exit; tables mcrd did not
create are never touched. (The relay suite itself runs offloaded too, in
test_relay_e2e.py.)
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mcrd.lab import Receiver, Sender, collecting

from .conftest import Daemon, Net, mcrctl, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [
    needs_root,
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed"),
]

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


def nft(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True, check=True
    ).stdout


def tables(ns: str) -> set[str]:
    found = json.loads(nft(ns, "-j", "list", "tables"))["nftables"]
    return {f"{t['table']['family']} {t['table']['name']}" for t in found if "table" in t}


def paths(daemon: Daemon) -> dict[str, tuple[str, str]]:
    return {r["name"]: (r["path"], r["path_reason"]) for r in mcrctl_json(daemon.socket, "list")["rules"]}


def test_installed_over_a_leftover_removed_at_exit_others_untouched(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    leftover = 'table netdev mcrd {\n  chain stale { type filter hook ingress device "in0" priority 0; }\n}\n'
    run_nft = ["ip", "netns", "exec", net.relay, "nft", "-f", "-"]
    subprocess.run(run_nft, input=leftover, text=True, check=True)
    nft(net.relay, "add", "table", "netdev", "theirs")
    nft(net.relay, "add", "table", "inet", "filter")
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    assert paths(daemon) == {"a": ("kernel", ""), "b": ("kernel", "")}
    listing = nft(net.relay, "list", "table", "netdev", "mcrd")
    assert "stale" not in listing and "fwd to" in listing
    assert {"netdev theirs", "inet filter", "netdev mcrd"} <= tables(net.relay)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    Sender(net.src, "eth0").stream("239.1.1.1", 5000, stream=1, count=100)
    assert rx.wait_for(lambda a: len(rx.seqs(1)) == 100) and rx.seqs(1) == list(range(100))
    assert daemon.rule_stats("a")["outputs"][0]["packets"] == 100
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0
    assert tables(net.relay) == {"netdev theirs", "inet filter"}


def test_a_reload_replaces_the_table_without_a_gap_and_counters_carry_over(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001, "--no-watch")
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = Sender(net.src, "eth0")
    with collecting(rx):
        with tx.streaming("239.1.1.1", 5000, stream=2, rate=2000) as sent:
            for n in range(10):  # rule b changes ten times while a streams
                daemon.config.write_text(AUTO + TWO % (6002 + n))
                result = json.loads(mcrctl(daemon.socket, "--json", "reload").stdout)
                assert result["result"] == "applied" and result["changed"] == ["b"], result
                assert f"udp dport set {6002 + n}" in nft(net.relay, "list", "table", "netdev", "mcrd")
        total = sent[0]
        wait_until(lambda: len(rx.seqs(2)) >= total, what="the whole stream")
    assert rx.seqs(2) == list(range(total)), "rule a lost, duplicated or reordered datagrams"
    wait_until(lambda: daemon.rule_stats("a")["packets"] == total, what="kernel counters across reloads")
    assert daemon.rule_stats("a")["outputs"][0]["packets"] == total


def test_interfaces_going_and_coming_back_move_a_rule_between_paths(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    net.lab.ip(net.relay, "link", "del", "out1")  # rule b's output, and dst2's eth0 with it
    wait_until(lambda: paths(daemon)["b"][0] == "user", what="rule b to leave the kernel")
    assert "no interface named 'out1'" in paths(daemon)["b"][1]
    assert paths(daemon)["a"] == ("kernel", "")
    Sender(net.src, "eth0").stream("239.1.1.1", 5000, stream=3, count=100)  # a is not disturbed
    assert rx.wait_for(lambda a: len(rx.seqs(3)) == 100)
    net.lab.link(net.relay, "out1", net.dst2, "eth0", "203.0.113.1/25", "203.0.113.2/25")
    wait_until(lambda: paths(daemon)["b"] == ("kernel", ""), what="rule b back in the kernel")
    rx2 = Receiver(net.dst2, "239.3.3.3", 6001, "eth0")
    Sender(net.src, "eth0").stream("239.1.1.2", 5000, stream=4, count=100)
    assert rx2.wait_for(lambda a: len(rx2.seqs(4)) == 100) and rx2.seqs(4) == list(range(100))
    # the input itself goes: both rules pending, nothing left hooked to it
    net.lab.ip(net.src, "link", "del", "eth0")
    wait_until(lambda: all(p == "user" for p, _ in paths(daemon).values()), what="rules out of the kernel")
    assert "in0" not in nft(net.relay, "list", "ruleset")


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
    tx = Sender(net.src, "eth0")
    tx.stream("239.1.1.1", 5000, stream=5, count=50)  # relayed from user space, which resolves it
    assert rx.wait_for(lambda a: len(rx.seqs(5)) == 50)
    wait_until(lambda: paths(daemon)["u"] == ("kernel", ""), what="the rule to move to the kernel")
    show = ["ip", "-n", net.dst1, "-j", "link", "show", "eth0"]
    link = subprocess.run(show, capture_output=True, text=True, check=True)
    mac = json.loads(link.stdout)[0]["address"]
    assert f"ether daddr set {mac}" in nft(net.relay, "list", "table", "netdev", "mcrd")
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


def test_a_second_mcrd_refused_on_the_socket_leaves_the_table_alone(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, AUTO + TWO % 6001)
    before = nft(net.relay, "list", "table", "netdev", "mcrd")
    argv = ["ip", "netns", "exec", net.relay, sys.executable, "-m", "mcrd.daemon"]
    second = subprocess.run(
        [*argv, "--config", str(daemon.config), "--control-socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1 and "another mcrd is already listening" in second.stderr
    assert nft(net.relay, "list", "table", "netdev", "mcrd") == before  # nothing was touched
    assert paths(daemon)["a"] == ("kernel", "")
