"""Logging: repeated messages are held back, and counted."""

from __future__ import annotations

import logging

from mcrd.logs import RepeatFilter


def test_repeated_log_messages_are_rate_limited() -> None:
    now = [0.0]
    limit = RepeatFilter(burst=3, window=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("mcrd", logging.WARNING, __file__, 1, msg, None, None)

    passed = [limit.filter(record("worker 7 is late")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("another message"))
    assert all(limit.filter(record(f"reload {n}: applied")) for n in range(10))  # different texts
    now[0] = 11.0
    again = record("worker 7 is late")
    assert limit.filter(again)
    assert again.getMessage() == "worker 7 is late (7 identical message(s) suppressed)"
