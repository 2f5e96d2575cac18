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
having the kernel run them on crafted packets; the syscalls at the bottom
are the adapter.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import os
import platform
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

# -- instruction encoding ----------------------------------------------------

# classes
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
# sizes and modes
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
# ALU operations, jumps
ADD, SUB, RSH, AND, XOR, MOV, END = 0x00, 0x10, 0x70, 0x50, 0xA0, 0xB0, 0xD0
K, X = 0x00, 0x08
JA, JEQ, JGT, JNE, CALL, EXIT, JLT = 0x00, 0x10, 0x20, 0x50, 0x80, 0x90, 0xA0
TO_BE = 0x08
PSEUDO_MAP_FD = 1

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

TC_ACT_UNSPEC = -1
TC_ACT_SHOT = 2

# where things are in a frame: Ethernet, IPv4 without options, UDP
ETH_TYPE = 12
IP_VIHL, IP_LEN, IP_FRAG, IP_TTL, IP_PROTO, IP_CSUM, IP_SRC, IP_DST = 14, 16, 20, 22, 23, 24, 26, 30
UDP_DPORT, UDP_CSUM = 36, 40
HEADERS_END = 42
UDP_HEADERS = 28  # IPv4 + UDP header bytes, not counted as payload


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, self.dst | self.src << 4, self.off, self.imm)


def _s32(value: int) -> int:
    """An unsigned 32-bit value as the signed immediate the encoding holds."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class Asm:
    """An eBPF assembler with labels for forward jumps."""

    def __init__(self) -> None:
        self.code: list[Insn | tuple[int, int, int, str]] = []
        self.labels: dict[str, int] = {}

    def emit(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.code.append(Insn(code, dst, src, off, imm))

    def label(self, name: str) -> None:
        assert name not in self.labels, name
        self.labels[name] = len(self.code)

    # loads, stores, arithmetic
    def load(self, size: int, dst: int, src: int, off: int) -> None:
        self.emit(LDX | MEM | size, dst, src, off)

    def store_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        self.emit(ST | MEM | size, dst, 0, off, _s32(imm))

    def store(self, size: int, dst: int, off: int, src: int) -> None:
        self.emit(STX | MEM | size, dst, src, off)

    def mov(self, dst: int, imm: int) -> None:
        self.emit(ALU64 | MOV | K, dst, 0, 0, imm)

    def mov_reg(self, dst: int, src: int) -> None:
        self.emit(ALU64 | MOV | X, dst, src)

    def mov32_reg(self, dst: int, src: int) -> None:  # zero-extends
        self.emit(ALU | MOV | X, dst, src)

    def alu(self, op: int, dst: int, imm: int) -> None:
        self.emit(ALU64 | op | K, dst, 0, 0, imm)

    def alu_reg(self, op: int, dst: int, src: int) -> None:
        self.emit(ALU64 | op | X, dst, src)

    def alu32(self, op: int, dst: int, imm: int) -> None:
        self.emit(ALU | op | K, dst, 0, 0, _s32(imm))

    def ld_imm64(self, dst: int, value: int, src: int = 0) -> None:
        self.emit(LD | DW | IMM, dst, src, 0, _s32(value))
        self.emit(0, 0, 0, 0, _s32(value >> 32))

    def ld_map(self, dst: int, fd: int) -> None:
        self.emit(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd)
        self.emit(0)

    def call(self, helper: int) -> None:
        self.emit(JMP | CALL, imm=helper)

    def exit(self) -> None:
        self.emit(JMP | EXIT)

    # jumps to labels
    def jump(self, cls: int, op: int, dst: int, imm: int, label: str) -> None:
        self.code.append((cls | op | K, dst, _s32(imm), label))

    def jump_reg(self, op: int, dst: int, src: int, label: str) -> None:
        self.code.append((JMP | op | X, dst | src << 4, 0, label))

    def goto(self, label: str) -> None:
        self.code.append((JMP | JA, 0, 0, label))

    def assemble(self) -> list[Insn]:
        out: list[Insn] = []
        for pc, item in enumerate(self.code):
            if isinstance(item, Insn):
                out.append(item)
                continue
            code, regs, imm, label = item
            off = self.labels[label] - pc - 1
            assert -(1 << 15) <= off < 1 << 15, f"jump to {label} out of range"
            out.append(Insn(code, regs & 0xF, regs >> 4, off, imm))
        return out


def encode(program: Sequence[Insn]) -> bytes:
    return b"".join(i.encode() for i in program)


# -- the relay program -------------------------------------------------------


@dataclass(frozen=True)
class Output:
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
    outputs: tuple[Output, ...] = field(default_factory=tuple)


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


def _headers(a: Asm, ctx: int, short: str) -> None:
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
    a = Asm()
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
    from there to the worker, which fragments it."""
    a = Asm()
    ctx, saddr, ttlword, slot = 6, 7, 8, 9  # kept across helper calls
    a.mov_reg(ctx, 1)
    _headers(a, ctx, "pass")
    a.load(H, 5, 2, IP_LEN)
    a.emit(ALU | END | TO_BE, 5, imm=16)
    a.jump(JMP, JGT, 5, rule.mtu, "pass")
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


