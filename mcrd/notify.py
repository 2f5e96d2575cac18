"""systemd's notify protocol (through sdnotify) and the watchdog interval.

Every call is a no-op when mcrd does not run under systemd (no
NOTIFY_SOCKET), so the daemon calls these unconditionally. Owns the
notify messages' form; must not depend on any other part of mcrd.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between the pings systemd expects, or None when it expects none."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    target = environ.get("WATCHDOG_PID")
    if target and int(target) != (pid if pid is not None else os.getpid()):
        return None  # meant for another process (e.g. a wrapper)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Systemd:
    """mcrd's side of sd_notify: READY, RELOADING, STATUS, WATCHDOG and
    STOPPING, with STATUS= sent only when the text changes."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._status = ""

    def _send(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self._status = status
        self._send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one.
        self._send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}")

    def ping(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1", "STATUS=stopping")
