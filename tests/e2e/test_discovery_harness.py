"""The discovery harness (tests/helpers/discovery.py) works, without mcrd.

Real python-zeroconf and async-upnp-client clients and servers find each
other when they share a segment, and find nothing across a router that
forwards unicast but relays no multicast: the negative control that the
relay tests' positive results are measured against.

    shared:  A eth0 192.0.2.10/24 --- eth0 192.0.2.20/24 B
    routed:  A eth0 192.0.2.10/24 --- in0 [R] out0 --- eth0 198.51.100.2/24 B
"""

from __future__ import annotations

import time

import pytest

from lab.net import Lab, Receiver, TrafficSender, make_payload
from tests.helpers.daemon import needs_root
from tests.helpers.discovery import (
    MDNS_GROUP,
    MDNS_PORT,
    MdnsBrowser,
    MdnsPublisher,
    SsdpDevice,
    SsdpSearcher,
    Topology,
    count_packets,
    counting,
    mdns_announcement,
    routed_segments,
    shared_segment,
    ssdp_response,
)

pytestmark = [needs_root, pytest.mark.netns]

TXT = {"path": "/probe", "v": "1"}
NEGATIVE_TIMEOUT = 3.0


@pytest.fixture
def shared(lab: Lab) -> Topology:
    return shared_segment(lab)


@pytest.fixture
def routed(lab: Lab) -> Topology:
    topo = routed_segments(lab)
    # Unicast does cross R, so whatever discovery misses below is multicast's doing.
    rx = Receiver(topo.b, topo.b_addr, 7000)
    tx = TrafficSender(topo.a, "eth0", ttl=8)
    try:
        tx.send(topo.b_addr, 7000, make_payload(1, 0))
        assert rx.wait_for(lambda arrivals: len(arrivals) == 1, timeout=5.0), "unicast A -> B failed"
    finally:
        rx.close()
        tx.close()
    return topo


# One shared segment: everything is found.


def test_mdns_browse_resolves_on_one_segment(shared: Topology) -> None:
    with MdnsPublisher(shared.a, "alpha", port=8123, txt=TXT), MdnsBrowser(shared.b) as browser:
        service = browser.wait_for("alpha", timeout=5.0)
        assert service is not None
        assert service.name == "alpha._mcrdtest._tcp.local."
        assert service.addresses == (shared.a_addr,)
        assert service.port == 8123
        assert service.txt == TXT
        assert service.frames and all(f.src == shared.a_addr for f in service.frames)
        assert all(f.sport == 5353 for f in service.frames)
        # zeroconf's first query is QU, so the answer came by unicast, and with
        # the kernel's default TTL: zeroconf sets 255 only for multicast.
        assert all(f.ttl == (255 if f.multicast else 64) for f in service.frames)


def test_mdns_qu_query_is_answered_by_unicast(shared: Topology) -> None:
    with MdnsPublisher(shared.a, "bravo", txt=TXT), MdnsBrowser(shared.b, mode="qu") as browser:
        service = browser.wait_for("bravo", timeout=5.0)
        assert service is not None
        assert service.addresses == (shared.a_addr,)
        assert service.txt == TXT
        # The publisher multicast its records when it registered, less than a
        # quarter of their TTL ago, so it answers QU questions by unicast.
        assert service.unicast
        assert any(f.dst == shared.b_addr and f.dport == 5353 for f in service.frames)
        stats = browser.queries()
        assert stats.queries >= 1
        assert stats.qu == stats.queries and stats.qm == 0


def test_mdns_passive_listener_sees_only_announcements(shared: Topology) -> None:
    with (
        MdnsPublisher(shared.a, "charlie", txt=TXT) as publisher,
        MdnsBrowser(shared.b, mode="passive") as browser,
    ):
        # registered and announced before the listener started: nothing to see
        assert browser.wait_for("charlie", timeout=1.0) is None
        publisher.announce()
        service = browser.wait_for("charlie", timeout=5.0)
        assert service is not None
        assert service.addresses == (shared.a_addr,)
        assert service.txt == TXT
        assert service.frames and all(f.dst == MDNS_GROUP and f.ttl == 255 for f in service.frames)
        assert browser.queries().queries == 0


