"""End to end: every field of a relayed datagram's IPv4 and UDP headers, as
it arrives behind the relay, the same on the user-space path and the kernel
path for the same rule (IP identification and checksums aside: a router's
differ too), and as docs/headers say for each output setting.

Each case runs the rule twice, in user space (`offload = "off"`) and with
`offload = "auto"`, sends the same datagrams (source port 4444, several
DSCP/ECN markings, with and without DF, several TTLs) and compares what a
packet tap behind the relay read. Where the kernel cannot apply a setting,
the rule must stay in user space and say why.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.net import inside
from tests.helpers.capture import Capture, Wire
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]

IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2
SENDER, SENDER_PORT, RELAY_OUT = "192.0.2.10", 4444, "198.51.100.1"
#: compared: all but the IP identification and the checksums
FIELDS = ("source", "dest", "sport", "dport", "ttl", "tos", "dont_fragment", "payload")


@dataclass(frozen=True)
class Sent:
    tos: int
    dont_fragment: bool
    ttl: int
    payload: bytes


#: markings EF+ECT(1), none, AF41+ECT(0), CS6; DF on and off; TTLs; sizes
#: that differ, so that no two go as one GSO run
SENT = [
    Sent(0xB9, True, 5, b"a" * 101),
    Sent(0x00, False, 64, b"b" * 202),
    Sent(0x8A, True, 9, b"c" * 303),
    Sent(0xC0, False, 2, b"d" * 404),
]


@dataclass(frozen=True)
class Case:
    output: str  # the output's extra keys
    group: str  # where it sends to
    expect: Callable[[Sent], dict[str, object]]  # the fields that differ from the defaults
    kernel: str = ""  # why the kernel path does not apply ("": it does)


def defaults(sent: Sent, group: str) -> dict[str, object]:
    """What a relayed datagram carries with no output setting."""
    return {
        "source": RELAY_OUT,  # the relay's address on the output interface
        "dest": group,
        "sport": SENDER_PORT,  # kept
        "dport": 6000,
        "ttl": 1 if group.startswith("239.") else 64,  # the output's TTL
        "tos": sent.tos,  # DSCP and ECN kept
        "dont_fragment": sent.dont_fragment,  # kept
        "payload": sent.payload,
    }


CASES = {
    "defaults": Case("", "239.2.2.2", lambda s: {}),
    "unicast output": Case("", "198.51.100.2", lambda s: {}),
    "ttl set": Case(", ttl = 8", "239.2.2.2", lambda s: {"ttl": 8}),
    "dscp set": Case(", dscp = 46", "239.2.2.2", lambda s: {"tos": 46 << 2 | s.tos & 3}, kernel="sets DSCP"),
    "source port set": Case(
        ", source_port = 7000", "239.2.2.2", lambda s: {"sport": 7000}, kernel="sets the source port"
    ),
    "ttl decremented": Case(
        ', ttl = "decrement"',
        "239.2.2.2",
        lambda s: {"ttl": s.ttl - 1} if s.ttl > 1 else {},
        kernel="decrements the TTL",
    ),
}


def relayed(
    net: Net, tmp_path: Path, daemons: list[Daemon], case: Case, offload: str, count: int
) -> list[Wire]:
    """What a tap behind the relay reads of SENT relayed by `case`'s rule
    (`count` datagrams)."""
    work = tmp_path / offload
    work.mkdir()
    text = (
        f'[daemon]\noffload = "{offload}"\n[[rule]]\nname = "stream"\n'
        'input = { interface = "in0", group = "239.1.1.1", port = 5000 }\n'
        f'outputs = [ {{ interface = "out0", group = "{case.group}", port = 6000{case.output} }} ]\n'
    )
    daemon = start_mcrd(net, work, daemons, text)
    (view,) = mcrctl_json(daemon.socket, "list")["rules"]
    if offload == "auto" and not case.kernel:
        wait_until(
            lambda: mcrctl_json(daemon.socket, "list")["rules"][0]["path"] == "kernel", what="offloaded"
        )
    elif offload == "auto":
        assert view["path"] == "user" and case.kernel in view["path_reason"], view
    tap = Capture(net.dst1, "eth0")
    with inside(net.src):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        sock.bind((SENDER, SENDER_PORT))
        for sent in SENT:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, sent.tos)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, sent.ttl)
            mode = IP_PMTUDISC_DO if sent.dont_fragment else IP_PMTUDISC_DONT
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
            sock.sendto(sent.payload, ("239.1.1.1", 5000))
    got = tap.wait_for(6000, count=count)
    tap.close()
    daemon.stop()
    daemons.remove(daemon)
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_both_paths_put_the_same_headers_on_the_wire(
    net: Net, tmp_path: Path, daemons: list[Daemon], name: str
) -> None:
    case = CASES[name]
    expected = [
        {**defaults(sent, case.group), **case.expect(sent)}
        for sent in SENT
        if not (case.kernel == "decrements the TTL" and sent.ttl == 1)  # expired: not relayed
    ]
    paths = {
        offload: relayed(net, tmp_path, daemons, case, offload, len(expected)) for offload in ("off", "auto")
    }
    for offload, got in paths.items():
        fields = [{k: getattr(w, k) for k in FIELDS} for w in sorted(got, key=lambda w: w.payload)]
        assert fields == expected, f"offload = {offload!r}"
