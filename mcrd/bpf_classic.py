"""The classic BPF socket filter on each input socket, as pure functions.

`build_filter` makes the program that lets through what a worker wants (its
`FilterEntry`s, at one of three precisions) and nothing the relay itself sent;
`compile_filters` encodes it as bytes for SO_ATTACH_FILTER. No sockets here:
tests run the program in an interpreter (tests/helpers/cbpf.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from enum import IntEnum

from mcrd.packet import FilterEntry

BPF_MAXINSNS = 4096
# The opcodes used, as linux/filter.h composes them (class | size | mode, or
# class | op | source): the interpreter in tests/helpers/cbpf.py reads them too.
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30  # A = packet[k], 4/2/1 bytes
LD_W_LEN = 0x80  # A = packet length
LDX_B_MSH = 0xB1  # X = 4 * (packet[k] & 0xf): the IPv4 header length
LD_H_IND = 0x48  # A = packet[X + k], 2 bytes
SUB_X = 0x1C  # A -= X
JA, JEQ, JGT, JGE, JSET = 0x05, 0x15, 0x25, 0x35, 0x45
RET_K = 0x06  # accept k bytes (0: drop)
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # an ancillary load: the packet type, not packet data
#: loads at SKF_NET_OFF + k read the network header's byte k, wherever it
#: is: the input sockets see frames from their link header (SOCK_RAW), whose
#: length depends on the interface (Ethernet, a tunnel without one)
SKF_NET_OFF = 0x100000000 - 0x100000


def net(offset: int) -> int:
    """The load offset of the IP header's byte `offset`."""
    return SKF_NET_OFF + offset


PACKET_MULTICAST = 2  # HOST=0, BROADCAST=1, MULTICAST=2; above: OTHERHOST, OUTGOING, LOOPBACK
ACCEPT_SNAPLEN = 0x40000
SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter

Insn = tuple[int, int, int, int]


class _Assembler:
    """Tiny assembler. Conditional jumps only skip the next instruction, which
    is a `ja` (32-bit offset), so programs of any length resolve."""

    def __init__(self) -> None:
        self.items: list[Insn | str | tuple[str, str]] = []

    def op(self, code: int, k: int = 0, jt: int = 0, jf: int = 0) -> None:
        self.items.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.items.append(name)

    def goto(self, label: str) -> None:
        self.items.append(("ja", label))

    def jump_if(self, code: int, k: int, label: str, *, negate: bool = False) -> None:
        self.op(code, k, jt=1 if negate else 0, jf=0 if negate else 1)
        self.goto(label)

    def dispatch(self, keys: list[int], target: Callable[[int], str], miss: str) -> None:
        """Jump to target(A) if the accumulator is one of `keys` (sorted),
        else to `miss`: a binary search, so a thousand groups cost about ten
        comparisons per packet, not a thousand."""
        if len(keys) <= 4:
            for key in keys:
                self.jump_if(JEQ, key, target(key))
            self.goto(miss)
            return
        mid = len(keys) // 2
        upper = f"u{len(self.items)}"
        self.jump_if(JGE, keys[mid], upper)
        self.dispatch(keys[:mid], target, miss)
        self.label(upper)
        self.dispatch(keys[mid:], target, miss)

    def assemble(self) -> list[Insn]:
        where: dict[str, int] = {}
        pos = 0
        for item in self.items:
            if isinstance(item, str):
                where[item] = pos
            else:
                pos += 1
        out: list[Insn] = []
        for item in self.items:
            if isinstance(item, str):
                continue
            if len(item) == 2:
                out.append((JA, 0, 0, where[item[1]] - len(out) - 1))
            else:
                out.append(item)
        return out


class FilterPrecision(IntEnum):
    """How much of a rule an input's socket filter checks; the worker
    matches the rest."""

    UDP = 0  # any IPv4 UDP datagram
    GROUPS = 1  # the rules' groups
    EXACT = 2  # group, port and source

    def __str__(self) -> str:
        return self.name.lower()


def build_filter(entries: Iterable[FilterEntry], precision: int = FilterPrecision.EXACT) -> list[Insn]:
    """The socket filter for one input interface.

    EXACT matches group, port and source; GROUPS matches groups only;
    UDP only IPv4 UDP. Fragments and short datagrams to a configured group are
    passed up so that the worker can count them as drops.
    """
    tree: dict[int, dict[int, set[int | None]]] = {}
    for e in entries:
        tree.setdefault(e.group, {}).setdefault(e.port, set()).add(e.source)
    a = _Assembler()
    a.op(LD_W_ABS, SKF_AD_PKTTYPE)  # our own transmissions and promiscuous captures: never
    a.jump_if(JGT, PACKET_MULTICAST, "reject")
    a.op(LD_W_LEN)
    a.jump_if(JGE, 20, "reject", negate=True)
    if precision == 0:
        a.op(LD_B_ABS, net(9))
        a.jump_if(JEQ, 17, "reject", negate=True)
        a.goto("accept")
    else:
        a.op(LD_W_ABS, net(16))
        a.dispatch(sorted(tree), lambda group: f"g{group}", "reject")
        for group, ports in sorted(tree.items()):
            a.label(f"g{group}")
            if precision == 1:
                a.goto("accept")
                continue
            a.op(LD_B_ABS, net(9))
            a.jump_if(JEQ, 17, "reject", negate=True)
            a.op(LD_H_ABS, net(6))
            a.jump_if(JSET, 0x3FFF, "accept")
            a.op(LDX_B_MSH, net(0))
            a.op(LD_W_LEN)
            a.op(SUB_X)
            a.jump_if(JGE, 8, "accept", negate=True)
            a.op(LD_H_IND, net(2))

            def port_label(port: int, group: int = group) -> str:
                return f"g{group}p{port}"

            a.dispatch(sorted(ports), port_label, "reject")
            for port, sources in sorted(ports.items()):
                a.label(f"g{group}p{port}")
                if None in sources:
                    a.goto("accept")
                    continue
                a.op(LD_W_ABS, net(12))
                a.dispatch(sorted(s for s in sources if s is not None), lambda _src: "accept", "reject")
    a.label("accept")
    a.op(RET_K, ACCEPT_SNAPLEN)
    a.label("reject")
    a.op(RET_K, 0)
    return a.assemble()


def compile_filters(entries: Iterable[FilterEntry]) -> list[tuple[bytes, FilterPrecision]]:
    """The filters within the kernel's instruction limit, most precise first,
    with their precision. The last one (precision 0) is a few instructions
    and always fits; the caller falls back to it when the kernel refuses a
    larger one (socket option memory, net.core.optmem_max)."""
    listed = list(entries)
    found = []
    for precision in sorted(FilterPrecision, reverse=True):
        program = build_filter(listed, precision)
        if len(program) <= BPF_MAXINSNS:
            found.append((b"".join(SOCK_FILTER.pack(*insn) for insn in program), precision))
    return found


def drop_all_filter() -> bytes:
    """A filter that accepts nothing: for sockets that only hold state."""
    return SOCK_FILTER.pack(RET_K, 0, 0, 0)
