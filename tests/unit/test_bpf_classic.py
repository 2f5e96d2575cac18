"""The classic BPF socket filter: built, then run in an interpreter on
packets, without a socket."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from mcrd.bpf_classic import ACCEPT_SNAPLEN, BPF_MAXINSNS, build_filter, compile_filters
from mcrd.packet import FilterEntry, ip_to_int
from tests.helpers.cbpf import ETHERNET, run_filter
from tests.helpers.packets import ipv4_udp

HOST, BROADCAST, MULTICAST, OTHERHOST, OUTGOING = 0, 1, 2, 3, 4


ENTRIES = [
    FilterEntry(ip_to_int("239.1.1.1"), 5000, None),
    FilterEntry(ip_to_int("239.1.1.1"), 5002, None),
    FilterEntry(ip_to_int("239.1.1.5"), 5000, ip_to_int("192.0.2.10")),
    FilterEntry(ip_to_int("192.0.2.1"), 7000, None),
]


@pytest.mark.parametrize(
    ("packet", "pkttype", "accepted"),
    [
        (ipv4_udp(), MULTICAST, True),
        (ipv4_udp(dport=5002), MULTICAST, True),
        (ipv4_udp(dport=5001), MULTICAST, False),
        (ipv4_udp(dst="239.1.1.9"), MULTICAST, False),
        (ipv4_udp(dst="239.1.1.5"), MULTICAST, True),
        (ipv4_udp(dst="239.1.1.5", src="192.0.2.11"), MULTICAST, False),
        (ipv4_udp(dst="192.0.2.1", dport=7000), HOST, True),
        (ipv4_udp(), OUTGOING, False),
        (ipv4_udp(), OTHERHOST, False),
        (ipv4_udp(proto=6), MULTICAST, False),
        (ipv4_udp(frag=0x0010), MULTICAST, True),  # up to the worker, which counts it
        (ipv4_udp(dst="239.1.1.9", frag=0x0010), MULTICAST, False),
        (ipv4_udp()[:24], MULTICAST, True),  # short: counted as truncated
        (b"\x45\0\0", MULTICAST, False),
    ],
)
def test_exact_filter(packet: bytes, pkttype: int, accepted: bool) -> None:
    program = build_filter(ENTRIES, precision=2)
    assert run_filter(program, packet, pkttype) == (ACCEPT_SNAPLEN if accepted else 0)


def test_coarser_filters_still_pass_every_wanted_datagram() -> None:
    wanted = [
        ipv4_udp(),
        ipv4_udp(dport=5002),
        ipv4_udp(dst="239.1.1.5"),
        ipv4_udp(dst="192.0.2.1", dport=7000),
    ]
    for precision in (1, 0):
        program = build_filter(ENTRIES, precision)
        assert all(run_filter(program, p, MULTICAST) for p in wanted)
        assert not run_filter(program, ipv4_udp(), OUTGOING)
    assert not run_filter(build_filter(ENTRIES, 1), ipv4_udp(dst="239.1.1.9"), MULTICAST)
    assert run_filter(build_filter(ENTRIES, 1), ipv4_udp(dport=5001), MULTICAST)


def test_long_filters_resolve_far_jumps_and_degrade_to_fit() -> None:
    many = [FilterEntry(ip_to_int("239.1.0.0") + n, 5000 + n % 7, None) for n in range(600)]
    program = build_filter(many, 2)
    assert len(program) > 255  # beyond what an 8-bit conditional jump reaches
    assert run_filter(program, ipv4_udp(dst="239.1.2.87", dport=5000 + 599 % 7), MULTICAST)
    assert not run_filter(program, ipv4_udp(dst="239.1.2.87", dport=5000), MULTICAST)
    _, precision = compile_filters(many)[0]
    assert precision == 1 and len(build_filter(many, 1)) <= BPF_MAXINSNS
    _, precision = compile_filters(FilterEntry(n, 1, None) for n in range(5000))[0]
    assert precision == 0


def test_a_thousand_groups_cost_a_few_comparisons_per_packet() -> None:
    """The filter finds a group by binary search: the work per packet grows
    with log2(groups), so 1,000 rules cost about as much as ten."""
    groups = [ip_to_int("239.1.0.0") + 3 * n for n in range(1000)]
    program = build_filter([FilterEntry(g, 5000, None) for g in groups], 2)
    worst = 0
    for g in groups:
        steps: list[int] = []
        dst = str(ipaddress.IPv4Address(g))
        assert run_filter(program, ipv4_udp(dst=dst), MULTICAST, steps)
        assert not run_filter(program, ipv4_udp(dst=str(ipaddress.IPv4Address(g + 1))), MULTICAST)
        worst = max(worst, len(steps))
    few: list[int] = []
    run_filter(
        build_filter([FilterEntry(groups[0], 5000, None)], 2), ipv4_udp(dst="239.1.0.0"), MULTICAST, few
    )
    assert worst <= len(few) + 3 * 10, (worst, len(few))


def test_compiled_filter_is_the_kernel_layout() -> None:
    blob, precision = compile_filters(ENTRIES)[0]
    assert precision == 2
    assert len(blob) == 8 * len(build_filter(ENTRIES, 2))
    assert struct.unpack_from("=HBBI", blob, len(blob) - 8) == (0x06, 0, 0, 0)


@pytest.mark.parametrize(
    "link",
    [b"", ETHERNET, ETHERNET[:12] + bytes.fromhex("8100 0064 0800")],
    ids=["tunnel (no link header)", "ethernet", "vlan tag in the frame"],
)
def test_the_filter_reads_the_ip_header_wherever_the_link_header_ends(link: bytes) -> None:
    program = build_filter(ENTRIES, precision=2)
    assert run_filter(program, ipv4_udp(dst="239.1.1.5"), MULTICAST, link=link) == ACCEPT_SNAPLEN
    assert run_filter(program, ipv4_udp(dst="239.1.1.5", src="192.0.2.11"), MULTICAST, link=link) == 0
    assert run_filter(program, ipv4_udp(dport=5001), MULTICAST, link=link) == 0
