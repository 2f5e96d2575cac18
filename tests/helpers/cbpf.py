"""A classic BPF interpreter for the subset mcrd emits: tests prove the filter
against packets without a socket."""

from __future__ import annotations

from mcrd.bpf_classic import (
    JA,
    JEQ,
    JGE,
    JGT,
    JSET,
    LD_B_ABS,
    LD_H_ABS,
    LD_H_IND,
    LD_W_ABS,
    LD_W_LEN,
    LDX_B_MSH,
    RET_K,
    SKF_AD_PKTTYPE,
    SKF_NET_OFF,
    SUB_X,
    Insn,
)

#: an Ethernet header: what a packet socket's filter sees before the IP header
ETHERNET = bytes.fromhex("01005e010101 02000000000a 0800")
SKF_LL_OFF = 0x100000000 - 0x200000


def run_filter(
    program: list[Insn],
    packet: bytes,
    pkttype: int = 0,
    steps: list[int] | None = None,
    link: bytes = ETHERNET,
) -> int:
    """Run `program` on the IP `packet` behind a `link` header the way the
    kernel does for a SOCK_RAW packet socket; returns the snap length (0:
    rejected). `steps`, if given, gets the number of instructions run."""
    a = x = 0
    pc = 0
    packet = link + packet
    n = len(packet)

    def offset(k: int) -> int:
        """Where a load at k reads: SKF_NET_OFF + i is the IP header's byte
        i; offsets run in 32 bits, as the kernel's do."""
        k &= 0xFFFFFFFF
        if SKF_NET_OFF <= k < SKF_NET_OFF + 0x100000:
            return len(link) + k - SKF_NET_OFF
        if k >= SKF_LL_OFF:
            raise ValueError(f"load at {k:#x}: not interpreted")
        return k

    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if steps is not None:
            steps.append(pc)
        if code in (LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_H_IND):
            if code == LD_W_ABS and k == SKF_AD_PKTTYPE:
                a = pkttype
                continue
            off = offset(k + x if code == LD_H_IND else k)
            width = {LD_W_ABS: 4, LD_H_ABS: 2, LD_B_ABS: 1, LD_H_IND: 2}[code]
            if off + width > n:
                return 0
            a = int.from_bytes(packet[off : off + width], "big")
        elif code == LD_W_LEN:
            a = n
        elif code == LDX_B_MSH:
            at = offset(k)
            if at >= n:
                return 0
            x = (packet[at] & 0x0F) * 4
        elif code == SUB_X:
            a = (a - x) & 0xFFFFFFFF
        elif code == JA:
            pc += k
        elif code in (JEQ, JGT, JGE, JSET):
            cond = {JEQ: a == k, JGT: a > k, JGE: a >= k, JSET: bool(a & k)}[code]
            pc += jt if cond else jf
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} not interpreted")
