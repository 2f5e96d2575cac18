"""bpf(2) through ctypes: maps, their elements, and loading programs.

The adapter between the pure program builders and the kernel; no tool, no
compiler, no object file at run time. Blocking system calls: callers run
them in a thread. Depends on `mcrd.offload.asm` and the dispatch table's
key size in `mcrd.offload.programs`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
import sys
from collections.abc import Sequence

from mcrd.offload.asm import Insn, encode
from mcrd.offload.programs import TABLE_KEY_SIZE

# -- bpf(2) ----------------------------------------------------------------

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD = 0, 1, 2, 3, 5
MAP_TYPE_HASH, MAP_TYPE_PROG_ARRAY, MAP_TYPE_PERCPU_ARRAY = 1, 3, 6
F_NO_PREALLOC = 1
PROG_TYPE_SCHED_CLS = 3
LICENSE = b"Dual MIT/GPL"  # mcrd is MIT; the kernel wants a GPL-compatible string for some helpers
_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "riscv64": 280}  # 64-bit only, as fastpath

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
