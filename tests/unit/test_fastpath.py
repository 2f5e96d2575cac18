"""The fast path's send planning and ring layout, without sockets."""

from __future__ import annotations

from mcrd.fastpath import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, Sender


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
