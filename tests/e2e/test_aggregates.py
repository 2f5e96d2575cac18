"""End to end: frames that are aggregates of datagrams, as a sender using
UDP GSO (QUIC stacks, mcrd itself) or a NIC doing GRO hands them over, are
relayed as the datagrams they hold, on both paths; and a chain of mcrd
relays, each sending with GSO to the next over veth links with their
default offloads, delivers every datagram intact.
"""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import pytest

from lab.net import Lab, Receiver, TrafficSender, run
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until
from tests.helpers.streams import BASIC, assert_stream

pytestmark = [needs_root, pytest.mark.netns]

SO_RCVBUFFORCE = 33


def offloaded(daemon: Daemon, offload: str) -> None:
    if offload == "auto":
        wait_until(
            lambda: all(r["path"] == "kernel" for r in mcrctl_json(daemon.socket, "list")["rules"]),
            what="offloaded",
        )


@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
@pytest.mark.parametrize(
    ("per", "size"),
    [(8, 100), (40, 1000), (46, 1400)],
    ids=["aggregates within a ring frame", "aggregates beyond a ring frame", "64 KiB aggregates"],
)
def test_a_udp_gso_sender_is_relayed_datagram_by_datagram(
    net: Net, tmp_path: Path, daemons: list[Daemon], offload: str, per: int, size: int
) -> None:
    if offload == "auto":
        # The kernel path relays an aggregate as one: out0 then cuts it into
        # datagrams in software with their checksums complete, so that the
        # receiver's tap can verify what the programs' rewriting left.
        run(
            "ip",
            "netns",
            "exec",
            net.relay,
            "ethtool",
            "-K",
            "out0",
            "tx-udp-segmentation",
            "off",
            "tx",
            "off",
        )
    daemon = start_mcrd(net, tmp_path, daemons, f'[daemon]\noffload = "{offload}"\n' + BASIC)
    offloaded(daemon, offload)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    count = 20 * per + per // 2  # the last run shorter
    tx.stream_gso("239.1.1.1", 5000, stream=6, count=count, per=per, rate=20_000.0, size=size)
    assert_stream(rx, 6, count, "239.2.2.2", 6000, offload=offload)
    assert all(len(a.payload) == size for a in rx.arrivals)
    wait_until(lambda: daemon.rule_stats("camera")["packets"] == count, what="every datagram counted")
    # datagrams, not frames; the kernel relayed every aggregate whole
    assert daemon.stats()["interfaces"][0]["received"] == (count if offload == "off" else 0)


@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
def test_a_chain_of_three_relays_delivers_every_datagram_at_100000_per_second(
    lab: Lab, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    # src -> r1 -> r2 -> r3 -> dst, veth links with their default offloads:
    # each mcrd sends with UDP GSO, so the next one receives aggregates.
    src, r1, r2, r3, dst = (lab.netns(n) for n in ("src", "r1", "r2", "r3", "dst"))
    lab.link(src, "eth0", r1, "in0", "192.0.2.10/24", "192.0.2.1/24")
    lab.link(r1, "out0", r2, "in0", "198.51.100.1/30", "198.51.100.2/30")
    lab.link(r2, "out0", r3, "in0", "198.51.100.5/30", "198.51.100.6/30")
    lab.link(r3, "out0", dst, "eth0", "203.0.113.1/24", "203.0.113.2/24")
    if offload == "auto":
        # the last hop's aggregates cut into datagrams, checksums complete, for the tap
        run("ip", "netns", "exec", r3, "ethtool", "-K", "out0", "tx-udp-segmentation", "off", "tx", "off")
    hops = [(r1, "239.1.1.1", 5000, "239.1.1.2", 5001), (r2, "239.1.1.2", 5001, "239.1.1.3", 5002)]
    hops.append((r3, "239.1.1.3", 5002, "239.2.2.2", 6000))
    for n, (ns, group, port, out_group, out_port) in enumerate(hops):
        work = tmp_path / f"r{n + 1}"
        work.mkdir()
        config = work / "mcr.toml"
        config.write_text(
            f'[daemon]\noffload = "{offload}"\n[[rule]]\nname = "hop"\n'
            f'input = {{ interface = "in0", group = "{group}", port = {port} }}\n'
            f'outputs = [ {{ interface = "out0", group = "{out_group}", port = {out_port} }} ]\n'
        )
        daemon = Daemon(ns, config, work)
        daemons.append(daemon)
        daemon.start()
        offloaded(daemon, offload)
    rx = Receiver(dst, "239.2.2.2", 6000, "eth0")
    # room for the whole stream: it is read after it was sent
    for sock in (rx.sock, rx.tap.sock if rx.tap else None):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 512 << 20)
    tx = TrafficSender(src, "eth0", ttl=4)
    count = 100_000
    tx.stream_gso("239.1.1.1", 5000, stream=9, count=count, per=50, rate=100_000.0, size=200)
    arrived = rx.wait_for(lambda a: len(a) >= count, timeout=30)
    seen = [(d.stats()["interfaces"][0], d.rule_stats("hop")) for d in daemons]
    assert arrived, f"{len(rx.arrivals)} of {count} arrived; each hop's input and rule: {seen}"
    assert_stream(rx, 9, count, "239.2.2.2", 6000, offload=offload)
    for hop in daemons:
        wait_until(
            partial(lambda d: d.rule_stats("hop")["packets"] == count, hop), what="every hop counting all"
        )
