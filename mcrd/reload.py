"""One funnel for reloads: file watcher, SIGHUP and `mcrctl reload` alike.

Every trigger becomes `Reloader.request()`. Reloads run one at a time;
requests that arrive while one is queued join it, so a burst of saves is one
reload. Each reload reads the file, validates it as a whole and only then
hands the new rules to `apply`; a file that does not load is rejected and the
running rules stay exactly as they were. The outcome goes back to every
caller that asked for it.

The reloader drives a `ReloadTarget` (the daemon's `Service`, or a fake in
tests) and owns what it has seen of the file. It must not know how rules
run: it parses, compares, and hands over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from mcrd.config import ConfigError, LoadedConfig, parse_rule_bytes, read_rule_file
from mcrd.plan import plan
from mcrd.rulebook import RuleSetRejected
from mcrd.rules import RuleSpec
from mcrd.settings import SettingsChange

log = logging.getLogger("mcrd.reload")

#: a file seen empty or missing by the watcher is re-read after this long
#: before it is applied: editors truncate or delete before they write.
SETTLE = 0.5


@dataclass
class Outcome:
    """What one reload did, for every caller that asked and for `status`.

    `result`: applied (something changed), unchanged, or rejected (nothing
    changed; `errors` says why). `added`/`removed`/`changed`: rules by name.
    `settings`: `[daemon]` keys now in effect with new values.
    `restart_needed`: restart-only keys whose new value waits for a restart.
    """

    result: Literal["applied", "unchanged", "rejected"]
    triggers: list[str]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rules: int = 0
    at: float = field(default_factory=time.time)
    settings: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "triggers": self.triggers,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "errors": self.errors,
            "rules": self.rules,
            "at": self.at,
            "settings": self.settings,
            "restart_needed": self.restart_needed,
        }

    def describe(self) -> str:
        if self.result == "rejected":
            return f"rejected: {self.errors[0]}" + (
                f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            )
        restart = f"restart needed for: {', '.join(self.restart_needed)}" if self.restart_needed else ""
        if self.result == "unchanged":
            return "unchanged" + (f"; {restart}" if restart else "")
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("settings", self.settings),
            )
            if names
        ]
        text = "applied" + (": " + "; ".join(parts) if parts else "")
        return text + (f"; {restart}" if restart else "")


class ReloadTarget(Protocol):
    """What a reload changes: the running daemon, seen from the reloader."""

    def running(self) -> Sequence[RuleSpec]:
        """The rule file's rules as they run now."""
        ...

    def check(self, loaded: LoadedConfig) -> SettingsChange:
        """What taking `loaded` would change in the settings; changes nothing."""
        ...

    async def apply(self, loaded: LoadedConfig) -> None:
        """Validate `loaded` against the rule book it will run and run it, as
        one step; RuleSetRejected (and nothing changed) when it may not run."""
        ...

    def reloading(self) -> None:
        """A reload begins (systemd: RELOADING=1)."""
        ...

    def reloaded(self, outcome: Outcome) -> None:
        """A reload ended with `outcome` (systemd: READY=1 and STATUS=)."""
        ...


