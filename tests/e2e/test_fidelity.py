"""End to end: what relayed datagrams keep of the received ones' headers,
the same on the user-space path (UDP sockets, GSO) and the kernel path.

The `net` topology (tests/conftest.py); captures at dst1 read each relayed
datagram's IP header.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from lab.net import inside
from tests.helpers.capture import Capture
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]


def rule(offload: str) -> str:
    return (
        f'[daemon]\noffload = "{offload}"\n[[rule]]\nname = "camera"\n'
        'input = { interface = "in0", group = "239.1.1.1", port = 5000 }\n'
        'outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]\n'
    )


def marked(ns: str, tos: int) -> socket.socket:
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 4)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    return sock


@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
def test_dscp_and_ecn_are_kept_per_datagram(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, rule(offload))
    if offload == "auto":
        wait_until(
            lambda: mcrctl_json(daemon.socket, "list")["rules"][0]["path"] == "kernel", what="offloaded"
        )
    far = TosReceiver(net.dst1, "239.2.2.2", 6000)
    # EF with ECT(1), AF41 with ECT(0), CS6, best effort: blocks that mix
    # them, then a run of one marking of one size (sent as GSO runs)
    markings = [0xB9, 0x8A, 0xC0, 0x00]
    senders = {tos: marked(net.src, tos) for tos in markings}
    for n in range(40):
        tos = markings[n % 4] if n < 20 else markings[0]
        senders[tos].sendto(b"%02d" % n + b"." * 30, ("239.1.1.1", 5000))
    got = far.take(40)
    assert sorted(int(payload[:2]) for payload, _tos in got) == list(range(40))
    for payload, tos in got:
        n = int(payload[:2])
        assert tos == (markings[n % 4] if n < 20 else markings[0]), f"datagram {n}: {tos:#x}"


class TosReceiver:
    """An application's socket that reads each datagram's TOS byte
    (IP_RECVTOS): it gets GSO runs cut into datagrams, as applications do."""

    IP_RECVTOS = 13

    def __init__(self, ns: str, group: str, port: int) -> None:
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.IPPROTO_IP, self.IP_RECVTOS, 1)
            self.sock.bind((group, port))
            mreq = struct.pack("=4s4si", socket.inet_aton(group), b"\0" * 4, socket.if_nametoindex("eth0"))
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        self.sock.settimeout(10)

    def take(self, count: int) -> list[tuple[bytes, int]]:
        got = []
        for _ in range(count):
            data, anc, _flags, _addr = self.sock.recvmsg(2048, 64)
            tos = next(v[0] for level, kind, v in anc if level == socket.IPPROTO_IP and kind == socket.IP_TOS)
            got.append((data, tos))
        return got


@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
def test_ttl_decrement_takes_one_off_and_drops_what_came_with_one(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    text = rule(offload).replace("port = 6000 }", 'port = 6000, ttl = "decrement" }')
    daemon = start_mcrd(net, tmp_path, daemons, text)
    (view,) = mcrctl_json(daemon.socket, "list")["rules"]
    assert view["outputs"][0]["destination"] == "239.2.2.2:6000 on out0 ttl decrement"
    if offload == "auto":
        assert (view["path"], view["path_reason"]) == (
            "user",
            "output 239.2.2.2:6000 on out0 ttl decrement decrements the TTL, which user space does",
        )
    far = Capture(net.dst1, "eth0")
    for ttl, tag in ((5, b"five"), (1, b"one"), (64, b"sixty-four")):
        sock = marked(net.src, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.sendto(tag, ("239.1.1.1", 5000))
    assert {w.payload: w.ttl for w in far.wait_for(6000, count=2)} == {b"five": 4, b"sixty-four": 63}
    wait_until(lambda: daemon.rule_stats("camera")["drops"]["ttl"] == 1, what="the expired one counted")
    assert not far.matching(6000, b"one")


@pytest.mark.parametrize("faithful", [False, True], ids=["socket", "faithful"])
@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
def test_an_output_sets_dscp_and_keeps_ecn(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str, faithful: bool
) -> None:
    extra = ', source_port = "keep"' if faithful else ""
    text = rule(offload).replace("port = 6000 }", f"port = 6000, dscp = 34{extra} }}")  # AF41
    daemon = start_mcrd(net, tmp_path, daemons, text)
    if offload == "auto":
        (view,) = mcrctl_json(daemon.socket, "list")["rules"]
        assert view["path"] == "user" and "sets DSCP" in view["path_reason"]
    far = TosReceiver(net.dst1, "239.2.2.2", 6000)
    for n, tos in enumerate((0xB9, 0x00, 0x03, 0xB8)):  # EF+ECT(1), none, CE, EF
        marked(net.src, tos).sendto(b"%02d" % n, ("239.1.1.1", 5000))
    got = {int(payload): tos for payload, tos in far.take(4)}
    assert got == {0: 34 << 2 | 1, 1: 34 << 2, 2: 34 << 2 | 3, 3: 34 << 2}


def test_each_senders_port_is_kept_and_one_that_cannot_be_is_reported(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # The default, in user space: each datagram leaves from its sender's
    # port, through sockets the worker binds to it. Port 999 needs a
    # privilege workers lack, and 4446 is held by another program on the
    # relay host: those leave from the output socket's own port, and mcrd
    # says so.
    with inside(net.relay):
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("198.51.100.1", 4446))
    daemon = start_mcrd(net, tmp_path, daemons, rule("off"))
    far = Capture(net.dst1, "eth0")
    with inside(net.src):
        senders = {port: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for port in (4444, 4445, 999, 4446)}
    for port, sock in senders.items():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.bind(("192.0.2.10", port))
    for n in range(12):  # interleaved: batches that mix senders
        port = (4444, 4445)[n % 2]
        senders[port].sendto(b"%d-%02d" % (port, n), ("239.1.1.1", 5000))
    got = far.wait_for(6000, count=12)
    assert sorted((w.payload, w.sport) for w in got) == sorted(
        (b"%d-%02d" % ((4444, 4445)[n % 2], n), (4444, 4445)[n % 2]) for n in range(12)
    )
    for port in (999, 4446):
        senders[port].sendto(b"from %d" % port, ("239.1.1.1", 5000))
        (wire,) = far.wait_for(6000, b"from %d" % port)
        assert wire.sport not in (port, 4444, 4445)  # the output socket's own
    wait_until(
        lambda: "source port 4446" in daemon.rule_stats("camera")["outputs"][0]["last_error"], what="reported"
    )
    log = daemon.log.read_text()
    assert "cannot send from the sender's port 999 (Permission denied); sending from its own port" in log
    assert "cannot send from the sender's port 4446 (Address already in use)" in log
    squatter.close()
    for sock in senders.values():
        sock.close()
