"""End to end: one input to 500 outputs, each with a socket of its own (two
interfaces, 250 TTLs each), so the worker's configuration carries 501
descriptors: more than one SCM_RIGHTS message can (253). Every datagram
must reach all 500 groups, on both paths (the kernel's program clones it
499 times)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.net import TrafficSender
from tests.helpers.capture import Capture
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd

pytestmark = [needs_root, pytest.mark.netns]

OUTPUTS = 500


def destination(k: int) -> tuple[str, str, int]:
    """Output k: its group, interface and TTL (each (interface, TTL) once)."""
    return f"239.3.{k // 250}.{k % 250 + 1}", f"out{k % 2}", k // 2 + 1


@pytest.mark.parametrize("offload", ["off", "auto"], ids=["user", "kernel"])
def test_one_input_to_500_outputs(net: Net, tmp_path: Path, daemons: list[Daemon], offload: str) -> None:
    outs = ",\n".join(
        f'  {{ interface = "{iface}", group = "{group}", port = 6000, ttl = {ttl} }}'
        for group, iface, ttl in map(destination, range(OUTPUTS))
    )
    text = (
        f'[daemon]\noffload = "{offload}"\n[[rule]]\nname = "wide"\n'
        f'input = {{ interface = "in0", group = "239.1.1.1", port = 5000 }}\noutputs = [\n{outs}\n]\n'
    )
    daemon = start_mcrd(net, tmp_path, daemons, text)
    (view,) = mcrctl_json(daemon.socket, "list")["rules"]
    assert view["state"] == "active" and all(o["state"] == "active" for o in view["outputs"])
    assert view["path"] == ("kernel" if offload == "auto" else "user"), view["path_reason"]
    captures = {"out0": Capture(net.dst1, "eth0"), "out1": Capture(net.dst2, "eth0")}
    tx = TrafficSender(net.src, "eth0", ttl=8)
    # sizes differ: a run of equal ones leaves as one UDP GSO message, which
    # a veth hands to the captures whole (sockets would get datagrams)
    payloads = [b"wide" + b"!" * n for n in range(3)]
    for payload in payloads:
        tx.send("239.1.1.1", 5000, payload)
    for payload in payloads:
        for iface, capture in captures.items():
            got = capture.wait_for(6000, payload, count=OUTPUTS // 2, timeout=10.0)
            want = {(g, t) for g, i, t in map(destination, range(OUTPUTS)) if i == iface}
            assert {(w.dest, w.ttl) for w in got} == want, f"{iface}: {len(got)} of {len(want)}"
    stats = daemon.rule_stats("wide")
    assert sum(o["packets"] for o in stats["outputs"]) == 3 * OUTPUTS
