"""One funnel for reloads: file watcher, SIGHUP and `mcrctl reload` alike.

Every trigger becomes `Reloader.request()`. Reloads run one at a time;
requests that arrive while one is queued join it, so a burst of saves is one
reload. Each reload reads the file, validates it as a whole and only then
hands the new rules to `apply`; a file that does not load is rejected and the
running rules stay exactly as they were. The outcome goes back to every
caller that asked for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mcrd.config import ConfigError, LoadedConfig, parse_rule_bytes, read_rule_file
from mcrd.plan import plan
from mcrd.rules import RuleSpec

log = logging.getLogger("mcrd.reload")

#: a file seen empty or missing by the watcher is re-read after this long
#: before it is applied: editors truncate or delete before they write.
SETTLE = 0.5


@dataclass
class Outcome:
    result: Literal["applied", "unchanged", "rejected"]
    triggers: list[str]
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rules: int = 0
    at: float = field(default_factory=time.time)

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
        }

    def describe(self) -> str:
        if self.result == "rejected":
            return f"rejected: {self.errors[0]}" + (
                f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            )
        if self.result == "unchanged":
            return "unchanged"
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed))
            if names
        ]
        return "applied: " + ("; ".join(parts) or "settings")


Apply = Callable[[LoadedConfig], Awaitable[None]]


class Reloader:
    def __init__(
        self,
        path: Path,
        running: Callable[[], list[RuleSpec]],
        apply: Apply,
        before: Callable[[], None] = lambda: None,
        after: Callable[[Outcome], None] = lambda o: None,
        loaded: LoadedConfig | None = None,
        check: Callable[[LoadedConfig], list[str]] = lambda loaded: [],
    ) -> None:
        self.path = path
        self.running = running
        self.apply = apply
        self.before = before
        self.after = after
        self.check = check  # problems of the new file together with what else runs
        self.last: Outcome | None = None
        self.count = 0  # reloads done
        self.loaded = loaded
        self.seen: bytes | None = None  # the file's bytes at the last reload, for the watcher
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
            self.after(outcome)
            if not future.done():
                future.set_result(outcome)

    async def reload_once(self, triggers: list[str]) -> Outcome:
        self.before()
        try:
            raw = read_rule_file(self.path)
            self.seen = raw
            loaded = (
                LoadedConfig(self.path, missing=True) if raw is None else parse_rule_bytes(raw, self.path)
            )
        except ConfigError as exc:
            outcome = Outcome("rejected", triggers, errors=exc.errors)
            for line in exc.errors:
                log.error("reload rejected, running rules kept: %s", line)
            return outcome
        problems = self.check(loaded)
        if problems:
            for line in problems:
                log.error("reload rejected, running rules kept: %s: %s", self.path, line)
            return Outcome("rejected", triggers, errors=[f"{self.path}: {p}" for p in problems])
        diff = plan(self.running(), loaded.rules)
        settings_changed = self.loaded is None or loaded.daemon != self.loaded.daemon
        if loaded.missing:
            log.warning("%s does not exist: running with no rules from it", self.path)
        elif not loaded.rules:
            log.warning("%s has no rules", self.path)
        if diff.empty and not settings_changed:
            outcome = Outcome("unchanged", triggers, rules=len(loaded.rules))
        else:
            await self.apply(loaded)
            summary = diff.summary()
            outcome = Outcome(
                "applied",
                triggers,
                summary["added"],
                summary["removed"],
                summary["changed"],
                rules=len(loaded.rules),
            )
        self.loaded = loaded
        log.info("reload (%s): %s", ", ".join(triggers), outcome.describe())
        return outcome


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
    await reloader.request("file changed")
