"""A classic BPF interpreter for the subset mcrd emits: tests prove the filter
against packets without a socket."""

from __future__ import annotations

from mcrd.packet import (
    _JA,
    _JEQ,
    _JGE,
    _JGT,
    _JSET,
    _LD_B_ABS,
    _LD_H_ABS,
    _LD_H_IND,
    _LD_W_ABS,
    _LD_W_LEN,
    _LDX_B_MSH,
    _RET_K,
    _SKF_AD_PKTTYPE,
    _SUB_X,
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
        if code in (_LD_W_ABS, _LD_H_ABS, _LD_B_ABS, _LD_H_IND):
            if code == _LD_W_ABS and k == _SKF_AD_PKTTYPE:
                a = pkttype
                continue
            off = k + x if code == _LD_H_IND else k
            width = {_LD_W_ABS: 4, _LD_H_ABS: 2, _LD_B_ABS: 1, _LD_H_IND: 2}[code]
            if off + width > n:
                return 0
            a = int.from_bytes(packet[off : off + width], "big")
        elif code == _LD_W_LEN:
            a = n
        elif code == _LDX_B_MSH:
            if k >= n:
                return 0
            x = (packet[k] & 0x0F) * 4
        elif code == _SUB_X:
            a = (a - x) & 0xFFFFFFFF
        elif code == _JA:
            pc += k
        elif code in (_JEQ, _JGT, _JGE, _JSET):
            cond = {_JEQ: a == k, _JGT: a > k, _JGE: a >= k, _JSET: bool(a & k)}[code]
            pc += jt if cond else jf
        elif code == _RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} not interpreted")
