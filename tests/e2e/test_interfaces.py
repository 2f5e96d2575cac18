"""End to end: inputs on bridge ports, and multicast on interfaces without it.

    src eth0 192.0.2.10 --- in0 ┐
                                 br0 192.0.2.1 [relay] out0 198.51.100.1 --- eth0 198.51.100.2 dst1
    bystander eth0 192.0.2.20 --- lan0 ┘

in0 and lan0 are ports of the bridge br0 in the relay's namespace. A rule on
a bridge port would relay nothing (the bridge takes the port's frames first)
or, offloaded, take the frames from the bridge: mcrd keeps it pending and
says to use the bridge. On br0 it relays, and the bridge still forwards the
stream to its other port. Both paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.net import Lab, Receiver, TrafficSender, run
from tests.helpers.daemon import Daemon, mcrctl, mcrctl_json, needs_root, wait_until
from tests.helpers.streams import assert_stream

pytestmark = [needs_root, pytest.mark.netns]


def rule(interface: str, offload: str) -> str:
    return (
        f'[daemon]\noffload = "{offload}"\n[[rule]]\nname = "camera"\n'
        f'input = {{ interface = "{interface}", group = "239.1.1.1", port = 5000 }}\n'
        'outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]\n'
    )


@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
def test_a_bridge_port_input_is_refused_with_what_to_use_and_the_bridge_works(
    lab: Lab, tmp_path: Path, daemons: list[Daemon], offload: str
) -> None:
    src, relay, bystander, dst = (lab.netns(r) for r in ("src", "relay", "bystander", "dst"))
    lab.link(src, "eth0", relay, "in0", "192.0.2.10/24")
    lab.link(bystander, "eth0", relay, "lan0", "192.0.2.20/24")
    lab.link(relay, "out0", dst, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    lab.ip(relay, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
    lab.ip(relay, "addr", "add", "192.0.2.1/24", "dev", "br0")
    for port in ("in0", "lan0"):
        lab.ip(relay, "link", "set", port, "master", "br0")
    lab.ip(relay, "link", "set", "br0", "up")
    if offload == "auto":  # checksums computed in software, so the receiver's tap can verify them
        run("ip", "netns", "exec", relay, "ethtool", "-K", "out0", "tx", "off")
    config = tmp_path / "mcr.toml"
    config.write_text(rule("in0", offload))
    daemon = Daemon(relay, config, tmp_path)
    daemons.append(daemon)
    daemon.start(all_active=False)
    (view,) = mcrctl_json(daemon.socket, "list")["rules"]
    assert view["state"] == "pending"
    assert view["reason"] == (
        "in0 is a port of bridge br0, which takes its frames: use br0 (or a VLAN device on it) as the input"
    )
    assert view["path"] == "user"
    if offload == "auto":
        assert view["path_reason"] == "input in0 is a bridge port"
    assert "use br0" in mcrctl(daemon.socket, "list").stdout
    assert "in0 is a port of bridge br0" in daemon.log.read_text()

    config.write_text(rule("br0", offload))
    mcrctl(daemon.socket, "reload", "--unchanged-ok")  # the file watcher may have been first
    wait_until(
        lambda: mcrctl_json(daemon.socket, "list")["rules"][0]["state"] == "active", what="active on br0"
    )
    if offload == "auto":
        wait_until(
            lambda: mcrctl_json(daemon.socket, "list")["rules"][0]["path"] == "kernel", what="offloaded"
        )
    relayed = Receiver(dst, "239.2.2.2", 6000, "eth0")
    bridged = Receiver(bystander, "239.1.1.1", 5000, "eth0")
    TrafficSender(src, "eth0", ttl=8).stream("239.1.1.1", 5000, stream=7, count=300)
    assert_stream(relayed, 7, 300, "239.2.2.2", 6000, ttl=1, offload=offload)
    assert_stream(bridged, 7, 300, "239.1.1.1", 5000, ttl=8, offload="off")


def test_multicast_on_an_interface_without_it_is_warned_of(
    lab: Lab, tmp_path: Path, daemons: list[Daemon]
) -> None:
    src, relay, dst = lab.netns("src"), lab.netns("relay"), lab.netns("dst")
    lab.link(src, "eth0", relay, "in0", "192.0.2.10/24", "192.0.2.1/24")
    lab.link(relay, "tun0", dst, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    lab.ip(relay, "link", "set", "tun0", "multicast", "off")  # as WireGuard and p2p tunnels are
    config = tmp_path / "mcr.toml"
    config.write_text(rule("in0", "off").replace("out0", "tun0"))
    daemon = Daemon(relay, config, tmp_path)
    daemons.append(daemon)
    daemon.start()
    (view,) = mcrctl_json(daemon.socket, "list")["rules"]
    warning = "output 239.2.2.2:6000 on tun0 ttl 1: tun0 does not do multicast (no IFF_MULTICAST)"
    assert view["state"] == "active" and view["warnings"] == [warning]
    assert f"warning: {view['id']} camera: {warning}" in mcrctl(daemon.socket, "list").stdout
    assert f"rule camera: {warning}" in daemon.log.read_text()
    lab.ip(relay, "link", "set", "tun0", "multicast", "on")
    wait_until(
        lambda: mcrctl_json(daemon.socket, "list")["rules"][0]["warnings"] == [], what="the warning gone"
    )