class Reloader:
    """The one funnel for reloads: coalesces requests, runs one reload at a
    time against its `ReloadTarget`, and answers every request with the
    `Outcome`. Keeps the last outcome, the count, the last file that loaded
    and the bytes it last read (`seen`, which the file watcher compares)."""

    def __init__(self, path: Path, target: ReloadTarget, loaded: LoadedConfig | None = None) -> None:
        self.path = path
        self.target = target
        self.last: Outcome | None = None
        self.count = 0  # reloads done
        self.loaded = loaded
        self.seen: bytes | None = loaded.raw if loaded is not None else None
        self._queued: asyncio.Future[Outcome] | None = None
        self._triggers: list[str] = []
        self._wake = asyncio.Event()

    def request(self, trigger: str) -> asyncio.Future[Outcome]:
        """Ask for a reload; the future resolves with its outcome."""
        if self._queued is None:
            self._queued = asyncio.get_running_loop().create_future()
            self._wake.set()
        self._triggers.append(trigger)
        return self._queued

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            future, self._queued = self._queued, None
            triggers, self._triggers = self._triggers, []
            if future is None:
                continue
            try:
                outcome = await self.reload_once(triggers)
            except Exception as exc:  # never let one reload take the funnel down
                log.exception("reload failed")
                outcome = Outcome("rejected", triggers, errors=[f"internal error: {exc}"])
            self.last = outcome
            self.count += 1
            self.target.reloaded(outcome)
            if not future.done():
                future.set_result(outcome)

    async def reload_once(self, triggers: list[str]) -> Outcome:
        """Read, parse and compare the file, then apply it if anything changed."""
        self.target.reloading()
        try:
            raw = read_rule_file(self.path)
            self.seen = raw
            loaded = (
                LoadedConfig(self.path, missing=True) if raw is None else parse_rule_bytes(raw, self.path)
            )
        except ConfigError as exc:
            return self._rejected(triggers, exc.errors)
        settings = self.target.check(loaded)
        diff = plan(list(self.target.running()), loaded.rules)
        if loaded.missing:
            log.warning("%s does not exist: running with no rules from it", self.path)
        elif not loaded.rules:
            log.warning("%s has no rules", self.path)
        restart_needed = list(settings.restart_needed)
        if diff.empty and not settings.changes:
            outcome = Outcome("unchanged", triggers, rules=len(loaded.rules), restart_needed=restart_needed)
        else:
            try:
                await self.target.apply(loaded)
            except RuleSetRejected as exc:
                return self._rejected(triggers, [f"{self.path}: {p}" for p in exc.problems])
            summary = diff.summary()
            outcome = Outcome(
                "applied",
                triggers,
                summary["added"],
                summary["removed"],
                summary["changed"],
                rules=len(loaded.rules),
                settings=[k for k in (*settings.live, *settings.restart) if k not in restart_needed],
                restart_needed=restart_needed,
            )
        self.loaded = loaded
        log.info("reload (%s): %s", ", ".join(triggers), outcome.describe())
        return outcome

    def _rejected(self, triggers: list[str], errors: list[str]) -> Outcome:
        for line in errors:
            log.error("reload rejected, running rules kept: %s", line)
        return Outcome("rejected", triggers, errors=errors)


async def watch_file(path: Path, reloader: Reloader, stop: asyncio.Event) -> None:
    """Reload whenever the file's content changes, however the editor saved it.

    Watches the directory (and, for a symlink, the target's directory) rather
    than the file, so rename-over, delete-and-recreate and symlink swaps are
    seen; compares bytes, so events for other files cost one read.
    """
    from watchfiles import awatch

    while not stop.is_set():
        dirs = _watched_dirs(path)
        if not dirs:
            log.warning("cannot watch %s: its directory does not exist", path)
            return
        halt = asyncio.Event()
        forward = asyncio.create_task(_forward(stop, halt))
        try:
            async for _changes in awatch(
                *dirs, stop_event=halt, step=30, debounce=400, recursive=False, ignore_permission_denied=True
            ):
                if _watched_dirs(path) != dirs:
                    halt.set()  # a symlink now points elsewhere: watch there too
                await _reload_if_changed(path, reloader)
        except Exception:
            log.exception("watching %s failed; retrying in 1s", path)
            await asyncio.sleep(1.0)
        finally:
            forward.cancel()


def _watched_dirs(path: Path) -> list[str]:
    dirs = {path.parent.absolute(), path.resolve().parent}
    return sorted(str(d) for d in dirs if d.is_dir())


async def _forward(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _reload_if_changed(path: Path, reloader: Reloader) -> None:
    try:
        raw = read_rule_file(path)
    except ConfigError:
        raw = b"<unreadable>"
    if raw == reloader.seen:
        return
    if not raw or not raw.strip():
        # Empty or gone: most often the middle of a save. Only a file that
        # stays so is taken as meant.
        await asyncio.sleep(SETTLE)
        try:
            again = read_rule_file(path)
        except ConfigError:
            again = b"<unreadable>"
        if again != raw:
            return  # it changed again; that change has its own event
    # shielded: a reload may stop this watcher (watch = false), and the
    # outcome it waits for is shared with every other caller of that reload
    await asyncio.shield(reloader.request("file changed"))
