"""`mcrd`: the command line, the daemon's life, and the control commands.

`main` loads and checks everything a start needs (rule file, saved runtime
rules, users and groups) and refuses to start, with EX_CONFIG, when any of it
is wrong. `Relay` then wires the pieces: the `Supervisor` (sockets and
workers), the `Reloader` (one funnel for file changes, SIGHUP and `mcrctl
reload`), the `ControlServer`, netlink and systemd. Signal handlers only set
an event or request a reload; the main loop does the work. Every change to
the running rules, from the file or from mcrctl, goes through `Relay.change`
one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mcrd import __version__
from mcrd.config import (
    ConfigError,
    DaemonSettings,
    LoadedConfig,
    format_validation_errors,
    load_config,
    parse_config,
    parse_rule_bytes,
    read_rule_file,
    workers_per_input,
)
from mcrd.control.protocol import PROTOCOL_VERSION, ControlError
from mcrd.control.server import Access, Command, ControlServer, Limits
from mcrd.defaults import DEFAULT_CONFIG
from mcrd.links import LinkMonitor, Snapshot
from mcrd.logs import setup_logging
from mcrd.netio import RingSpec
from mcrd.notify import Systemd, watchdog_interval
from mcrd.privdrop import group_id, resolve_identity
from mcrd.reload import Reloader, watch_file
from mcrd.rulebook import SAVED_HEADER, RuleBook, dump_rules, rule_id
from mcrd.rules import RuleSpec
from mcrd.supervisor import Supervisor

log = logging.getLogger("mcrd")

EX_OK = 0
EX_FAIL = 1
EX_CONFIG = 78
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcrd",
        description="Multicast relay daemon: receives UDP datagrams on input interfaces "
        "and republishes them to other groups, ports, hosts and interfaces.",
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"rule file (default: $MCRD_CONFIG or {DEFAULT_CONFIG})",
    )
    p.add_argument(
        "-s",
        "--control-socket",
        type=Path,
        default=None,
        help="control socket path (default: [daemon] control_socket, /run/mcr/control.sock)",
    )
    p.add_argument("-l", "--log-level", choices=LOG_LEVELS, default=None)
    p.add_argument("-u", "--user", default=None, help="user the workers run as (default: nobody when root)")
    p.add_argument("-g", "--group", default=None, help="group the workers run as (default: the user's)")
    p.add_argument(
        "--no-watch",
        dest="watch",
        action="store_const",
        const=False,
        default=None,
        help="do not reload when the rule file changes (SIGHUP and mcrctl reload still do)",
    )
    p.add_argument(
        "-t",
        "--check",
        action="store_true",
        help="validate the rule file, print the result and exit (0: valid, 78: invalid)",
    )
    p.add_argument("-V", "--version", action="version", version=f"mcrd {__version__}")
    return p


def config_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    env = os.environ.get("MCRD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def worker_identity(settings: DaemonSettings) -> tuple[int, int]:
    """(uid, gid) for the workers; ValueError naming what does not exist."""
    user = settings.user
    if user is None:
        user = "nobody" if os.geteuid() == 0 else str(os.geteuid())
    return resolve_identity(user, settings.group)


def control_access(settings: DaemonSettings, identity: tuple[int, int]) -> Access:
    # mcrd's own user may do everything, unless the workers share it: a
    # compromised worker must not be able to reconfigure the relay.
    own = os.geteuid()
    return Access(
        own_uid=0 if own == identity[0] else own,
        socket_gid=None if settings.socket_group is None else group_id(settings.socket_group, "socket_group"),
        admin_gid=None if settings.admin_group is None else group_id(settings.admin_group, "admin_group"),
        admin_group=settings.admin_group,
    )


def raise_fd_limit() -> None:
    """A socket per group membership: up to max_rules of them, beyond the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def load_saved(path: Path) -> list[RuleSpec]:
    """Rules saved with `mcrctl config save`; none when the file does not exist yet."""
    raw = read_rule_file(path)
    if raw is None:
        return []
    loaded = parse_rule_bytes(raw, path)
    if loaded.daemon.model_fields_set:
        raise ConfigError(path, [f"{path}: [daemon] settings belong in the rule file, not here"])
    return loaded.rules


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new, never half."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path(args.config)
    cli = {
        "control_socket": args.control_socket,
        "log_level": args.log_level,
        "watch": args.watch,
        "user": args.user,
        "group": args.group,
    }
    try:
        loaded = load_config(path, missing_ok=not args.check)
        settings = DaemonSettings.resolve(cli, loaded.daemon)
        identity = worker_identity(settings)
        access = control_access(settings, identity)
        saved = load_saved(settings.runtime_rules)
        book = RuleBook(
            tuple(loaded.rules), tuple(saved), frozenset(r.key for r in saved), settings.max_rules
        )
        problems = book.problems()
        if problems:
            raise ConfigError(path, [f"{path}: {p}" for p in problems])
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if not args.check:
            print(f"mcrd: refusing to start: {exc.path} is invalid", file=sys.stderr)
        return EX_CONFIG
    except ValidationError as exc:  # from the environment
        for err in exc.errors():
            print(f"mcrd: MCRD_{str(err['loc'][0]).upper()}: {err['msg']}", file=sys.stderr)
        return EX_CONFIG
    except ValueError as exc:  # an unknown user or group
        print(f"mcrd: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check:
        extra = f" and {len(saved)} saved runtime rule(s)" if saved else ""
        print(f"{path}: OK, {len(loaded.rules)} rule(s){extra}")
        return EX_OK
    setup_logging(settings.log_level)
    raise_fd_limit()
    relay = Relay(settings, cli, loaded, book, identity, access)
    try:
        return asyncio.run(relay.run())
    except KeyboardInterrupt:
        return EX_OK


class Relay:
    """The running daemon: what runs, and every way to change it."""

    def __init__(
        self,
        settings: DaemonSettings,
        cli: dict[str, Any],
        loaded: LoadedConfig,
        book: RuleBook,
        identity: tuple[int, int],
        access: Access,
    ) -> None:
        self.settings = settings
        self.cli = cli
        self.book = book
        self.access = access
        self.systemd = Systemd()
        self.supervisor = Supervisor(
            book.combined(),
            identity,
            worker_timeout=settings.worker_timeout,
            lanes=workers_per_input(settings.workers, os.cpu_count()),
            ring=RingSpec.of_size(settings.ring_size),
            offload=settings.offload,
        )
        self.changes = asyncio.Lock()  # one change to the running rules at a time
        self.reloader = Reloader(
            loaded.path,
            lambda: list(self.book.file),
            self.apply_file,
            before=self.systemd.reloading,
            after=lambda outcome: self.systemd.ready(self.status_line()),
            loaded=loaded,
            check=lambda new: self.book.with_file(new.rules).problems(),
        )
        self.reloader.seen = read_rule_file(loaded.path) if not loaded.missing else None

    # -- the rules ---------------------------------------------------------

    async def change(self, book: RuleBook) -> None:
        """Run `book` if it is valid as a whole; ControlError with the problems if not."""
        problems = book.problems()
        if problems:
            raise ControlError("invalid", "; ".join(problems))
        self.book = book
        await self.supervisor.apply(book.combined())

    async def apply_file(self, new: LoadedConfig) -> None:
        async with self.changes:
            try:
                await self.change(self.book.with_file(new.rules))
            except ControlError as exc:  # runtime rules changed since the reload was checked
                raise ConfigError(new.path, [f"{new.path}: {exc.message}"]) from None
        effective = DaemonSettings.resolve(self.cli, new.daemon)
        logging.getLogger().setLevel(effective.log_level.upper())
        if effective.control_socket != self.settings.control_socket:
            log.warning(
                "control_socket changed to %s: takes effect when mcrd restarts", effective.control_socket
            )

    def status_line(self) -> str:
        active, pending = self.supervisor.counts()
        text = f"{active} rule(s) active, {pending} pending"
        loaded = self.reloader.loaded
        if loaded is not None and loaded.missing:
            text += f"; {loaded.path} missing"
        last = self.reloader.last
        if last is not None and last.result == "rejected":
            text += f"; last reload rejected: {last.errors[0]}"
        return text

    # -- running -----------------------------------------------------------

    async def run(self) -> int:
        settings, loop = self.settings, asyncio.get_running_loop()
        if self.reloader.loaded is not None and self.reloader.loaded.missing:
            log.warning("%s does not exist: running with no rules from it", self.reloader.path)
        elif not self.book.file:
            log.warning("%s has no rules", self.reloader.path)
        first_links = asyncio.Event()

        def on_links(snapshot: Snapshot) -> None:
            self.supervisor.observe_links(snapshot)
            first_links.set()

        LinkMonitor(loop, on_links).start()
        try:
            async with asyncio.timeout(2.0):
                await first_links.wait()
        except TimeoutError:
            log.warning("netlink gave no interface list; checking interfaces directly until it does")
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reloader.request("SIGHUP"))
        server = ControlServer(
            settings.control_socket,
            self.commands(),
            self.access,
            Limits(settings.max_clients, settings.client_timeout),
        )
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot serve the control socket %s: %s", settings.control_socket, exc.strerror or exc)
            return EX_FAIL
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.supervisor.start()
            tasks = [
                asyncio.create_task(self.reloader.run(), name="reloader"),
                asyncio.create_task(
                    keep_alive(self.supervisor, self.systemd, self.status_line), name="keepalive"
                ),
            ]
            if settings.watch:
                tasks.append(
                    asyncio.create_task(watch_file(self.reloader.path, self.reloader, stop), name="watch")
                )
            active, pending = self.supervisor.counts()
            log.info(
                "mcrd %s ready: %d rule(s) active, %d pending, control socket %s",
                __version__,
                active,
                pending,
                settings.control_socket,
            )
            self.systemd.ready(self.status_line())
            await stop.wait()
            log.info("stopping")
            self.systemd.stopping()
        finally:
            for task in tasks:
                task.cancel()
            await self.supervisor.stop()
            await server.close()
        return EX_OK

    # -- control commands ----------------------------------------------------

    def commands(self) -> dict[str, Command]:
        read: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "ping": self.cmd_ping,
            "version": self.cmd_version,
            "status": self.cmd_status,
            "list": self.cmd_list,
            "stats": self.cmd_stats,
            "workers": self.cmd_workers,
            "config.show": self.cmd_config_show,
            "config.check": self.cmd_config_check,
            "log-level.get": self.cmd_log_level_get,
        }
        write: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "reload": self.cmd_reload,
            "add": self.cmd_add,
            "remove": self.cmd_remove,
            "config.save": self.cmd_config_save,
            "log-level.set": self.cmd_log_level_set,
        }
        return {**{n: Command(h) for n, h in read.items()}, **{n: Command(h, True) for n, h in write.items()}}

    async def cmd_ping(self, _: dict[str, Any]) -> Any:
        return {"pong": True, "pid": os.getpid()}

    async def cmd_version(self, _: dict[str, Any]) -> Any:
        return {"version": __version__, "protocol": PROTOCOL_VERSION}

    async def cmd_list(self, _: dict[str, Any]) -> Any:
        return {"rules": self.supervisor.rule_views(self.book.origin)}

    async def cmd_stats(self, _: dict[str, Any]) -> Any:
        await self.supervisor.sample_all()
        return self.supervisor.stats_view()

    async def cmd_workers(self, _: dict[str, Any]) -> Any:
        return {"workers": self.supervisor.worker_views()}

    async def cmd_reload(self, _: dict[str, Any]) -> Any:
        return (await self.reloader.request("mcrctl reload")).as_dict()

    async def cmd_status(self, _: dict[str, Any]) -> Any:
        active, pending = self.supervisor.counts()
        loaded, last = self.reloader.loaded, self.reloader.last
        origins = [self.book.origin(r) for r in self.book.combined()]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(self.reloader.path),
            "config_missing": bool(loaded and loaded.missing),
            "rules": active + pending,
            "active": active,
            "pending": pending,
            "origins": {o: origins.count(o) for o in ("file", "runtime", "saved")},
            "max_rules": self.settings.max_rules,
            "workers": self.supervisor.worker_views(),
            "last_reload": last.as_dict() if last else None,
            "reloads": self.reloader.count,
            "watching": self.settings.watch,
            "runtime_rules": str(self.settings.runtime_rules),
            "log_level": logging.getLevelName(logging.getLogger().level).lower(),
        }

    async def cmd_add(self, args: dict[str, Any]) -> Any:
        raw = args.get("rule")
        if not isinstance(raw, dict):
            raise ControlError("bad-request", "'rule' must be an object")
        try:
            spec = RuleSpec.model_validate(raw)
        except ValidationError as exc:
            raise ControlError("invalid", "; ".join(format_validation_errors(exc))) from None
        async with self.changes:
            await self.change(self.book.with_added(spec))
        log.info("runtime rule %s added: %s", spec.display_name(), spec.key)
        return next(v for v in self.supervisor.rule_views(self.book.origin) if v["key"] == str(spec.key))

    async def cmd_remove(self, args: dict[str, Any]) -> Any:
        name, ident = args.get("name"), args.get("id")
        if (
            not isinstance(name, str | None)
            or not isinstance(ident, str | None)
            or (name is None) == (ident is None)
        ):
            raise ControlError("bad-request", "give exactly one of 'name' and 'id' as a string")
        async with self.changes:
            spec = self.book.find(name=name, ident=ident)
            if spec is None:
                raise ControlError(
                    "not-found", f"no rule {'named ' + repr(name) if name else 'with id ' + repr(ident)}"
                )
            if self.book.origin(spec) == "file":
                raise ControlError(
                    "file-rule",
                    f"rule {spec.display_name()!r} comes from {self.reloader.path}: remove it from that file",
                )
            await self.change(self.book.without(spec))
        log.info("runtime rule %s removed", spec.display_name())
        return {"removed": spec.display_name(), "id": rule_id(spec.key), "origin": "runtime"}

    async def cmd_config_show(self, _: dict[str, Any]) -> Any:
        notes = {}
        for spec in self.book.combined():
            origin = self.book.origin(spec)
            notes[spec.key] = {
                "file": f"from {self.reloader.path}",
                "runtime": "added at run time, not saved",
                "saved": f"added at run time, saved in {self.settings.runtime_rules}",
            }[origin] + f" (id {rule_id(spec.key)})"
        header = f"# The rules mcrd (pid {os.getpid()}) runs now.\n"
        return {"toml": dump_rules(self.book.combined(), header, notes)}

    async def cmd_config_check(self, args: dict[str, Any]) -> Any:
        text, name = args.get("text"), args.get("path", "<request>")
        if not isinstance(text, str) or not isinstance(name, str):
            raise ControlError("bad-request", "'text' and 'path' must be strings")
        path = Path(name)
        try:
            loaded = parse_config(text, path)
        except ConfigError as exc:
            return {"valid": False, "errors": exc.errors, "rules": 0}
        problems = [f"{path}: {p}" for p in self.book.with_file(loaded.rules).problems()]
        return {"valid": not problems, "errors": problems, "rules": len(loaded.rules)}

    async def cmd_config_save(self, _: dict[str, Any]) -> Any:
        async with self.changes:
            runtime = list(self.book.runtime)
            path = self.settings.runtime_rules
            try:
                write_atomically(path, dump_rules(runtime, SAVED_HEADER))
            except OSError as exc:
                raise ControlError("io", f"cannot write {path}: {exc.strerror or exc}") from None
            self.book = self.book.marked_saved()
        log.info("saved %d runtime rule(s) to %s", len(runtime), path)
        return {"path": str(path), "rules": len(runtime)}

    async def cmd_log_level_get(self, _: dict[str, Any]) -> Any:
        return {"level": logging.getLevelName(logging.getLogger().level).lower()}

    async def cmd_log_level_set(self, args: dict[str, Any]) -> Any:
        level = args.get("level")
        if level not in LOG_LEVELS:
            raise ControlError("bad-request", f"level must be one of {', '.join(LOG_LEVELS)}")
        logging.getLogger().setLevel(str(level).upper())
        log.warning("log level set to %s", level)
        return {"level": level}


async def keep_alive(supervisor: Supervisor, systemd: Systemd, status_line: Callable[[], str]) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
