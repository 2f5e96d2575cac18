"""Logging setup, with repeated messages rate-limited.

A burst of the same message (same logger, same text) is let through, then
suppressed until the window ends; the next one that passes says how many
were suppressed. Messages that only share a format string (every reload's
outcome, say) are different messages and all pass. Keeps a flapping interface or a flood of
bad control clients from flooding the journal.

Owns the root logger's handler and format. Must not depend on any other
part of mcrd.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

NOISY_LIBRARIES = ("pyroute2", "watchfiles", "asyncio")


class RepeatFilter(logging.Filter):
    """Lets a burst of one message through per window, then counts what it
    holds back and says so on the next one that passes."""

    def __init__(
        self, burst: int = 5, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self.seen: dict[tuple[str, str], tuple[float, int, int]] = {}  # start, passed, suppressed

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        now = self.clock()
        start, passed, suppressed = self.seen.get(key, (now, 0, 0))
        if now - start >= self.window:
            start, passed = now, 0
        if passed >= self.burst:
            self.seen[key] = (start, passed, suppressed + 1)
            return False
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} identical message(s) suppressed)"
            record.args = None
        self.seen[key] = (start, passed + 1, 0)
        if len(self.seen) > 4096:  # bounded, whatever the variety of messages
            self.seen.clear()
        return True


def setup_logging(level: str) -> None:
    # Libraries log every netlink message and file event at debug level: far
    # too much for an operator, and watchfiles' own messages about a log file
    # beside the rule file would feed back into the watcher.
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    # journald stamps each line itself; elsewhere (a terminal, a test's log) we do.
    stamp = "" if "JOURNAL_STREAM" in os.environ else "%(asctime)s "
    handler.setFormatter(logging.Formatter(f"{stamp}%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
