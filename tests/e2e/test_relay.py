"""End to end: a real mcrd relays real packets between namespaces.

Topology (each box a namespace, each line a veth pair):

    src eth0 192.0.2.10/24 --- in0 192.0.2.1/24  [relay]  out0 198.51.100.1/24 --- eth0 198.51.100.2/24 dst1
                                                          out1 203.0.113.1/25  --- eth0 203.0.113.2/25  dst2

Receivers are ordinary UDP sockets joined to the output groups; they check
destination group, port, TTL, payload CRC and sequence of every datagram.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from lab.net import Receiver, TrafficSender, inside, make_payload, run
from tests.helpers.daemon import Daemon, Net, mcrctl, mcrctl_json, needs_root, start_mcrd, wait_until
from tests.helpers.packets import ipv4_udp
from tests.helpers.streams import BASIC, assert_stream

pytestmark = [needs_root, pytest.mark.netns]


@pytest.fixture(autouse=True, params=["off", "auto"], ids=["user", "kernel"])
def offload(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, net: Net) -> str:
    """Every test here runs twice: relayed in user space, and with offload
    on, where the kernel relays what it can (the same assertions hold).
    Gives the mode ("off" or "auto") to the tests that ask for it."""
    mode = str(request.param)
    if mode == "auto":
        if shutil.which("ethtool") is None:
            pytest.skip("the checksum checks need ethtool (scripts/setup --test installs it)")
        monkeypatch.setenv("MCRD_OFFLOAD", "auto")
        # Outputs compute checksums in software, so that receivers' taps can
        # verify on the wire what the kernel's rewriting left.
        for dev in ("out0", "out1"):
            run("ip", "netns", "exec", net.relay, "ethtool", "-K", dev, "tx", "off")
    return mode


def test_multicast_to_multicast_rewrites_group_and_port(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=16)
    tx.stream("239.1.1.1", 5000, stream=1, count=500, size=200)
    assert_stream(rx, 1, 500, "239.2.2.2", 6000, ttl=1, offload=offload)
    assert all(a.source == "198.51.100.1" for a in rx.arrivals)
    assert all(len(a.payload) == 200 for a in rx.arrivals)
    stats = daemon.rule_stats("camera")
    assert stats["packets"] == 500 and stats["bytes"] == 500 * 200
    assert stats["outputs"][0]["packets"] == 500 and stats["outputs"][0]["errors"] == 0
    (rule,) = mcrctl_json(daemon.socket, "list")["rules"]
    assert rule["path"] == ("kernel" if offload == "auto" else "user"), rule


FANOUT = """
[[rule]]
name = "fan"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [
  { interface = "out0", group = "239.2.2.2", port = 6000 },
  { interface = "out1", group = "239.3.3.3", port = 6001, ttl = 3 },
  { interface = "out0", group = "198.51.100.2", port = 7000, ttl = 8 },
]
"""


def test_fan_out_to_three_outputs_on_two_interfaces_including_unicast(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, FANOUT)
    rx1 = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    rx2 = Receiver(net.dst2, "239.3.3.3", 6001, "eth0")
    rx3 = Receiver(net.dst1, "198.51.100.2", 7000)
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=2, count=300)
    assert_stream(rx1, 2, 300, "239.2.2.2", 6000, ttl=1, offload=offload)
    assert_stream(rx2, 2, 300, "239.3.3.3", 6001, ttl=3, offload=offload)
    assert_stream(rx3, 2, 300, "198.51.100.2", 7000, ttl=8, offload=offload)
    outputs = daemon.rule_stats("fan")["outputs"]
    assert [o["packets"] for o in outputs] == [300, 300, 300]


def test_unicast_in_multicast_out(net: Net, tmp_path: Path, daemons: list[Daemon], offload: str) -> None:
    start_mcrd(
        net,
        tmp_path,
        daemons,
        """
