"""End to end: two-way discovery rules do not storm, with one relay and with
two relays bridging the same segments (the loop guard's duplicate window).

Each segment is a bridge in a namespace of its own, so that what one relay
sends on a segment reaches the hosts and the other relay on it, as on a
switch:

    hostA --- [segA bridge] --- relay1 --- [segB bridge] --- hostB
                   '----------- relay2 -----------'     (second test only)

The hosts chatter on 224.0.0.251:5353 at a steady rate, each datagram
different, for 30 s; captures on the hosts count what arrives. Without the
guard two relays would pass every datagram back and forth for ever: the
count would grow window by window, and traffic would go on after the
chatter stops. Both tests relay in user space (rules under the loop guard
are never offloaded; tests/e2e/test_discovery_wire.py checks that).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from lab.net import Lab, inside
from tests.helpers.capture import Capture
from tests.helpers.daemon import Daemon, needs_root

pytestmark = [needs_root, pytest.mark.netns]

MDNS = ("224.0.0.251", 5353)
RATE = 20  # datagrams per second from each host
RUN = 30.0  # seconds of chatter
WINDOWS = 3


def rules(a: str, b: str) -> str:
    return "".join(
        f'[[rule]]\nname = "{x}-to-{y}"\n'
        f'input = {{ interface = "{x}", group = "224.0.0.251", port = 5353 }}\n'
        f'outputs = [ {{ interface = "{y}", group = "224.0.0.251", ttl = 255 }} ]\n'
        for x, y in ((a, b), (b, a))
    )


def segment(lab: Lab, name: str) -> str:
    ns = lab.netns(name)
    lab.ip(ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
    lab.ip(ns, "link", "set", "br0", "up")
    return ns


def attach(lab: Lab, seg: str, port: str, ns: str, ifname: str, address: str) -> None:
    lab.link(ns, ifname, seg, port, address)
    lab.ip(seg, "link", "set", port, "master", "br0")


def chatter(ns: str, stop: threading.Event, tag: bytes) -> None:
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.bind(("0.0.0.0", 5353))
    start, n = time.monotonic(), 0
    while not stop.is_set():
        delay = start + n / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the sender
        sock.sendto(tag + b" %d" % n, MDNS)
        n += 1
    sock.close()


def run_chatter(hosts: dict[str, str], captures: dict[str, Capture]) -> list[dict[str, int]]:
    """Chatter from every host for RUN seconds; what each host received per window."""
    stop = threading.Event()
    threads = [threading.Thread(target=chatter, args=(ns, stop, tag.encode())) for tag, ns in hosts.items()]
    for t in threads:
        t.start()
    counts = []
    try:
        for _ in range(WINDOWS):
            for c in captures.values():
                c.seen.clear()
            deadline = time.monotonic() + RUN / WINDOWS
            while time.monotonic() < deadline:  # the windows are the measurement
                for c in captures.values():
                    c.poll(0.02)
            counts.append({name: len(c.matching(5353)) for name, c in captures.items()})
    finally:
        stop.set()
        for t in threads:
            t.join()
    return counts


def quiet_after(captures: dict[str, Capture]) -> int:
    """What still arrives one second after the chatter stopped: a storm keeps going."""
    time.sleep(0.5)  # what was in flight when the chatter stopped
    for c in captures.values():
        c.poll()
        c.seen.clear()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for c in captures.values():
            c.poll(0.05)
    return sum(len(c.matching(5353)) for c in captures.values())


def relay(lab: Lab, tmp_path: Path, name: str, seg_a: str, seg_b: str, n: int) -> Daemon:
    ns = lab.netns(name)
    attach(lab, seg_a, f"p{n}", ns, "a0", f"192.0.2.{n}/24")
    attach(lab, seg_b, f"p{n}", ns, "b0", f"198.51.100.{n}/24")
    work = tmp_path / name
    work.mkdir()
    config = work / "mcr.toml"
    # the first relay with a pair of rules, the second with the shorthand for it
    config.write_text(
        rules("a0", "b0")
        if n == 1
        else '[[reflect]]\nname = "mdns"\ninterfaces = ["a0", "b0"]\n'
        'group = "224.0.0.251"\nport = 5353\nttl = 255\n'
    )
    return Daemon(ns, config, work)


@pytest.mark.parametrize("relays", [1, 2], ids=["one-relay", "two-relays"])
def test_two_way_mdns_rules_do_not_storm(
    lab: Lab, tmp_path: Path, daemons: list[Daemon], relays: int
) -> None:
    seg_a, seg_b = segment(lab, "sega"), segment(lab, "segb")
    host_a, host_b = lab.netns("hosta"), lab.netns("hostb")
    attach(lab, seg_a, "p0", host_a, "eth0", "192.0.2.100/24")
    attach(lab, seg_b, "p0", host_b, "eth0", "198.51.100.100/24")
    for n in range(1, relays + 1):
        daemon = relay(lab, tmp_path, f"relay{n}", seg_a, seg_b, n)
        daemons.append(daemon)
        daemon.start()
    captures = {"a": Capture(host_a, "eth0"), "b": Capture(host_b, "eth0")}
    counts = run_chatter({"hostA": host_a, "hostB": host_b}, captures)
    sent = RATE * RUN / WINDOWS  # per host and window
    for window in counts:
        # each host hears the other's chatter once per relay, and its own
        # echoed back at most once per relay (the other relay's reflection)
        for name, got in window.items():
            assert got >= 0.8 * sent * relays, f"host {name} heard too little: {counts}"
            assert got <= 1.2 * sent * relays * (1 if relays == 1 else 2), (
                f"too much at host {name}: {counts}"
            )
    first, last = counts[0], counts[-1]
    assert all(last[k] <= 1.2 * first[k] for k in first), f"traffic grew: {counts}"
    assert quiet_after(captures) == 0
    for daemon in daemons:
        stats = {r["name"]: r for r in daemon.stats()["rules"]}
        if relays == 1:
            assert all(r["drops"]["loop"] == 0 for r in stats.values())
        else:
            assert sum(r["drops"]["loop"] for r in stats.values()) > 0
