"""End to end: what two-way discovery rules put on the wire, header by header.

The `net` topology (tests/conftest.py): src eth0 192.0.2.10 --- in0 [relay]
out0 198.51.100.1 --- eth0 198.51.100.2 dst1. Rules relay a group between
in0 and out0 both ways; captures on either side read every relayed
datagram's source address and port, TTL, DSCP, checksum and payload. Every
test runs with offload off and on: where the kernel path cannot do what a
rule needs, the rule stays in user space and `mcrctl list` says why, and
the wire is the same.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from lab.net import inside
from tests.helpers.capture import Capture, inject
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until
from tests.helpers.packets import inet_checksum, ipv4_udp

pytestmark = [needs_root, pytest.mark.netns]


@pytest.fixture(params=["off", "auto"], ids=["user", "kernel"])
def offload(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pair(group: str, port: int, offload: str, ttl: int = 255, extra: str = "") -> str:
    return f'[daemon]\noffload = "{offload}"\n' + "".join(
        f'[[rule]]\nname = "{a}-to-{b}"\n{extra}'
        f'input = {{ interface = "{a}", group = "{group}", port = {port} }}\n'
        f'outputs = [ {{ interface = "{b}", group = "{group}", ttl = {ttl} }} ]\n'
        for a, b in (("in0", "out0"), ("out0", "in0"))
    )


def paths(daemon: Daemon) -> dict[str, tuple[str, str]]:
    return {r["name"]: (r["path"], r["path_reason"]) for r in mcrctl_json(daemon.socket, "list")["rules"]}


def loop_drops(daemon: Daemon, name: str) -> int:
    return int(daemon.rule_stats(name)["drops"]["loop"])


def udp_from(ns: str, interface: str, sport: int, *, tos: int = 0, ttl: int = 255) -> socket.socket:
    """A socket as a discovery client has it: bound to the protocol's port."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("0.0.0.0", sport))
    return sock


MDNS = ("224.0.0.251", 5353)
SSDP = ("239.255.255.250", 1900)


def test_a_two_way_mdns_pair_relays_both_ways_from_port_5353(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, pair(*MDNS, offload))
    reason = "offload is off" if offload == "off" else "the loop guard runs in user space"
    assert paths(daemon) == {"in0-to-out0": ("user", reason), "out0-to-in0": ("user", reason)}
    far, near = Capture(net.dst1, "eth0"), Capture(net.src, "eth0")
    a = udp_from(net.src, "eth0", 5353, tos=0xB8)  # DSCP EF
    b = udp_from(net.dst1, "eth0", 5353)
    a.sendto(b"answer from segment A", MDNS)
    (got,) = far.wait_for(5353, b"answer from segment A")
    assert (got.source, got.sport, got.dest, got.ttl, got.tos) == (
        "198.51.100.1",
        5353,
        "224.0.0.251",
        255,
        0xB8,
    )
    assert got.checksum_ok and got.checksum != 0
    b.sendto(b"answer from segment B", MDNS)
    (back,) = near.wait_for(5353, b"answer from segment B")
    assert (back.source, back.sport, back.ttl) == ("192.0.2.1", 5353, 255) and back.checksum_ok
    # neither came back to where it started: no echo, nothing counted as a loop
    time.sleep(0.3)  # a window for an echo to show up in; nothing signals its absence
    near.poll()
    far.poll()
    assert not near.matching(5353, b"answer from segment A") and not far.matching(
        5353, b"answer from segment B"
    )
    assert loop_drops(daemon, "in0-to-out0") == loop_drops(daemon, "out0-to-in0") == 0


