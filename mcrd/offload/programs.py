"""The eBPF programs that relay offloaded rules in the kernel, assembled here.

mcrd ships no object file and runs no compiler: this module writes the
programs as eBPF instructions and hands them to the kernel's verifier with
bpf(2). On each input interface, at the tc ingress hook (clsact, direct
action), before the IP stack and any packet socket:

- the dispatcher (`dispatch_program`) takes plain IPv4 without options, not
  a fragment, UDP, with consistent lengths; looks its (group, port, source)
  up in a hash map, then (group, port, any source); and tail-calls the
  program of the rule found, from a program array. Anything else goes on
  untouched (TC_ACT_UNSPEC: to the next filter, then the stack). A lookup
  costs the same for one rule or thousands.
- a rule's program (`rule_program`) takes a datagram no longer than the
  smallest MTU of its outputs and, for each output, writes the Ethernet
  addresses, the IP source and destination, the TTL and the UDP
  destination port into the packet, fixes both checksums incrementally
  (`bpf_l3_csum_replace`, `bpf_l4_csum_replace`, which also handle
  checksums left to the hardware and a UDP checksum of zero), counts, and
  transmits: a clone (`bpf_clone_redirect`) to every output but the last,
  the packet itself (`bpf_redirect`) to the last.

So each rule is its own program with its own counters (a per-CPU array:
packets and payload bytes for the rule, then for each output), added,
replaced (one atomic update of the program array) and removed alone. The
program builders are pure (maps are file descriptor numbers) and tested by
having the kernel run them on crafted packets; `mcrd.offload.bpf` loads
them. Depends only on `mcrd.offload.asm`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mcrd.offload.asm import (
    ADD,
    ALU,
    AND,
    DW,
    END,
    JEQ,
    JGT,
    JLT,
    JMP,
    JNE,
    RSH,
    SUB,
    TO_BE,
    XOR,
    B,
    EbpfAsm,
    H,
    Insn,
    W,
)

# helpers (include/uapi/linux/bpf.h)
MAP_LOOKUP_ELEM = 1
L3_CSUM_REPLACE = 10
L4_CSUM_REPLACE = 11
TAIL_CALL = 12
CLONE_REDIRECT = 13
REDIRECT = 23
F_PSEUDO_HDR = 0x10
F_MARK_MANGLED_0 = 0x20

# struct __sk_buff
SKB_LEN = 0
SKB_PKT_TYPE = 4
PACKET_MULTICAST = 2  # host, broadcast, multicast: the frames a host takes
SKB_VLAN_PRESENT = 20
SKB_DATA = 76
SKB_DATA_END = 80
SKB_GSO_SEGS = 164  # datagrams in an aggregate (0 or 1: a single one)
SKB_GSO_SIZE = 176  # payload bytes of each of them

TC_ACT_UNSPEC = -1
TC_ACT_SHOT = 2

# where things are in a frame: Ethernet, IPv4 without options, UDP
ETH_TYPE = 12
IP_VIHL, IP_LEN, IP_FRAG, IP_TTL, IP_PROTO, IP_CSUM, IP_SRC, IP_DST = 14, 16, 20, 22, 23, 24, 26, 30
UDP_DPORT, UDP_CSUM = 36, 40
HEADERS_END = 42
UDP_HEADERS = 28  # IPv4 + UDP header bytes, not counted as payload

# -- the relay program -------------------------------------------------------


@dataclass(frozen=True)
class KernelOutput:
    """One output of an offloaded rule, with everything resolved."""

    ifindex: int
    src_mac: str
    dst_mac: str
    src_ip: str
    group: str
    port: int
    ttl: int


@dataclass(frozen=True)
class KernelRule:
    group: str
    port: int
    source: str | None
    mtu: int  # largest IP datagram relayed; longer ones go to user space
    outputs: tuple[KernelOutput, ...] = field(default_factory=tuple)


def _raw32(addr: str) -> int:
    """An IPv4 address as a little-endian load of its bytes gives it."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


