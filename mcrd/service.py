"""The running daemon: what runs, and the one way to change it.

`Service` wires the pieces together: the supervisor (sockets and workers),
the reloader (file changes, SIGHUP and `mcrctl reload`), the control server,
netlink and systemd. Every change to the running rules, from the file or
from mcrctl, goes through `Service.change`, one at a time, and runs only if
the whole rule book is valid. Signal handlers only set an event or request a
reload; the main loop does the work.

Must not parse command lines or control requests: `daemon` and `commands`
do, and call in here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mcrd import __version__
from mcrd.commands import Commands
from mcrd.config import LoadedConfig
from mcrd.control.server import Access, ControlServer, Limits
from mcrd.links import Link, LinkMonitor, Snapshot
from mcrd.notify import Systemd, watchdog_interval
from mcrd.reload import Outcome, Reloader, watch_file
from mcrd.rulebook import RuleBook
from mcrd.rules import RuleSpec
from mcrd.settings import DaemonSettings, SettingsChange, compare_settings, take_live

log = logging.getLogger("mcrd")

EX_OK = 0
EX_FAIL = 1

#: how long start-up waits for netlink's first interface list
FIRST_LINKS_WAIT = 2.0


class Supervising(Protocol):
    """The part of `mcrd.supervisor.Supervisor` the service uses."""

    async def apply(self, rules: list[RuleSpec]) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def observe_links(self, snapshot: dict[str, Link]) -> None: ...
    def rule_views(self, origin: Callable[[RuleSpec], str]) -> list[dict[str, Any]]: ...
    def stats_view(self) -> dict[str, Any]: ...
    def worker_views(self) -> list[dict[str, Any]]: ...
    def counts(self) -> tuple[int, int]: ...
    async def sample_all(self) -> None: ...
    def workers_healthy(self) -> bool: ...


class Service:
    """The running daemon: its rule book, its settings in effect, and every
    way to change them. It is the reloader's `ReloadTarget` and the control
    commands' subject."""

    def __init__(
        self,
        settings: DaemonSettings,
        cli: dict[str, Any],
        loaded: LoadedConfig,
        book: RuleBook,
        access: Access,
        supervisor: Supervising,
        systemd: Systemd | None = None,
    ) -> None:
        self.settings = settings  # in effect: live keys follow reloads, the others stay as started
        self.wanted = settings  # what the rule file last asked for (with flags and environment)
        self.cli = cli
        self.book = book
        self.access = access
        self.systemd = systemd or Systemd()
        self.supervisor = supervisor
        self.changes = asyncio.Lock()  # one change to the running rules at a time
        self.reloader = Reloader(loaded.path, self, loaded)
        self.restart_needed: tuple[str, ...] = ()
        self.server: ControlServer | None = None
        self.stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    # -- the rules ---------------------------------------------------------

    async def change(self, book: RuleBook) -> None:
        """Run `book` if it is valid as a whole; RuleSetRejected with its
        problems, and nothing changed, if not. The caller holds `changes`."""
        self.book = book.check()
        await self.supervisor.apply(book.combined())

    # -- as the reloader's target -------------------------------------------

    def running(self) -> Sequence[RuleSpec]:
        return self.book.file

    def resolve(self, loaded: LoadedConfig) -> DaemonSettings:
        return DaemonSettings.resolve(self.cli, loaded.daemon)

    def check(self, loaded: LoadedConfig) -> SettingsChange:
        return compare_settings(self.settings, self.wanted, self.resolve(loaded))

    async def apply(self, loaded: LoadedConfig) -> None:
        await self.apply_file(loaded)

    async def apply_file(self, new: LoadedConfig) -> None:
        """Run the file's rules and its live settings, checked against the
        runtime rules as they are when the change runs."""
        wanted = self.resolve(new)
        async with self.changes:
            await self.change(self.book.with_file(new.rules, max_rules=wanted.max_rules))
            change = compare_settings(self.settings, self.wanted, wanted)
            self.settings, self.wanted = take_live(self.settings, wanted), wanted
            self.restart_needed = change.restart_needed
        self._apply_live()
        for key in change.restart:
            log.warning("%s changed to %s: takes effect when mcrd restarts", key, getattr(wanted, key))

    def _apply_live(self) -> None:
        settings = self.settings
        # as before: a reload that applies sets the file's level, over `mcrctl log-level set`
        logging.getLogger().setLevel(settings.log_level.upper())
        if self.server is not None:
            self.server.limits = Limits(settings.max_clients, settings.client_timeout)
        self._set_watching(settings.watch)

    def reloading(self) -> None:
        self.systemd.reloading()

    def reloaded(self, outcome: Outcome) -> None:
        self.systemd.ready(self.status_line())

    def status_line(self) -> str:
        active, pending = self.supervisor.counts()
        text = f"{active} rule(s) active, {pending} pending"
        loaded = self.reloader.loaded
        if loaded is not None and loaded.missing:
            text += f"; {loaded.path} missing"
        last = self.reloader.last
        if last is not None and last.result == "rejected":
            text += f"; last reload rejected: {last.errors[0]}"
        if self.restart_needed:
            text += f"; restart needed for: {', '.join(self.restart_needed)}"
        return text

    # -- running -----------------------------------------------------------

    async def run(self) -> int:
        settings = self.settings
        if self.reloader.loaded is not None and self.reloader.loaded.missing:
            log.warning("%s does not exist: running with no rules from it", self.reloader.path)
        elif not self.book.file:
            log.warning("%s has no rules", self.reloader.path)
        await self._start_links()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reloader.request("SIGHUP"))
        server = ControlServer(
            settings.control_socket,
            Commands(self).table(),
            self.access,
            Limits(settings.max_clients, settings.client_timeout),
        )
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot serve the control socket %s: %s", settings.control_socket, exc.strerror or exc)
            return EX_FAIL
        self.server = server
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.supervisor.start()
            tasks = [
                asyncio.create_task(self.reloader.run(), name="reloader"),
                asyncio.create_task(
                    keep_alive(self.supervisor, self.systemd, self.status_line), name="keepalive"
                ),
            ]
            self._set_watching(settings.watch)
            active, pending = self.supervisor.counts()
            log.info(
                "mcrd %s ready: %d rule(s) active, %d pending, control socket %s",
                __version__,
                active,
                pending,
                settings.control_socket,
            )
            self.systemd.ready(self.status_line())
            await self.stop.wait()
            log.info("stopping")
            self.systemd.stopping()
        finally:
            self._set_watching(False)
            for task in tasks:
                task.cancel()
            await self.supervisor.stop()
            await server.close()
        return EX_OK

    async def _start_links(self) -> None:
        first_links = asyncio.Event()

        def on_links(snapshot: Snapshot) -> None:
            self.supervisor.observe_links(snapshot)
            first_links.set()

        LinkMonitor(asyncio.get_running_loop(), on_links).start()
        try:
            async with asyncio.timeout(FIRST_LINKS_WAIT):
                await first_links.wait()
        except TimeoutError:
            log.warning("netlink gave no interface list; checking interfaces directly until it does")

    @property
    def watching(self) -> bool:
        """Whether the rule file is being followed now."""
        return self._watcher is not None

    def _set_watching(self, on: bool) -> None:
        """Start or stop following the rule file (`watch`, a live setting)."""
        if on and self._watcher is None and not self.stop.is_set():
            self._watcher = asyncio.create_task(
                watch_file(self.reloader.path, self.reloader, self.stop), name="watch"
            )
        elif not on and self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


async def keep_alive(supervisor: Supervising, systemd: Systemd, status_line: Callable[[], str]) -> None:
    """Ping the watchdog from the main loop, and only while every worker answers.

    A hung loop sends nothing; a hung worker stops the pings until it answers
    again or is restarted, so systemd's watchdog sees either.
    """
    interval = watchdog_interval()
    ping_every = interval / 2 if interval else None
    last_ping = 0.0
    warned = False
    while True:
        now = time.monotonic()
        if ping_every is not None and now - last_ping >= ping_every * 0.9:
            if supervisor.workers_healthy():
                systemd.ping()
                last_ping = now
                warned = False
            elif not warned:
                log.warning("a worker stopped answering: holding back the watchdog")
                warned = True
        systemd.status(status_line())
        await asyncio.sleep(min(ping_every or 1.0, 1.0))
