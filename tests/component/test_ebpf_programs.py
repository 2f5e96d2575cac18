"""The relay program: assembled by mcrd, checked by the kernel's verifier and
run by the kernel on packets (BPF_PROG_TEST_RUN), without any network.

The kernel runs the program as tc would and hands back the packet as the
program left it: with the last output's rewriting done on top of the
earlier outputs' (the test run has no interface to clone to, so the
earlier outputs' clones fail, and are not counted), which exercises the
checksum arithmetic of every output.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from collections.abc import Iterator

import pytest

from mcrd.offload import asm, bpf, programs
from tests.helpers.daemon import needs_root
from tests.helpers.packets import eth_frame, inet_checksum, ipv4_udp

BPF_PROG_TEST_RUN = 10
TC_ACT_REDIRECT = 7


def frame(
    payload: bytes,
    *,
    src: str = "192.0.2.10",
    dst: str = "239.1.1.1",
    dport: int = 5000,
    ttl: int = 7,
    frag: int = 0,
    ihl: int = 5,
    length_delta: int = 0,
    udp_checksum: bool = True,
    dst_mac: str = "01005e010101",
) -> bytes:
    """An Ethernet frame with a valid IPv4/UDP datagram (unless told otherwise)."""
    total = 4 * ihl + 8 + len(payload) + length_delta
    packet = ipv4_udp(
        payload,
        src=src,
        dst=dst,
        sport=40000,
        dport=dport,
        ttl=ttl,
        frag=frag,
        ihl=ihl,
        total=total,
        ip_checksum=True,
        udp_checksum=udp_checksum,
    )
    return eth_frame(packet, dst_mac=dst_mac)


def valid(pkt: bytes) -> bool:
    ip = pkt[14:34]
    udp = pkt[34:]
    if inet_checksum(ip) != 0:
        return False
    if udp[6:8] == b"\0\0":
        return True
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    return inet_checksum(pseudo + udp) == 0


OUT_A = programs.KernelOutput(
    999_999, "02:00:00:00:00:0a", "01:00:5e:02:02:02", "198.51.100.1", "239.2.2.2", 6000, 1
)
OUT_B = programs.KernelOutput(
    1, "02:00:00:00:00:0b", "02:00:00:00:00:99", "203.0.113.1", "203.0.113.2", 6001, 64
)


class Loaded:
    """A dispatcher and its rules' programs, as mcrd's `Tc` sets them up,
    without an interface."""

    def __init__(self, rules: list[programs.KernelRule]) -> None:
        self.rules = rules
        self.table = bpf.create_table(16)
        self.programs = bpf.create_program_array(16)
        self.prog = bpf.load_program(programs.dispatch_program(self.table, self.programs), "mcrd_test")
        self.fds = [self.table, self.programs, self.prog]
        self.counters: list[int] = []
        for n, rule in enumerate(rules):
            counters = bpf.create_counters(1, programs.slot_size(rule))
            program = bpf.load_program(programs.rule_program(rule, counters), f"mcrd_test_{n}")
            self.fds += [counters, program]
            self.counters.append(counters)
            bpf.update(self.programs, n.to_bytes(4, "little"), program.to_bytes(4, "little"))
            bpf.update(
                self.table, programs.table_key(rule.group, rule.port, rule.source), n.to_bytes(4, "little")
            )

    def run(self, packet: bytes) -> tuple[int, bytes]:
        data_in = ctypes.create_string_buffer(packet, len(packet))
        data_out = ctypes.create_string_buffer(len(packet) + 256)
        attr = ctypes.create_string_buffer(80)
        struct.pack_into(
            "<IIIIQQII",
            attr,
            0,
            self.prog,
            0,
            len(packet),
            len(data_out),
            ctypes.addressof(data_in),
            ctypes.addressof(data_out),
            1,
            0,
        )
        bpf._bpf(BPF_PROG_TEST_RUN, attr)
        retval, _size_in, size_out = struct.unpack_from("<iII", attr, 4)
        return retval, data_out.raw[:size_out]

    def counts(self) -> list[list[int]]:
        return [
            bpf.read_counters(fd, 1, programs.slot_size(rule))[0]
            for fd, rule in zip(self.counters, self.rules, strict=True)
        ]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def loaded(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    prog = Loaded(request.param)
    try:
        yield prog
    finally:
        prog.close()


TWO_OUTPUTS = [programs.KernelRule("239.1.1.1", 5000, None, 1500, (OUT_A, OUT_B))]


@needs_root
@pytest.mark.parametrize("loaded", [TWO_OUTPUTS], indirect=True)
@pytest.mark.parametrize("udp_checksum", [True, False], ids=["udp-checksum", "no-udp-checksum"])
@pytest.mark.parametrize("size", [0, 1, 64, 1001, 1472])
def test_the_kernel_rewrites_with_valid_checksums(loaded: Loaded, size: int, udp_checksum: bool) -> None:
    payload = bytes((n * 7 + size) & 0xFF for n in range(size))
    for src, ttl in (("192.0.2.10", 7), ("198.51.100.200", 255), ("203.0.113.255", 1)):
        original = frame(payload, src=src, ttl=ttl, udp_checksum=udp_checksum)
        assert valid(original)
        retval, out = loaded.run(original)
        assert retval == TC_ACT_REDIRECT
        assert len(out) == len(original)
        assert out[0:6] == bytes.fromhex("020000000099") and out[6:12] == bytes.fromhex("02000000000b")
        assert out[26:30] == ipaddress.IPv4Address("203.0.113.1").packed
        assert out[30:34] == ipaddress.IPv4Address("203.0.113.2").packed
        assert out[22] == 64 and struct.unpack("!H", out[36:38]) == (6001,)
        assert out[42:] == payload and out[12:22] == original[12:22] and out[34:36] == original[34:36]
        assert valid(out), f"bad checksum from {src} ttl {ttl}"
        assert (out[40:42] == b"\0\0") == (not udp_checksum)  # a zero UDP checksum stays zero
    (counts,) = loaded.counts()
    # the rule: 3 datagrams of `size` bytes; output A's clones had nowhere to go; B took them
    assert counts == [3, 3 * size, 0, 0, 3, 3 * size]


@needs_root
@pytest.mark.parametrize(
    "loaded", [[programs.KernelRule("239.1.1.1", 5000, None, 100, (OUT_B,))]], indirect=True
)
def test_what_the_kernel_does_not_relay_goes_on_untouched(loaded: Loaded) -> None:
    others = {
        "another group": frame(b"x", dst="239.1.1.2"),
        "another port": frame(b"x", dport=5001),
        "a fragment": frame(b"x", frag=0x2000),
        "a later fragment": frame(b"x", frag=0x0010),
        "IP options": frame(b"x", ihl=6),
        "longer than the outputs' MTU": frame(b"x" * 100),
        "an IP length beyond the frame": frame(b"x", length_delta=10),
        "an IP length shorter than its headers": frame(b"", length_delta=-1),
        "not UDP": frame(b"x")[:23] + b"\x06" + frame(b"x")[24:],
        "not IPv4": frame(b"x")[:12] + b"\x08\x06" + frame(b"x")[14:],
        "runt": frame(b"x")[:40],
        "for another host": frame(b"x", dst_mac="020000000077"),  # seen in promiscuous mode
    }
    for what, packet in others.items():
        retval, out = loaded.run(packet)
        assert (retval, out) == (-1, packet), what  # TC_ACT_UNSPEC: on to the stack, unchanged
    assert loaded.counts() == [[0, 0, 0, 0]]
    assert loaded.run(frame(b"x", dst="239.1.1.1", dport=5000))[0] == TC_ACT_REDIRECT
    retval, _out = loaded.run(frame(b"x" * 72))  # exactly the MTU: relayed
    assert retval == TC_ACT_REDIRECT


SOURCES = [
    programs.KernelRule("239.1.1.1", 5000, "192.0.2.10", 1500, (OUT_B,)),
    programs.KernelRule("239.1.1.1", 5000, None, 1500, (OUT_A,)),
    programs.KernelRule("239.1.1.1", 5001, "192.0.2.10", 1500, (OUT_B,)),
]


@needs_root
@pytest.mark.parametrize("loaded", [SOURCES], indirect=True)
def test_a_source_specific_rule_wins_over_the_catch_all(loaded: Loaded) -> None:
    assert loaded.run(frame(b"a", src="192.0.2.10"))[0] == TC_ACT_REDIRECT
    assert loaded.run(frame(b"bb", src="192.0.2.11"))[0] == TC_ACT_REDIRECT
    assert loaded.run(frame(b"ccc", src="192.0.2.11", dport=5001))[0] == -1  # only from .10
    assert loaded.counts() == [[1, 1, 1, 1], [1, 2, 1, 2], [0, 0, 0, 0]]


def test_the_assembler_encodes_jumps_and_wide_constants() -> None:
    a = asm.EbpfAsm()
    a.jump(asm.JMP32, asm.JNE, 3, 0xEF0101FF, "out")
    a.ld_imm64(4, 0x1_2345_6789)
    a.label("out")
    a.exit()
    jne, lo, hi, ex = a.assemble()
    assert (jne.code, jne.dst, jne.off, jne.imm & 0xFFFFFFFF) == (0x56, 3, 2, 0xEF0101FF)
    assert (lo.code, lo.dst, lo.imm, hi.imm) == (0x18, 4, 0x23456789, 1)
    assert ex.encode() == bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
    program = programs.rule_program(TWO_OUTPUTS[0], 42)
    maps = [i for i in program if i.code == 0x18 and i.src == asm.PSEUDO_MAP_FD]
    assert maps and all(i.imm == 42 for i in maps)  # the counters map, by its descriptor
    assert programs.table_key("239.1.1.1", 5000, None) == bytes([239, 1, 1, 1, 0x13, 0x88, 0, 0, 0, 0, 0, 0])
