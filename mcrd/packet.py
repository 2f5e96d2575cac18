"""IPv4/UDP parsing and the kernel socket filter, as pure functions.

The worker's receive socket is an AF_PACKET SOCK_DGRAM socket, so every buffer
here starts at the IPv4 header (the link header is already stripped, which
also makes tunnels and VLAN sub-interfaces look the same as Ethernet).
No sockets here: `compile_filter` returns the classic BPF program as bytes for
SO_ATTACH_FILTER, and is tested by reading it back.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

#: Why a received frame was not relayed. The order is the order of the checks.
DROP_REASONS = ("truncated", "malformed", "fragment", "unmatched", "overflow")

_HDR = struct.Struct("!BBHHHBBHII")  # IPv4 header without options
_UDP = struct.Struct("!HHHH")


class Datagram(NamedTuple):
    source: int
    group: int
    port: int
    start: int  # payload offset in the buffer
    end: int


def parse(buf: bytes | bytearray | memoryview, size: int) -> Datagram | str:
    """Parse an IPv4/UDP datagram; return it, or the drop reason as a string."""
    if size < 20:
        return "truncated"
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _HDR.unpack_from(buf, 0)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or total < ihl:
        return "malformed"
    if total > size:
        return "truncated"
    if frag & 0x3FFF:  # more-fragments flag or a fragment offset
        return "fragment"
    if proto != 17:
        return "unmatched"
    if total < ihl + 8:
        return "truncated"
    _sport, dport, ulen, _ucsum = _UDP.unpack_from(buf, ihl)
    if ulen < 8 or ulen > total - ihl:
        return "malformed"
    return Datagram(src, dst, dport, ihl + 8, ihl + ulen)


def ip_to_int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


# --- classic BPF -----------------------------------------------------------

BPF_MAXINSNS = 4096
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_W_LEN = 0x80
_LDX_B_MSH = 0xB1
_LD_H_IND = 0x48
_SUB_X = 0x1C
_JA, _JEQ, _JGT, _JGE, _JSET = 0x05, 0x15, 0x25, 0x35, 0x45
_RET_K = 0x06
_SKF_AD_PKTTYPE = 0xFFFFF000 + 4
_PACKET_MULTICAST = 2  # HOST=0, BROADCAST=1, MULTICAST=2; above: OTHERHOST, OUTGOING, LOOPBACK
ACCEPT_SNAPLEN = 0x40000
_SOCK_FILTER = struct.Struct("=HBBI")

Insn = tuple[int, int, int, int]


class _Asm:
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
                self.jump_if(_JEQ, key, target(key))
            self.goto(miss)
            return
        mid = len(keys) // 2
        upper = f"u{len(self.items)}"
        self.jump_if(_JGE, keys[mid], upper)
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
                out.append((_JA, 0, 0, where[item[1]] - len(out) - 1))
            else:
                out.append(item)
        return out


class FilterEntry(NamedTuple):
    group: int
    port: int
    source: int | None


def build_filter(entries: Iterable[FilterEntry], precision: int = 2) -> list[Insn]:
    """The socket filter for one input interface.

    precision 2 matches group, port and source exactly; 1 matches groups only;
    0 only IPv4 UDP. Fragments and short datagrams to a configured group are
    passed up so that the worker can count them as drops.
    """
    tree: dict[int, dict[int, set[int | None]]] = {}
    for e in entries:
        tree.setdefault(e.group, {}).setdefault(e.port, set()).add(e.source)
    a = _Asm()
    a.op(_LD_W_ABS, _SKF_AD_PKTTYPE)  # our own transmissions and promiscuous captures: never
    a.jump_if(_JGT, _PACKET_MULTICAST, "reject")
    a.op(_LD_W_LEN)
    a.jump_if(_JGE, 20, "reject", negate=True)
    if precision == 0:
        a.op(_LD_B_ABS, 9)
        a.jump_if(_JEQ, 17, "reject", negate=True)
        a.goto("accept")
    else:
        a.op(_LD_W_ABS, 16)
        a.dispatch(sorted(tree), lambda group: f"g{group}", "reject")
        for group, ports in sorted(tree.items()):
            a.label(f"g{group}")
            if precision == 1:
                a.goto("accept")
                continue
            a.op(_LD_B_ABS, 9)
            a.jump_if(_JEQ, 17, "reject", negate=True)
            a.op(_LD_H_ABS, 6)
            a.jump_if(_JSET, 0x3FFF, "accept")
            a.op(_LDX_B_MSH, 0)
            a.op(_LD_W_LEN)
            a.op(_SUB_X)
            a.jump_if(_JGE, 8, "accept", negate=True)
            a.op(_LD_H_IND, 2)

            def port_label(port: int, group: int = group) -> str:
                return f"g{group}p{port}"

            a.dispatch(sorted(ports), port_label, "reject")
            for port, sources in sorted(ports.items()):
                a.label(f"g{group}p{port}")
                if None in sources:
                    a.goto("accept")
                    continue
                a.op(_LD_W_ABS, 12)
                a.dispatch(sorted(s for s in sources if s is not None), lambda _src: "accept", "reject")
    a.label("accept")
    a.op(_RET_K, ACCEPT_SNAPLEN)
    a.label("reject")
    a.op(_RET_K, 0)
    return a.assemble()


def compile_filters(entries: Iterable[FilterEntry]) -> list[tuple[bytes, int]]:
    """The filters within the kernel's instruction limit, most precise first,
    with their precision. The last one (precision 0) is a few instructions
    and always fits; the caller falls back to it when the kernel refuses a
    larger one (socket option memory, net.core.optmem_max)."""
    listed = list(entries)
    found = []
    for precision in (2, 1, 0):
        program = build_filter(listed, precision)
        if len(program) <= BPF_MAXINSNS:
            found.append((b"".join(_SOCK_FILTER.pack(*insn) for insn in program), precision))
    return found


def compile_filter(entries: Iterable[FilterEntry]) -> tuple[bytes, int]:
    """The most precise filter that fits the kernel's limit, and its precision."""
    return compile_filters(entries)[0]


def drop_all_filter() -> bytes:
    """A filter that accepts nothing: for sockets that only hold state."""
    return _SOCK_FILTER.pack(_RET_K, 0, 0, 0)
