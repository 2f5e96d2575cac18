"""End to end: the fast data path's corners, with real packets.

Several workers per input (PACKET_FANOUT) with exact counters, outputs where
UDP GSO cannot be used (no checksum offload, a small MTU), and bursts that
fill ring blocks with datagrams of many sizes.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from lab.net import Receiver, TrafficSender, make_payload, run
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until
from tests.helpers.streams import BASIC, assert_stream

pytestmark = [needs_root, pytest.mark.netns]

needs_ethtool = pytest.mark.skipif(shutil.which("ethtool") is None, reason="ethtool is not installed")


def test_two_workers_per_input_spread_flows_keep_order_and_count_exactly(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # A veth delivers on the sending CPU's backlog, so a sender that moves
    # between CPUs can reorder its own datagrams before they reach anyone:
    # steering both hops' receive work to one CPU takes that out of the test.
    for ns, dev in ((net.relay, "in0"), (net.dst1, "eth0")):
        run("ip", "netns", "exec", ns, "sh", "-c", f"echo 1 > /sys/class/net/{dev}/queues/rx-0/rps_cpus")
    daemon = start_mcrd(net, tmp_path, daemons, "[daemon]\nworkers = 2\n" + BASIC)
    lanes = [w for w in mcrctl_json(daemon.socket, "workers")["workers"] if w["interface"] == "in0"]
    assert [w["lane"] for w in lanes] == [0, 1] and len({w["pid"] for w in lanes}) == 2
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    # sixteen flows (each sender has its own source port): the flow hash
    # spreads them over both workers, each flow stays on one
    senders = [TrafficSender(net.src, "eth0", ttl=4) for _ in range(16)]
    threads = [
        threading.Thread(target=tx.stream, args=("239.1.1.1", 5000, n, 300), kwargs={"rate": 3000.0})
        for n, tx in enumerate(senders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rx.wait_for(lambda a: len(a) >= 16 * 300), f"{len(rx.arrivals)} of {16 * 300} arrived"
    for n in range(16):
        assert rx.seqs(n) == list(range(300)), f"flow {n} lost, reordered or duplicated: {rx.seqs(n)}"
    wait_until(lambda: daemon.rule_stats("camera")["packets"] == 16 * 300, what="counters to settle")
    stats = daemon.rule_stats("camera")
    assert stats["outputs"][0]["packets"] == 16 * 300 and stats["outputs"][0]["errors"] == 0
    lanes = [w for w in mcrctl_json(daemon.socket, "workers")["workers"] if w["interface"] == "in0"]
    assert all(w["received"] > 0 for w in lanes), f"one worker got every flow: {lanes}"
    assert sum(w["received"] for w in lanes) == 16 * 300


@needs_ethtool
def test_output_without_checksum_offload_falls_back_from_gso(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # UDP GSO needs checksum offload on the output; without it the kernel
    # refuses (EIO) and mcrd sends datagram by datagram, losing nothing.
    run("ip", "netns", "exec", net.relay, "ethtool", "-K", "out0", "tx", "off")
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    tx.stream("239.1.1.1", 5000, stream=1, count=2000, rate=20000.0, size=500)
    assert_stream(rx, 1, 2000, "239.2.2.2", 6000, offload="off")
    stats = daemon.rule_stats("camera")
    assert stats["outputs"][0]["packets"] == 2000 and stats["outputs"][0]["errors"] == 0


def test_payloads_beyond_the_output_mtu_are_fragmented_not_lost(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # 1,200-byte payloads fit the input's MTU but not out0's 1,000: no GSO
    # run can carry them (EINVAL), so they go one by one and the kernel
    # fragments each; the receiver reassembles them whole.
    run("ip", "-n", net.relay, "link", "set", "out0", "mtu", "1000")
    run("ip", "-n", net.dst1, "link", "set", "eth0", "mtu", "1000")
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    tx.stream("239.1.1.1", 5000, stream=1, count=500, rate=10000.0, size=1200)
    tx.stream("239.1.1.1", 5000, stream=2, count=500, rate=10000.0, size=400)  # these still go with GSO
    assert_stream(rx, 1, 500, "239.2.2.2", 6000, offload="off")
    assert rx.wait_for(lambda a: len(rx.seqs(2)) >= 500)
    assert rx.seqs(2) == list(range(500))
    assert all(len(a.payload) in (1200, 400) for a in rx.arrivals)
    stats = daemon.rule_stats("camera")
    assert stats["outputs"][0]["packets"] == 1000 and stats["outputs"][0]["errors"] == 0


def test_a_burst_of_mixed_sizes_arrives_whole_and_in_order(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # Sent back to back, these share ring blocks: runs of equal sizes go as
    # one GSO message each, the odd ones alone, and order is kept.
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    sizes = [64] * 100 + [1400] * 40 + [200, 201, 202, 64, 64] * 20 + [32] * 300 + [1472] * 44
    for seq, size in enumerate(sizes):
        tx.send("239.1.1.1", 5000, make_payload(7, seq, size))
    assert rx.wait_for(lambda a: len(a) >= len(sizes)), f"{len(rx.arrivals)} of {len(sizes)} arrived"
    assert rx.seqs(7) == list(range(len(sizes)))
    assert [len(a.payload) for a in rx.arrivals] == sizes
    stats = daemon.rule_stats("camera")
    assert stats["packets"] == len(sizes) and stats["bytes"] == sum(sizes)
    assert stats["outputs"][0]["bytes"] == sum(sizes)


def test_a_burst_that_wraps_a_small_ring_many_times_arrives_in_order(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # 4 MiB are 2,048 frames of 2 KiB: 10,000 datagrams sent as fast as the
    # sender can go the ring round several times, in batches that end at
    # its last frame and start again at its first.
    daemon = start_mcrd(net, tmp_path, daemons, "[daemon]\nring_size = 4\n" + BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    tx.stream("239.1.1.1", 5000, stream=3, count=10_000, rate=50_000.0, size=100)
    assert_stream(rx, 3, 10_000, "239.2.2.2", 6000, offload="off")
    wait_until(lambda: daemon.rule_stats("camera")["packets"] == 10_000, what="every datagram counted")


def test_jumbo_frames_fill_frames_sized_to_the_mtu(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    # The ring's frames follow the input's MTU when it opens: 16 KiB for 9,000.
    for ns, dev in ((net.src, "eth0"), (net.relay, "in0"), (net.relay, "out0"), (net.dst1, "eth0")):
        run("ip", "-n", ns, "link", "set", dev, "mtu", "9000")
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    tx.stream("239.1.1.1", 5000, stream=4, count=300, rate=5000.0, size=8900)
    assert_stream(rx, 4, 300, "239.2.2.2", 6000, offload="off")
    assert all(len(a.payload) == 8900 for a in rx.arrivals)
    assert daemon.rule_stats("camera")["outputs"][0]["errors"] == 0


def test_a_busy_polling_worker_relays_and_still_answers(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    # busy_poll = 1 s: the worker keeps polling its ring between datagrams;
    # a stats request on its channel must still end the spin and be answered.
    daemon = start_mcrd(net, tmp_path, daemons, "[daemon]\nbusy_poll = 1000000\n" + BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0", ttl=4)
    sending = threading.Thread(target=tx.stream, args=("239.1.1.1", 5000, 5, 3000), kwargs={"rate": 1000.0})
    sending.start()
    try:
        wait_until(lambda: daemon.rule_stats("camera")["packets"] >= 100, what="relaying")
        counts = [daemon.rule_stats("camera")["packets"] for _ in range(5)]  # each answered mid-spin
        assert counts == sorted(counts)
    finally:
        sending.join()
    assert_stream(rx, 5, 3000, "239.2.2.2", 6000, offload="off")
    wait_until(lambda: daemon.rule_stats("camera")["packets"] == 3000, what="every datagram counted")
