"""The fast path's send planning and ring layout, without sockets."""

from __future__ import annotations

import mmap
import struct

from mcrd.fastpath import BATCH, FRAME, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, Ring, Sender
from mcrd.netio import RingSpec
from mcrd.relaying import key_port, port_key


def plan(lens: list[int], limit: int = GSO_MAX_BYTES) -> list[tuple[int, int, int]]:
    sender = Sender(4096)
    sender.load([0x1000 * (i + 1) for i in range(len(lens))], lens, [0] * len(lens))
    return sender.plan(limit)


def test_one_size_goes_in_runs_of_at_most_64_segments_and_64_kib() -> None:
    assert plan([64] * 130) == [(0, 64, 64), (64, 64, 64), (128, 2, 64)]
    per = GSO_MAX_BYTES // 1400  # 46 segments of 1,400 bytes fit one UDP datagram's length
    assert plan([1400] * 100) == [(0, per, 1400), (per, per, 1400), (2 * per, 100 - 2 * per, 1400)]
    assert all(segments <= GSO_MAX_SEGMENTS for _f, segments, _s in plan([8] * 1000))


def test_mixed_sizes_make_runs_and_singles_in_order() -> None:
    assert plan([100, 100, 100, 300, 200, 200]) == [(0, 3, 100), (3, 1, 0), (4, 2, 200)]


def test_sizes_above_the_limit_go_alone() -> None:
    assert plan([1200] * 3 + [400] * 2, limit=1199) == [(0, 1, 0), (1, 1, 0), (2, 1, 0), (3, 2, 400)]
    assert plan([64] * 3, limit=0) == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]


def test_empty_payloads_are_sent_alone() -> None:
    assert plan([0, 0, 10, 10]) == [(0, 1, 0), (1, 1, 0), (2, 2, 10)]


def test_loading_fills_the_iovec_array_in_place() -> None:
    sender = Sender(16)
    sender.load([111, 222, 333], [1, 2, 3], [0, 0, 0])
    assert list(sender.iov[:6]) == [111, 1, 222, 2, 333, 3]
    assert sender.plan(GSO_MAX_BYTES) is sender.plan(GSO_MAX_BYTES)  # computed once per block


def test_one_marking_keeps_the_gso_runs_and_mixed_ones_go_one_by_one() -> None:
    sender = Sender(16)
    sender.load([111, 222, 333], [100, 100, 100], [0xB8, 0xB8, 0xB8])
    assert sender.tos == 0xB8 and sender.plan(GSO_MAX_BYTES) == [(0, 3, 100)]
    sender.load([111, 222, 333], [100, 100, 100], [0xB8, 0x00, 0xB8])
    assert sender.tos is None and sender.plan(GSO_MAX_BYTES) == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]


# -- the TPACKET_V2 ring, on an anonymous mapping laid out as the kernel's --


def ring_of(states: list[int], frame_size: int = 2048) -> Ring:
    mapped = mmap.mmap(-1, frame_size * len(states))
    for index, status in enumerate(states):
        FRAME.pack_into(mapped, index * frame_size, status, 0, 0, 0, 0, 100 + index, 0)
    return Ring(mapped, frame_size, len(states))


def test_ready_counts_the_frames_handed_over_from_the_current_one() -> None:
    assert ring_of([0] * 8).ready() == 0
    assert ring_of([1, 0, 1, 1]).ready() == 1
    # any user-space status counts: checksum not ready, VLAN valid, copied, ...
    assert ring_of([1 | 0x8, 1 | 0x10, 1 | 0x80, 0]).ready() == 3
    many = ring_of([1] * 100 + [0] * 28)
    assert many.ready() == 100  # read in growing chunks, found the same


def test_ready_stops_at_a_batch_and_at_the_end_of_the_ring() -> None:
    assert ring_of([1] * (BATCH + 100)).ready() == BATCH
    ring = ring_of([1] * 10)
    ring.current = 7
    assert ring.ready() == 3  # the next batch starts at frame 0


def test_release_hands_frames_back_and_wraps() -> None:
    ring = ring_of([1] * 6)
    ring.current = 4
    ring.release(2)
    assert ring.current == 0
    assert ring.states.tolist() == [1, 1, 1, 1, 0, 0]
    ring.release(3)
    assert (ring.current, ring.states.tolist()) == (3, [0, 0, 0, 1, 0, 0])


def test_rescan_finds_the_oldest_frame_a_predecessor_left() -> None:
    ring = ring_of([0, 0, 1, 1, 0, 0])
    assert ring.ready() == 0
    assert ring.rescan() and ring.current == 2
    FRAME.pack_into(ring.map, 0, 1, 0, 0, 0, 0, 99, 0)  # frame 0 came before frame 2
    assert ring.rescan() and ring.current == 0
    assert not ring_of([0] * 4).rescan()


def test_frames_are_sized_to_the_mtu_and_lie_back_to_back() -> None:
    assert RingSpec().for_mtu(1500).frame_size == 2048
    assert RingSpec().for_mtu(1900).frame_size == 4096
    assert RingSpec().for_mtu(9000).frame_size == 16384
    assert RingSpec().for_mtu(65536).frame_size == RingSpec.MAX_FRAME
    for spec in (RingSpec.of_size(32).for_mtu(1500), RingSpec.of_size(4).for_mtu(9000)):
        block, blocks, frame, frames = struct.unpack("=4I", spec.request())
        assert block % mmap.PAGESIZE == 0 and block % frame == 0
        assert blocks * block == frames * frame == spec.size
    assert RingSpec.of_size(32).frame_count == 16384


def test_a_port_key_gives_back_the_port_and_the_df_flag() -> None:
    for port, frag in ((4444, 0x4000), (5353, 0), (1, 0x8000 | 0x4000), (65535, 0x8000)):
        native_port = struct.unpack("=H", struct.pack("!H", port))[0]
        native_frag = struct.unpack("=H", struct.pack("!H", frag))[0]
        # the fast path's key: the flags field whole (no offset, no MF there)
        assert key_port(native_port << 16 | native_frag) == (port, bool(frag & 0x4000))
        assert key_port(port_key(native_port, native_frag)) == (port, bool(frag & 0x4000))