[[rule]]
name = "u2m"
input = { interface = "in0", group = "192.0.2.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]
""",
    )
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=64)
    tx.stream("192.0.2.1", 5000, stream=3, count=300)
    assert_stream(rx, 3, 300, "239.2.2.2", 6000, offload=offload)
    # mcrd holds the port, so the host does not answer every datagram with
    # ICMP port-unreachable (which would surface here as ECONNREFUSED).
    tx.sock.connect(("192.0.2.1", 5000))
    tx.sock.send(make_payload(3, 300))
    assert rx.wait_for(lambda a: len(rx.seqs(3)) == 301)
    tx.sock.settimeout(0.3)  # proving a negative: no port-unreachable comes back
    with pytest.raises(TimeoutError):
        tx.sock.recv(100)


def test_relays_what_rp_filter_drops(net: Net, tmp_path: Path, daemons: list[Daemon], offload: str) -> None:
    net.lab.sysctl(net.relay, "net.ipv4.conf.all.rp_filter", "1")
    net.lab.sysctl(net.relay, "net.ipv4.conf.in0.rp_filter", "1")
    net.lab.ip(net.src, "addr", "add", "203.0.113.200/25", "dev", "eth0")  # the relay has no route back
    start_mcrd(net, tmp_path, daemons, BASIC)
    # An application on the relay host, on a group no rule relays (an
    # offloaded rule consumes its datagrams): it shows what the host's stack does.
    local = Receiver(net.relay, "239.1.1.7", 5000, "in0")
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")

    TrafficSender(net.src, "eth0", source="192.0.2.10").stream("239.1.1.7", 5000, stream=4, count=50)
    assert local.wait_for(lambda a: len(local.seqs(4)) == 50), "control: routable source reaches the host"
    unroutable = TrafficSender(net.src, "eth0", source="203.0.113.200")
    unroutable.stream("239.1.1.7", 5000, stream=5, count=50)
    unroutable.stream("239.1.1.1", 5000, stream=5, count=200)
    assert_stream(rx, 5, 200, "239.2.2.2", 6000, offload=offload)
    assert {a.source for a in rx.arrivals} == {"198.51.100.1"}
    local.poll(0)
    assert local.seqs(5) == [], "the kernel should have dropped the unroutable source"


def test_ttl_one_stream_is_relayed(net: Net, tmp_path: Path, daemons: list[Daemon], offload: str) -> None:
    start_mcrd(
        net,
        tmp_path,
        daemons,
        """
[[rule]]
name = "mdns-like"
input = { interface = "in0", group = "239.255.0.251", port = 5353 }
outputs = [ { interface = "out1", group = "239.255.0.251", port = 5353, ttl = 4 } ]
""",
    )
    rx = Receiver(net.dst2, "239.255.0.251", 5353, "eth0")
    TrafficSender(net.src, "eth0", ttl=1).stream("239.255.0.251", 5353, stream=6, count=200)
    assert_stream(rx, 6, 200, "239.255.0.251", 5353, ttl=4, offload=offload)


FILTERED = """
[[rule]]
name = "any-source"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]

[[rule]]
name = "one-source"
input = { interface = "in0", group = "239.1.1.5", port = 5000, source = "192.0.2.10" }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6002 } ]
"""


def test_other_groups_ports_and_sources_are_not_relayed(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    net.lab.ip(net.src, "addr", "add", "192.0.2.11/24", "dev", "eth0")
    daemon = start_mcrd(net, tmp_path, daemons, FILTERED)
    rx_any = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    rx_one = Receiver(net.dst1, "239.2.2.2", 6002, "eth0")
    good = TrafficSender(net.src, "eth0", source="192.0.2.10")
    other = TrafficSender(net.src, "eth0", source="192.0.2.11")
    count = 100
    for n in range(count):
        good.send("239.1.1.1", 5000, make_payload(10, n))
        good.send("239.1.1.1", 5001, make_payload(11, n))  # other port
        good.send("239.1.1.9", 5000, make_payload(12, n))  # other group
        other.send("239.1.1.5", 5000, make_payload(13, n))  # other source of an (S,G) rule
        good.send("239.1.1.5", 5000, make_payload(14, n))  # the (S,G) rule's source
    # Both wanted streams arriving complete means every datagram before them
    # has been through the relay too.
    assert rx_any.wait_for(lambda a: len(rx_any.seqs(10)) == count)
    assert rx_one.wait_for(lambda a: len(rx_one.seqs(14)) == count)
    assert rx_any.seqs(10) == list(range(count)) and rx_one.seqs(14) == list(range(count))
    rx_any.poll(0)
    rx_one.poll(0)
    assert {a.stream_seq[0] for a in rx_any.arrivals if a.stream_seq} == {10}
    assert {a.stream_seq[0] for a in rx_one.arrivals if a.stream_seq} == {14}
    # The kernel filter kept the rest out of the worker altogether (and with
    # offload, the kernel relayed the wanted ones itself).
    iface = daemon.stats()["interfaces"][0]
    assert iface["filter"] == "exact"
    assert iface["received"] == (0 if offload == "auto" else 2 * count)
    assert [r["packets"] for r in daemon.stats()["rules"]] == [count, count]
    assert sum(iface["drops"].values()) == 0


def _raw_frame(ns: str, packet: bytes) -> None:
    """Send an IPv4 packet exactly as given (lengths unchecked) from `ns`'s eth0."""
    with inside(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)
    with sock:
        sock.sendto(packet, ("eth0", 0x0800, 0, 0, bytes.fromhex("01005e010101")))