def _count(a: Asm, slot: int, off: int) -> None:
    a.load(DW, 1, slot, off)
    a.alu(ADD, 1, 1)
    a.store(DW, slot, off, 1)
    a.load(DW, 1, slot, off + 8)
    a.load(DW, 2, 10, -16)
    a.alu_reg(ADD, 1, 2)
    a.store(DW, slot, off + 8, 1)


def _diff(a: Asm, dst: int, constant: int, saddr: int, ttlword: int | None) -> None:
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


def _csum(a: Asm, ctx: int, helper: int, offset: int, flags: int) -> None:
    """helper(skb, offset, 0, r4, flags): add the difference in r4."""
    a.mov_reg(1, ctx)
    a.mov(2, offset)
    a.mov(3, 0)
    a.mov(5, flags)
    a.call(helper)


# -- bpf(2) ----------------------------------------------------------------

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD = 0, 1, 2, 3, 5
MAP_TYPE_HASH, MAP_TYPE_PROG_ARRAY, MAP_TYPE_PERCPU_ARRAY = 1, 3, 6
F_NO_PREALLOC = 1
PROG_TYPE_SCHED_CLS = 3
LICENSE = b"Dual MIT/GPL"  # mcrd is MIT; the kernel wants a GPL-compatible string for some helpers
_SYSCALL = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "riscv64": 280}

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    number = _SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) is not known on {platform.machine()}")
    result = int(_libc.syscall(number, cmd, ctypes.byref(attr), len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _attr(*fields: tuple[str, int], size: int = 128) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(size)
    offset = 0
    for fmt, value in fields:
        width = struct.calcsize("<" + fmt)
        offset = -(-offset // width) * width  # natural alignment, as the C struct
        struct.pack_into("<" + fmt, buf, offset, value)
        offset += width
    return buf


def create_map(kind: int, key_size: int, value_size: int, entries: int, flags: int = 0) -> int:
    attr = _attr(("I", kind), ("I", key_size), ("I", value_size), ("I", entries), ("I", flags))
    return _bpf(BPF_MAP_CREATE, attr)


def create_table(entries: int) -> int:
    """The dispatch table: (group, port, source) -> index in the program array."""
    return create_map(MAP_TYPE_HASH, TABLE_KEY_SIZE, 4, entries, F_NO_PREALLOC)


def create_program_array(entries: int) -> int:
    return create_map(MAP_TYPE_PROG_ARRAY, 4, 4, entries)


def create_counters(entries: int, value_size: int) -> int:
    """A per-CPU array map; returns its file descriptor."""
    return create_map(MAP_TYPE_PERCPU_ARRAY, 4, value_size, max(entries, 1))


def update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(
        BPF_MAP_UPDATE_ELEM,
        _attr(("I", fd), ("Q", ctypes.addressof(k)), ("Q", ctypes.addressof(v)), ("Q", 0)),
    )


def delete(fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    _bpf(BPF_MAP_DELETE_ELEM, _attr(("I", fd), ("Q", ctypes.addressof(k))))


@functools.cache
def possible_cpus() -> int:
    """How many per-CPU values a per-CPU map has: the kernel's possible CPUs."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def read_counters(fd: int, entries: int, value_size: int) -> list[list[int]]:
    """Each slot's 64-bit counters, summed over the CPUs."""
    cpus = possible_cpus()
    stride = -(-value_size // 8) * 8
    value = ctypes.create_string_buffer(stride * cpus)
    key = ctypes.c_uint32()
    slots: list[list[int]] = []
    for n in range(entries):
        key.value = n
        attr = _attr(("I", fd), ("Q", ctypes.addressof(key)), ("Q", ctypes.addressof(value)), ("Q", 0))
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        words = value_size // 8
        totals = [0] * words
        for cpu in range(cpus):
            for w, v in enumerate(struct.unpack_from(f"<{words}Q", value, cpu * stride)):
                totals[w] += v
        slots.append(totals)
    return slots


def load_program(program: Sequence[Insn], name: str) -> int:
    """Load a tc classifier; returns its file descriptor. A refusal raises
    OSError with the verifier's last words."""
    if sys.byteorder != "little":
        raise OSError(errno.ENOTSUP, "the relay program is written for little-endian machines")
    code = ctypes.create_string_buffer(encode(program))
    license_ = ctypes.create_string_buffer(LICENSE)
    log = ctypes.create_string_buffer(1 << 20)

    def attempt(level: int) -> int:
        attr = _attr(
            ("I", PROG_TYPE_SCHED_CLS),
            ("I", len(program)),
            ("Q", ctypes.addressof(code)),
            ("Q", ctypes.addressof(license_)),
            ("I", level),
            ("I", len(log) if level else 0),
            ("Q", ctypes.addressof(log) if level else 0),
        )
        struct.pack_into("16s", attr, 48, name.encode()[:15])  # prog_name
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(0)
    except OSError:
        pass
    try:  # again, for the verifier's reasons
        return attempt(1)
    except OSError as exc:
        text = log.value.decode(errors="replace").strip().splitlines()
        detail = "; ".join(text[-3:]) if text else ""
        why = f"the kernel refused the eBPF program: {exc.strerror}" + (f" ({detail})" if detail else "")
        raise OSError(exc.errno, why) from None