def test_ssdp_search_finds_device_on_one_segment(shared: Topology) -> None:
    with SsdpDevice(shared.a) as device, SsdpSearcher(shared.b) as searcher:
        response = searcher.wait_for(device.udn, timeout=5.0)
        assert response is not None
        assert response.src == shared.a_addr
        assert response.location == device.location == f"http://{shared.a_addr}:8008/device.xml"
        assert response.ttl > 0
        usns = {r.usn for r in searcher.responses}
        assert f"{device.udn}::upnp:rootdevice" in usns
        # searched again: answered again, to the same port
        before = len(searcher.responses)
        searcher.search()
        assert searcher.wait_for(device.udn, timeout=5.0) is not None
        deadline = time.monotonic() + 5.0
        while len(searcher.responses) <= before and time.monotonic() < deadline:
            searcher.wait("response", timeout=0.1, skip=before)
        assert len(searcher.responses) > before


def test_packet_counter_sees_traffic(shared: Topology) -> None:
    idle = count_packets(shared.b, "eth0", 0.3)
    tx = TrafficSender(shared.a, "eth0")
    try:
        with counting(shared.b, "eth0") as burst:
            for seq in range(50):
                tx.send("224.0.0.251", 5353, make_payload(2, seq))
            time.sleep(0.2)  # let veth deliver the last of them before reading the counters
    finally:
        tx.close()
    assert burst.rx >= 50 > idle.rx
    assert burst.rx_rate > 0


def test_clients_accept_answers_from_any_source_port_and_ttl(lab: Lab, shared: Topology) -> None:
    """Neither client checks where an answer comes from, so a relay that
    rewrites source address, port and TTL does not stop it being heard.
    (RFC 6762 has receivers ignore responses not from port 5353, section 6,
    and from off-link sources, section 11: python-zeroconf does neither.)"""
    lab.ip(shared.a, "addr", "add", "203.0.113.5/32", "dev", "eth0")  # off-link for B
    tx = TrafficSender(shared.a, "eth0", ttl=1, source="203.0.113.5")  # from an ephemeral port
    try:
        with MdnsBrowser(shared.b, mode="passive") as browser:
            tx.send(MDNS_GROUP, MDNS_PORT, mdns_announcement("echo", "203.0.113.5", txt=TXT))
            service = browser.wait_for("echo", timeout=5.0)
            assert service is not None
            assert service.addresses == ("203.0.113.5",) and service.txt == TXT
            (frame,) = service.frames
            assert (frame.src, frame.ttl) == ("203.0.113.5", 1) and frame.sport != MDNS_PORT
        with SsdpSearcher(shared.b) as searcher:
            usn, location = "uuid:echo::upnp:rootdevice", "http://192.0.2.99:1/device.xml"
            tx.send(shared.b_addr, searcher.sport, ssdp_response(usn, "upnp:rootdevice", location))
            response = searcher.wait_for("uuid:echo", timeout=5.0)
            assert response is not None
            assert (response.src, response.ttl, response.location) == ("203.0.113.5", 1, location)
    finally:
        tx.close()


# Two segments, nothing relaying multicast: nothing is found.


def test_negative_control_mdns_across_unrelayed_segments(routed: Topology) -> None:
    # Browsers first, so the window covers the publisher's probes and
    # announcements too, and one more announcement on top.
    browsers: list[MdnsBrowser] = []
    try:
        for mode in ("browse", "qu", "passive"):
            browsers.append(MdnsBrowser(routed.b, mode=mode))
        with MdnsPublisher(routed.a, "delta", txt=TXT) as publisher:
            publisher.announce()
            deadline = time.monotonic() + NEGATIVE_TIMEOUT
            for browser in browsers:
                left = max(0.0, deadline - time.monotonic())
                assert browser.wait_for("delta", timeout=left) is None, browser.mode
        # B did ask (the taps count all of B's queries, not one browser's)
        assert browsers[0].queries().queries >= 2
    finally:
        for browser in browsers:
            browser.close()


def test_negative_control_ssdp_across_unrelayed_segments(routed: Topology) -> None:
    with SsdpDevice(routed.a), SsdpSearcher(routed.b) as searcher:
        assert searcher.wait_for(timeout=NEGATIVE_TIMEOUT) is None
        assert searcher.responses == []
