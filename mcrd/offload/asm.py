"""eBPF instruction encoding and a small assembler with labels.

Pure: builds instruction lists, touches no kernel. The program builders
(`mcrd.offload.programs`) write with it; `mcrd.offload.bpf` loads what it
encodes. Must not depend on anything else in mcrd.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

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


class EbpfAsm:
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