def test_fragments_truncated_and_malformed_are_dropped_and_counted(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    body = make_payload(20, 0, 40)
    _raw_frame(net.src, ipv4_udp(body, total=300, udp_len=48))  # claims more than it has
    _raw_frame(net.src, ipv4_udp(body, total=68, udp_len=400))  # UDP longer than the packet
    _raw_frame(net.src, ipv4_udp(body, total=68, udp_len=48, version=6))
    _raw_frame(net.src, ipv4_udp(body, total=68, udp_len=48, frag=0x2000))  # first fragment
    tx = TrafficSender(net.src, "eth0")
    tx.send("239.1.1.1", 5000, make_payload(21, 0, 3000))  # fragmented by the sender's kernel (MTU 1500)
    tx.stream("239.1.1.1", 5000, stream=22, count=20)
    assert rx.wait_for(lambda a: len(rx.seqs(22)) == 20)
    rx.poll(0)
    assert {a.stream_seq[0] for a in rx.arrivals if a.stream_seq} == {22}
    assert all(a.stream_seq is not None for a in rx.arrivals)
    drops = daemon.stats()["interfaces"][0]["drops"]
    # The kernel path checks the IP length (as the kernel does for every
    # packet) but, like a router, not that the UDP length fits: it relays
    # that one, and receivers drop it (it never reaches rx above).
    malformed = 1 if offload == "auto" else 2
    assert drops == {"truncated": 1, "malformed": malformed, "fragment": 4, "unmatched": 0, "overflow": 0}
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_killed_worker_is_restarted_and_the_stream_resumes(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    tx.stream("239.1.1.1", 5000, stream=30, count=100)
    assert rx.wait_for(lambda a: len(rx.seqs(30)) == 100)
    (worker,) = mcrctl_json(daemon.socket, "workers")["workers"]
    os.kill(worker["pid"], signal.SIGKILL)

    def restarted() -> bool:
        (w,) = mcrctl_json(daemon.socket, "workers")["workers"]
        return bool(w["state"] == "active" and w["pid"] not in (None, worker["pid"]) and w["restarts"] == 1)

    wait_until(restarted, what="the worker to be restarted")
    tx.stream("239.1.1.1", 5000, stream=31, count=200)
    assert_stream(rx, 31, 200, "239.2.2.2", 6000, offload=offload)
    assert "1 restarts" in mcrctl(daemon.socket, "status").stdout
    # Counters carry over the restart (up to the last sample before the kill).
    assert daemon.rule_stats("camera")["packets"] >= 200


def test_frames_the_relay_sent_are_never_relayed_again(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # Rule "back" republishes into the input segment itself, onto the group
    # that rule "onward" takes: what "back" sends must not reach "onward".
    daemon = start_mcrd(
        net,
        tmp_path,
        daemons,
        """
[[rule]]
name = "back"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "in0", group = "239.1.1.2" } ]

[[rule]]
name = "onward"
input = { interface = "in0", group = "239.1.1.2", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]
""",
    )
    in_segment = Receiver(net.src, "239.1.1.2", 5000, "eth0")
    onward = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    tx.stream("239.1.1.1", 5000, stream=40, count=100)
    assert in_segment.wait_for(lambda a: len(in_segment.seqs(40)) == 100), "rule 'back' relays"
    tx.stream("239.1.1.2", 5000, stream=41, count=100)  # control: a real sender on that group
    assert onward.wait_for(lambda a: len(onward.seqs(41)) == 100)
    onward.poll(0)
    assert onward.seqs(40) == [], "mcrd relayed its own output"
    assert daemon.rule_stats("onward")["packets"] == 100