def test_a_relayed_query_asks_for_multicast_answers(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    """A QU question relayed as it is would be answered by unicast to the
    relay; relayed as a QM question, its answer is multicast and relayed back."""
    start_mcrd(net, tmp_path, daemons, pair(*MDNS, offload))
    far = Capture(net.dst1, "eth0")
    name = b"\x05_http\x04_tcp\x05local\x00"
    qu = struct.pack("!HHHHHH", 0, 0, 1, 0, 0, 0) + name + struct.pack("!HH", 12, 0x8001)
    udp_from(net.src, "eth0", 5353).sendto(qu, MDNS)
    (got,) = far.wait_for(5353)
    assert got.payload == qu[:-2] + struct.pack("!H", 1)
    assert got.checksum_ok and got.sport == 5353


def test_the_loop_guard_drops_what_this_host_sent_and_reflections(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, pair(*MDNS, offload))
    far = Capture(net.dst1, "eth0")
    # what another relay would reflect back: a datagram from this relay's own address
    own = ipv4_udp(b"mine", src="198.51.100.1", dst="224.0.0.251", sport=5353, dport=5353, ip_checksum=True)
    inject(net.src, "eth0", own)
    wait_until(lambda: loop_drops(daemon, "in0-to-out0") == 1, what="the own-address drop")
    # the same payload twice at once: the second is a reflection
    sock = udp_from(net.src, "eth0", 5353)
    sock.sendto(b"twice", MDNS)
    sock.sendto(b"twice", MDNS)
    wait_until(lambda: loop_drops(daemon, "in0-to-out0") == 2, what="the duplicate drop")
    assert len(far.wait_for(5353, b"twice", count=1)) == 1
    # a protocol's own repeat, a second later, goes through
    time.sleep(0.2)  # longer than the guard's window: the point of the test
    sock.sendto(b"twice", MDNS)
    assert len(far.wait_for(5353, b"twice", count=2)) == 2
    assert not far.matching(5353, b"mine")
    stats = daemon.rule_stats("in0-to-out0")
    assert stats["packets"] == 2 and stats["drops"]["loop"] == 2


def test_a_relayed_ssdp_search_keeps_the_searchers_address_and_port(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    start_mcrd(net, tmp_path, daemons, pair(*SSDP, offload, ttl=2))
    near = Capture(net.src, "eth0")
    search = (
        b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"
        b'MAN: "ssdp:discover"\r\nMX: 1\r\nST: ssdp:all\r\n\r\n'
    )
    searcher = udp_from(net.dst1, "eth0", 0, ttl=2)
    searcher.sendto(search, SSDP)
    (got,) = near.wait_for(1900, search)
    assert (got.source, got.sport, got.ttl) == ("198.51.100.2", searcher.getsockname()[1], 2)
    assert got.checksum_ok


def test_broadcast_outputs_deliver_wake_on_lan(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    """Wake-on-LAN from segment A wakes a machine on segment B: a limited
    broadcast on a named interface, and a subnet-directed one."""
    rules = f"""
[daemon]
offload = "{offload}"
[[rule]]
name = "wol"
input = {{ interface = "in0", group = "255.255.255.255", port = 9 }}
outputs = [ {{ interface = "out0", group = "255.255.255.255" }} ]
[[rule]]
name = "wol-directed"
input = {{ interface = "in0", group = "192.0.2.255", port = 7 }}
outputs = [ {{ interface = "out0", group = "198.51.100.255", port = 9 }} ]
"""
    daemon = start_mcrd(net, tmp_path, daemons, rules)
    if offload == "auto":
        wait_until(lambda: paths(daemon)["wol"][0] == "kernel", what="the broadcast rules offloaded")
        assert paths(daemon)["wol-directed"] == ("kernel", "")
    with inside(net.dst1):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 9))
        rx.settimeout(5)
    magic = b"\xff" * 6 + bytes.fromhex("020000000042") * 16
    sender = udp_from(net.src, "eth0", 0, ttl=64)
    sender.sendto(magic, ("255.255.255.255", 9))
    data, (source, _port) = rx.recvfrom(2048)
    assert (data, source) == (magic, "198.51.100.1")
    sender.sendto(magic + b"directed", ("192.0.2.255", 7))
    data, _ = rx.recvfrom(2048)
    assert data == magic + b"directed"
    assert daemon.rule_stats("wol")["outputs"][0]["errors"] == 0
    assert inet_checksum(b"") == 0xFFFF  # the lab's checksum, used above, is the Internet one


def test_a_faithful_datagram_larger_than_the_output_mtu_is_counted_not_sent(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    """The kernel does not fragment what a raw socket sends: such a datagram is
    an output error (EMSGSIZE), and the next one that fits goes."""
    lab_ip = net.lab.ip
    lab_ip(net.relay, "link", "set", "out0", "mtu", "1000")
    daemon = start_mcrd(net, tmp_path, daemons, pair(*MDNS, offload))
    far = Capture(net.dst1, "eth0")
    sock = udp_from(net.src, "eth0", 5353)
    sock.sendto(b"x" * 1200, MDNS)
    sock.sendto(b"fits", MDNS)
    assert len(far.wait_for(5353, b"fits")) == 1
    (out,) = daemon.rule_stats("in0-to-out0")["outputs"]
    assert (out["packets"], out["errors"], out["last_error"]) == (1, 1, "EMSGSIZE")
    assert not far.matching(5353, b"x" * 1200)