def _raw16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "big"), "little")


def _mac(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def _fold(total: int) -> int:
    """A ones'-complement sum folded into the 32 bits a checksum helper takes."""
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _not32(value: int) -> int:
    return ~value & 0xFFFFFFFF


def _not16(value: int) -> int:
    return ~value & 0xFFFF


def slot_size(rule: KernelRule) -> int:
    """Bytes of a rule's counters: packets and payload bytes, for the rule
    and for each output."""
    return 16 * (1 + len(rule.outputs))


def table_key(group: str, port: int, source: str | None) -> bytes:
    """A rule's key in the dispatch table: the datagram's destination
    address, port and source address (0.0.0.0: any), as in the packet."""
    return (
        ipaddress.IPv4Address(group).packed
        + port.to_bytes(2, "big")
        + b"\0\0"
        + ipaddress.IPv4Address(source or "0.0.0.0").packed
    )


TABLE_KEY_SIZE = 12


def _headers(a: EbpfAsm, ctx: int, short: str) -> None:
    """r2 = the frame's start, after checking that its Ethernet, IPv4 and
    UDP headers are there (else jump to `short`); r3, r4 clobbered. Again
    after every helper call, which invalidates packet pointers."""
    a.load(W, 2, ctx, SKB_DATA)
    a.load(W, 3, ctx, SKB_DATA_END)
    a.mov_reg(4, 2)
    a.alu(ADD, 4, HEADERS_END)
    a.jump_reg(JGT, 4, 3, short)


def dispatch_program(table_fd: int, programs_fd: int) -> list[Insn]:
    """The program attached to an input interface. For a datagram mcrd could
    relay (IPv4 without options, not a fragment, UDP, lengths consistent)
    it looks up (group, port, source) in the hash map `table_fd`, then
    (group, port, any source), and tail-calls the rule's program at the
    index found, in the program array `programs_fd`. Everything else, and
    what no rule takes, goes on untouched (TC_ACT_UNSPEC: to the next filter,
    then the stack)."""
    a = EbpfAsm()
    ctx = 6
    a.mov_reg(ctx, 1)
    a.load(W, 2, ctx, SKB_VLAN_PRESENT)
    a.jump(JMP, JNE, 2, 0, "pass")
    a.load(W, 2, ctx, SKB_PKT_TYPE)
    a.jump(JMP, JGT, 2, PACKET_MULTICAST, "pass")  # for another host: not ours, as in the worker
    _headers(a, ctx, "pass")
    a.load(H, 4, 2, ETH_TYPE)
    a.jump(JMP, JNE, 4, _raw16(0x0800), "pass")
    a.load(B, 4, 2, IP_VIHL)
    a.jump(JMP, JNE, 4, 0x45, "pass")
    a.load(H, 4, 2, IP_FRAG)
    a.alu(AND, 4, _raw16(0x3FFF))
    a.jump(JMP, JNE, 4, 0, "pass")
    a.load(B, 4, 2, IP_PROTO)
    a.jump(JMP, JNE, 4, 17, "pass")
    a.load(H, 5, 2, IP_LEN)
    a.emit(ALU | END | TO_BE, 5, imm=16)  # the IP length in host order
    a.jump(JMP, JLT, 5, UDP_HEADERS, "pass")  # malformed: for the stack to drop
    a.load(W, 1, ctx, SKB_LEN)
    a.alu(SUB, 1, IP_VIHL)
    a.jump_reg(JGT, 5, 1, "pass")  # longer than what arrived: likewise
    # the key, on the stack: destination, port, two zero bytes, source
    a.load(W, 3, 2, IP_DST)
    a.store(W, 10, -16, 3)
    a.load(H, 3, 2, UDP_DPORT)
    a.store(H, 10, -12, 3)
    a.store_imm(H, 10, -10, 0)
    a.load(W, 3, 2, IP_SRC)
    a.store(W, 10, -8, 3)
    for attempt in ("source", "any"):
        if attempt == "any":
            a.store_imm(W, 10, -8, 0)
        a.ld_map(1, table_fd)
        a.mov_reg(2, 10)
        a.alu(ADD, 2, -16)
        a.call(MAP_LOOKUP_ELEM)
        a.jump(JMP, JEQ, 0, 0, f"miss_{attempt}")
        a.load(W, 3, 0, 0)
        a.mov_reg(1, ctx)
        a.ld_map(2, programs_fd)
        a.call(TAIL_CALL)
        a.goto("pass")  # no program at that index (being replaced): the stack has it
        a.label(f"miss_{attempt}")
    a.label("pass")
    a.mov(0, TC_ACT_UNSPEC)
    a.exit()
    return a.assemble()


def rule_program(rule: KernelRule, counters_fd: int) -> list[Insn]:
    """The program of one rule, tail-called by the dispatcher for the
    datagrams of its group, port (and source): for each output, rewrite,
    fix the checksums, count (into slot 0 of `counters_fd`) and send. A
    datagram longer than the smallest output MTU goes on to the stack, and
    from there to the worker, which fragments it.

    An aggregate of datagrams (UDP GSO from a sender on this host or a veth
    peer, GRO) is relayed as one, with every datagram's headers rewritten
    alike: the output cuts it into its datagrams as it leaves (in software,
    or its NIC), each with its own length and checksum. It is counted as
    the datagrams it holds, and goes to the stack only if one of them, not
    the whole, is longer than the MTU."""
    a = EbpfAsm()
    ctx, saddr, ttlword, slot = 6, 7, 8, 9  # kept across helper calls
    a.mov_reg(ctx, 1)
    _headers(a, ctx, "pass")
    a.load(H, 5, 2, IP_LEN)
    a.emit(ALU | END | TO_BE, 5, imm=16)
    a.load(W, 1, ctx, SKB_GSO_SEGS)
    a.jump(JMP, JGT, 1, 1, "aggregate")
    a.jump(JMP, JGT, 5, rule.mtu, "pass")
    a.mov(1, 1)  # one datagram
    a.goto("sized")
    a.label("aggregate")
    a.load(W, 3, ctx, SKB_GSO_SIZE)  # each datagram's payload
    a.alu(ADD, 3, UDP_HEADERS)
    a.jump(JMP, JGT, 3, rule.mtu, "pass")
    a.label("sized")
    a.store(DW, 10, -24, 1)  # datagrams, kept on the stack across the helper calls
    a.load(W, saddr, 2, IP_SRC)
    a.load(H, ttlword, 2, IP_TTL)
    # payload bytes, kept on the stack across the helper calls
    a.alu(SUB, 5, UDP_HEADERS)
    a.store(DW, 10, -16, 5)
    # the rule's counters: one lookup, the value pointer stays valid
    a.store_imm(W, 10, -4, 0)
    a.ld_map(1, counters_fd)
    a.mov_reg(2, 10)
    a.alu(ADD, 2, -4)
    a.call(MAP_LOOKUP_ELEM)
    a.jump(JMP, JEQ, 0, 0, "pass")  # cannot happen: slot 0 exists
    a.mov_reg(slot, 0)
    _count(a, slot, 0)
    # what the header holds now, known except for the first output's source and TTL
    prev_src: int | None = None
    prev_dst, prev_port, prev_ttl = _raw32(rule.group), _raw16(rule.port), 0
    last = len(rule.outputs) - 1
    for i, out in enumerate(rule.outputs):
        _headers(a, ctx, "shot")
        dst_mac, src_mac = _mac(out.dst_mac), _mac(out.src_mac)
        a.store_imm(W, 2, 0, int.from_bytes(dst_mac[:4], "little"))
        a.store_imm(H, 2, 4, int.from_bytes(dst_mac[4:], "little"))
        a.store_imm(H, 2, 6, int.from_bytes(src_mac[:2], "little"))
        a.store_imm(W, 2, 8, int.from_bytes(src_mac[2:], "little"))
        src, dst, port = _raw32(out.src_ip), _raw32(out.group), _raw16(out.port)
        ttl = out.ttl | 17 << 8  # the TTL and protocol bytes as one 16-bit load gives them
        a.store_imm(W, 2, IP_SRC, src)
        a.store_imm(W, 2, IP_DST, dst)
        a.store_imm(B, 2, IP_TTL, out.ttl)
        a.store_imm(H, 2, UDP_DPORT, port)
        # checksum differences: ~old + new for each changed word
        pseudo = _not32(prev_dst) + dst + src + (_not32(prev_src) if prev_src is not None else 0)
        header = pseudo + ttl + (_not16(prev_ttl) if prev_src is not None else 0)
        ports = _not16(prev_port) + port
        if prev_src is None:  # the first output: the datagram's own source and TTL, at run time
            _diff(a, 4, header, saddr, ttlword)
        else:
            a.ld_imm64(4, _fold(header))
        _csum(a, ctx, L3_CSUM_REPLACE, IP_CSUM, 0)
        if prev_src is None:
            _diff(a, 4, pseudo, saddr, None)
        else:
            a.ld_imm64(4, _fold(pseudo))
        _csum(a, ctx, L4_CSUM_REPLACE, UDP_CSUM, F_PSEUDO_HDR | F_MARK_MANGLED_0)
        if port != prev_port:
            a.ld_imm64(4, _fold(ports))
            _csum(a, ctx, L4_CSUM_REPLACE, UDP_CSUM, F_MARK_MANGLED_0)
        prev_src, prev_dst, prev_port, prev_ttl = src, dst, port, ttl
        if i == last:
            _count(a, slot, 16 * (1 + i))
            a.mov(1, out.ifindex)
            a.mov(2, 0)
            a.call(REDIRECT)
            a.exit()
        else:
            a.mov_reg(1, ctx)
            a.mov(2, out.ifindex)
            a.mov(3, 0)
            a.call(CLONE_REDIRECT)
            a.jump(JMP, JNE, 0, 0, f"output{i}failed")
            _count(a, slot, 16 * (1 + i))
            a.label(f"output{i}failed")
    # the exits, last: no jump goes backwards
    a.label("pass")
    a.mov(0, TC_ACT_UNSPEC)
    a.exit()
    a.label("shot")
    a.mov(0, TC_ACT_SHOT)
    a.exit()
    return a.assemble()


def _count(a: EbpfAsm, slot: int, off: int) -> None:
    a.load(DW, 1, slot, off)
    a.load(DW, 2, 10, -24)
    a.alu_reg(ADD, 1, 2)
    a.store(DW, slot, off, 1)
    a.load(DW, 1, slot, off + 8)
    a.load(DW, 2, 10, -16)
    a.alu_reg(ADD, 1, 2)
    a.store(DW, slot, off + 8, 1)


def _diff(a: EbpfAsm, dst: int, constant: int, saddr: int, ttlword: int | None) -> None:
    """dst = fold(constant + ~saddr [+ ~ttlword]), the registers read at run time."""
    a.mov32_reg(dst, saddr)
    a.alu32(XOR, dst, 0xFFFFFFFF)
    if ttlword is not None:
        a.mov_reg(1, ttlword)
        a.alu(XOR, 1, 0xFFFF)
        a.alu_reg(ADD, dst, 1)
    a.ld_imm64(1, _fold(constant))
    a.alu_reg(ADD, dst, 1)
    for _ in range(2):
        a.mov_reg(1, dst)
        a.alu(RSH, 1, 32)
        a.mov32_reg(dst, dst)
        a.alu_reg(ADD, dst, 1)


def _csum(a: EbpfAsm, ctx: int, helper: int, offset: int, flags: int) -> None:
    """helper(skb, offset, 0, r4, flags): add the difference in r4."""
    a.mov_reg(1, ctx)
    a.mov(2, offset)
    a.mov(3, 0)
    a.mov(5, flags)
    a.call(helper)
