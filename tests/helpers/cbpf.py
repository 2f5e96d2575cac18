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
    SUB_X,
    Insn,
)


def run_filter(program: list[Insn], packet: bytes, pkttype: int = 0, steps: list[int] | None = None) -> int:
    """Run `program` on `packet` the way the kernel does; returns the snap
    length (0: rejected). `steps`, if given, gets the number of instructions run."""
    a = x = 0
    pc = 0
    n = len(packet)
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if steps is not None:
            steps.append(pc)
        if code in (LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_H_IND):
            if code == LD_W_ABS and k == SKF_AD_PKTTYPE:
                a = pkttype
                continue
            off = k + x if code == LD_H_IND else k
            width = {LD_W_ABS: 4, LD_H_ABS: 2, LD_B_ABS: 1, LD_H_IND: 2}[code]
            if off + width > n:
                return 0
            a = int.from_bytes(packet[off : off + width], "big")
        elif code == LD_W_LEN:
            a = n
        elif code == LDX_B_MSH:
            if k >= n:
                return 0
            x = (packet[k] & 0x0F) * 4
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
