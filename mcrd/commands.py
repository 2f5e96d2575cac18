"""The control commands: typed arguments in, JSON-ready results out.

Each handler checks its arguments against a model (a bad one is a
`bad-request`), runs against the `Service` and maps the domain's errors to
the protocol's once, here: `RuleSetRejected` becomes `invalid`. Must not
touch sockets or the supervisor's internals; the protocol's framing and
access rules are `mcrd.control`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from mcrd import __version__
from mcrd.config import ConfigError, format_validation_errors, parse_config
from mcrd.control.protocol import PROTOCOL_VERSION, ControlError
from mcrd.control.server import Command
from mcrd.defaults import LOG_LEVELS, LogLevel
from mcrd.rulebook import ORIGINS, SAVED_HEADER, RuleSetRejected, dump_rules, rule_id
from mcrd.rules import RuleSpec
from mcrd.store import write_atomically

if TYPE_CHECKING:
    from mcrd.service import Service

log = logging.getLogger("mcrd")


class _Args(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class AddArgs(_Args):
    rule: dict[str, Any]


class RemoveArgs(_Args):
    name: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RemoveArgs:
        if (self.name is None) == (self.id is None):
            raise ValueError("give exactly one")
        return self


class ConfigCheckArgs(_Args):
    text: str
    path: str = "<request>"


class LogLevelArgs(_Args):
    level: LogLevel


M = TypeVar("M", bound=_Args)


def parse_args(model: type[M], args: dict[str, Any], message: str) -> M:
    """`args` as `model`; ControlError("bad-request", message) if they do not fit."""
    try:
        return model.model_validate(args)
    except ValidationError:
        raise ControlError("bad-request", message) from None


def invalid(exc: RuleSetRejected) -> ControlError:
    return ControlError("invalid", "; ".join(exc.problems))


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class Commands:
    """The control commands, as handlers bound to one `Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def table(self) -> dict[str, Command]:
        read: dict[str, Handler] = {
            "ping": self.ping,
            "version": self.version,
            "status": self.status,
            "list": self.list_rules,
            "stats": self.stats,
            "workers": self.workers,
            "config.show": self.config_show,
            "config.check": self.config_check,
            "log-level.get": self.log_level_get,
        }
        write: dict[str, Handler] = {
            "reload": self.reload,
            "add": self.add,
            "remove": self.remove,
            "config.save": self.config_save,
            "log-level.set": self.log_level_set,
        }
        return {**{n: Command(h) for n, h in read.items()}, **{n: Command(h, True) for n, h in write.items()}}

    async def ping(self, _: dict[str, Any]) -> Any:
        return {"pong": True, "pid": os.getpid()}

    async def version(self, _: dict[str, Any]) -> Any:
        return {"version": __version__, "protocol": PROTOCOL_VERSION}

    async def list_rules(self, _: dict[str, Any]) -> Any:
        s = self.service
        return {"rules": s.supervisor.rule_views(s.book.origin)}

    async def stats(self, _: dict[str, Any]) -> Any:
        await self.service.supervisor.sample_all()
        return self.service.supervisor.stats_view()

    async def workers(self, _: dict[str, Any]) -> Any:
        return {"workers": self.service.supervisor.worker_views()}

    async def reload(self, _: dict[str, Any]) -> Any:
        return (await self.service.reloader.request("mcrctl reload")).as_dict()

    async def status(self, _: dict[str, Any]) -> Any:
        s = self.service
        active, pending = s.supervisor.counts()
        loaded, last = s.reloader.loaded, s.reloader.last
        origins = [s.book.origin(r) for r in s.book.combined()]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(s.reloader.path),
            "config_missing": bool(loaded and loaded.missing),
            "rules": active + pending,
            "active": active,
            "pending": pending,
            "origins": {o: origins.count(o) for o in ORIGINS},
            "max_rules": s.settings.max_rules,
            "workers": s.supervisor.worker_views(),
            "last_reload": last.as_dict() if last else None,
            "reloads": s.reloader.count,
            "watching": s.settings.watch,
            "runtime_rules": str(s.settings.runtime_rules),
            "log_level": logging.getLevelName(logging.getLogger().level).lower(),
            "restart_needed": list(s.restart_needed),
        }

    async def add(self, args: dict[str, Any]) -> Any:
        raw = parse_args(AddArgs, args, "'rule' must be an object").rule
        try:
            spec = RuleSpec.model_validate(raw)
        except ValidationError as exc:
            raise ControlError("invalid", "; ".join(format_validation_errors(exc))) from None
        s = self.service
        async with s.changes:
            try:
                await s.change(s.book.with_added(spec))
            except RuleSetRejected as exc:
                raise invalid(exc) from None
        log.info("runtime rule %s added: %s", spec.display_name(), spec.key)
        return next(v for v in s.supervisor.rule_views(s.book.origin) if v["key"] == str(spec.key))

    async def remove(self, args: dict[str, Any]) -> Any:
        which = parse_args(RemoveArgs, args, "give exactly one of 'name' and 'id' as a string")
        name, ident = which.name, which.id
        s = self.service
        async with s.changes:
            spec = s.book.find(name=name, ident=ident)
            if spec is None:
                raise ControlError(
                    "not-found", f"no rule {'named ' + repr(name) if name else 'with id ' + repr(ident)}"
                )
            if s.book.origin(spec) == "file":
                raise ControlError(
                    "file-rule",
                    f"rule {spec.display_name()!r} comes from {s.reloader.path}: remove it from that file",
                )
            try:
                await s.change(s.book.without(spec))
            except RuleSetRejected as exc:
                raise invalid(exc) from None
        log.info("runtime rule %s removed", spec.display_name())
        return {"removed": spec.display_name(), "id": rule_id(spec.key), "origin": "runtime"}

    async def config_show(self, _: dict[str, Any]) -> Any:
        s = self.service
        notes = {}
        for spec in s.book.combined():
            origin = s.book.origin(spec)
            notes[spec.key] = {
                "file": f"from {s.reloader.path}",
                "runtime": "added at run time, not saved",
                "saved": f"added at run time, saved in {s.settings.runtime_rules}",
            }[origin] + f" (id {rule_id(spec.key)})"
        header = f"# The rules mcrd (pid {os.getpid()}) runs now.\n"
        return {"toml": dump_rules(s.book.combined(), header, notes)}

    async def config_check(self, args: dict[str, Any]) -> Any:
        checked = parse_args(ConfigCheckArgs, args, "'text' and 'path' must be strings")
        path = Path(checked.path)
        try:
            loaded = parse_config(checked.text, path)
        except ConfigError as exc:
            return {"valid": False, "errors": exc.errors, "rules": 0}
        s = self.service
        max_rules = s.resolve(loaded).max_rules
        problems = [f"{path}: {p}" for p in s.book.with_file(loaded.rules, max_rules=max_rules).problems()]
        return {"valid": not problems, "errors": problems, "rules": len(loaded.rules)}

    async def config_save(self, _: dict[str, Any]) -> Any:
        s = self.service
        async with s.changes:
            runtime = list(s.book.runtime)
            path = s.settings.runtime_rules
            try:
                write_atomically(path, dump_rules(runtime, SAVED_HEADER))
            except OSError as exc:
                raise ControlError("io", f"cannot write {path}: {exc.strerror or exc}") from None
            s.book = s.book.marked_saved()
        log.info("saved %d runtime rule(s) to %s", len(runtime), path)
        return {"path": str(path), "rules": len(runtime)}

    async def log_level_get(self, _: dict[str, Any]) -> Any:
        return {"level": logging.getLevelName(logging.getLogger().level).lower()}

    async def log_level_set(self, args: dict[str, Any]) -> Any:
        level = parse_args(LogLevelArgs, args, f"level must be one of {', '.join(LOG_LEVELS)}").level
        logging.getLogger().setLevel(level.upper())
        log.warning("log level set to %s", level)
        return {"level": level}
