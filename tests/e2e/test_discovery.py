"""End to end: real discovery clients find real services across mcrd.

    A eth0 192.0.2.10/24 --- in0 192.0.2.1/24 [R: mcrd] out0 198.51.100.1/24 --- eth0 198.51.100.2/24 B

R routes unicast between the segments (as a relay between VLANs usually
does) and runs mcrd with nothing but a pair of rules per protocol. The
clients are python-zeroconf and async-upnp-client (tests/helpers/discovery.py);
tests/e2e/test_discovery_harness.py shows that across R without mcrd they
find nothing. Each test runs with offload off and "auto" (where the rules
stay in user space, the kernel path cannot do what they need).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.net import Lab
from tests.helpers.daemon import Daemon, mcrctl_json, needs_root
from tests.helpers.discovery import (
    MdnsBrowser,
    MdnsPublisher,
    SsdpDevice,
    SsdpSearcher,
    Topology,
    routed_segments,
)

pytestmark = [needs_root, pytest.mark.netns]

TXT = {"path": "/printer", "v": "2"}


def pair(group: str, port: int, ttl: int) -> str:
    return "".join(
        f'[[rule]]\nname = "{port}-{a}-to-{b}"\n'
        f'input = {{ interface = "{a}", group = "{group}", port = {port} }}\n'
        f'outputs = [ {{ interface = "{b}", group = "{group}", ttl = {ttl} }} ]\n'
        for a, b in (("in0", "out0"), ("out0", "in0"))
    )


@pytest.fixture(params=["off", "auto"], ids=["user", "kernel"])
def relayed(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Topology]:
    topo = routed_segments(lab)
    assert topo.relay is not None
    config = tmp_path / "mcr.toml"
    config.write_text(
        f'[daemon]\noffload = "{request.param}"\n'
        + pair("224.0.0.251", 5353, 255)
        + pair("239.255.255.250", 1900, 2)
    )
    daemon = Daemon(topo.relay, config, tmp_path).start()
    try:
        yield topo
        rules = mcrctl_json(daemon.socket, "list")["rules"]
        assert all(r["state"] == "active" and r["path"] == "user" for r in rules)
    finally:
        daemon.stop()


@pytest.mark.parametrize("direction", ["a-to-b", "b-to-a"])
def test_a_service_is_discovered_and_resolved_across_the_relay(relayed: Topology, direction: str) -> None:
    t = relayed
    home, away, home_addr, relay_away = (
        (t.a, t.b, t.a_addr, t.relay_b_addr)
        if direction == "a-to-b"
        else (t.b, t.a, t.b_addr, t.relay_a_addr)
    )
    with MdnsPublisher(home, "printer", port=631, txt=TXT), MdnsBrowser(away) as browser:
        service = browser.wait_for("printer", timeout=10.0)
        assert service is not None, "not discovered"
        assert service.name == "printer._mcrdtest._tcp.local."
        assert (service.addresses, service.port, service.txt) == ((home_addr,), 631, TXT)
        # what reached the browser came from the relay, as RFC 6762 wants it
        assert service.frames
        assert all((f.src, f.sport, f.ttl) == (relay_away, 5353, 255) for f in service.frames)


def test_a_question_asking_for_a_unicast_answer_is_answered(relayed: Topology) -> None:
    """Every query the browser sends is QU; relayed as QM, the answer comes
    back by multicast through the other rule."""
    t = relayed
    with MdnsPublisher(t.a, "scanner", txt=TXT), MdnsBrowser(t.b, mode="qu") as browser:
        service = browser.wait_for("scanner", timeout=10.0)
        assert service is not None, "a QU query went unanswered"
        assert service.addresses == (t.a_addr,) and service.txt == TXT
        assert all(f.multicast and f.src == t.relay_b_addr for f in service.frames)
        stats = browser.queries()
        assert stats.queries >= 1 and stats.qu == stats.queries


def test_an_announcement_crosses_on_its_own(relayed: Topology) -> None:
    t = relayed
    with MdnsPublisher(t.a, "speaker", txt=TXT) as publisher, MdnsBrowser(t.b, mode="passive") as browser:
        publisher.announce()
        service = browser.wait_for("speaker", timeout=10.0)
        assert service is not None, "the announcement did not cross"
        assert service.addresses == (t.a_addr,)
        assert browser.queries().queries == 0  # nothing asked: the announcement alone


@pytest.mark.parametrize("direction", ["a-to-b", "b-to-a"])
def test_an_ssdp_search_finds_the_device_across_the_relay(relayed: Topology, direction: str) -> None:
    t = relayed
    home, away, home_addr = (t.a, t.b, t.a_addr) if direction == "a-to-b" else (t.b, t.a, t.b_addr)
    with SsdpDevice(home) as device, SsdpSearcher(away) as searcher:
        response = searcher.wait_for(device.udn, timeout=10.0)
        assert response is not None, "the search went unanswered"
        # answered by the device itself, by unicast to the searcher's port, routed by R
        assert response.src == home_addr
        assert response.location == device.location == f"http://{home_addr}:8008/device.xml"
        assert f"{device.udn}::upnp:rootdevice" in {r.usn for r in searcher.responses}
