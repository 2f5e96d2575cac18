"""`mcrd`: the command line, logging, signals and the control commands.

Wires the pieces together: loads the rule file (`config`), starts the
`Supervisor` and the `ControlServer`, and runs until SIGTERM or SIGINT.
Signal handlers only set an event; the main coroutine does the work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mcrd import __version__
from mcrd.config import ConfigError, DaemonSettings, LoadedConfig, load_config, read_rule_file
from mcrd.control import ControlServer, Handler
from mcrd.defaults import DEFAULT_CONFIG
from mcrd.links import LinkMonitor, Snapshot
from mcrd.notify import Systemd, watchdog_interval
from mcrd.privdrop import resolve_identity
from mcrd.reload import Reloader, watch_file
from mcrd.supervisor import Supervisor

log = logging.getLogger("mcrd")

EX_OK = 0
EX_USAGE = 64
EX_CONFIG = 78
EX_FAIL = 1


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
    p.add_argument("-l", "--log-level", choices=["debug", "info", "warning", "error"], default=None)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path(args.config)
    try:
        loaded = load_config(path, missing_ok=not args.check)
        cli = {
            "control_socket": args.control_socket,
            "log_level": args.log_level,
            "watch": args.watch,
            "user": args.user,
            "group": args.group,
        }
        settings = DaemonSettings.resolve(cli, loaded.daemon)
        identity = worker_identity(settings)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if not args.check:
            print(f"mcrd: refusing to start: {path} is invalid", file=sys.stderr)
        return EX_CONFIG
    except ValidationError as exc:  # from the environment
        for err in exc.errors():
            print(f"mcrd: MCRD_{str(err['loc'][0]).upper()}: {err['msg']}", file=sys.stderr)
        return EX_CONFIG
    except ValueError as exc:  # an unknown user or group
        print(f"mcrd: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check:
        print(f"{path}: OK, {len(loaded.rules)} rule(s)")
        return EX_OK
    # Libraries log every netlink message and file event at debug level: far
    # too much for an operator, and watchfiles' own messages about the log
    # file would feed back into the watcher when both share a directory.
    for noisy in ("pyroute2", "watchfiles", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(run(settings, loaded, cli, identity))
    except KeyboardInterrupt:
        return EX_OK


def worker_identity(settings: DaemonSettings) -> tuple[int, int]:
    """(uid, gid) for the workers; ValueError naming what does not exist."""
    user = settings.user
    if user is None:
        user = "nobody" if os.geteuid() == 0 else str(os.geteuid())
    return resolve_identity(user, settings.group)


async def run(
    settings: DaemonSettings, loaded: LoadedConfig, cli: dict[str, Any], identity: tuple[int, int]
) -> int:
    systemd = Systemd()
    if loaded.missing:
        log.warning("%s does not exist: running with no rules", loaded.path)
    elif not loaded.rules:
        log.warning("%s has no rules", loaded.path)
    loop = asyncio.get_running_loop()
    supervisor = Supervisor(loaded.rules, identity, worker_timeout=settings.worker_timeout)
    first_links = asyncio.Event()

    def on_links(snapshot: Snapshot) -> None:
        supervisor.observe_links(snapshot)
        first_links.set()

    LinkMonitor(loop, on_links).start()
    try:
        await asyncio.wait_for(first_links.wait(), 2.0)
    except TimeoutError:
        log.warning("netlink gave no interface list; checking interfaces directly until it does")

    async def apply(new: LoadedConfig) -> None:
        effective = DaemonSettings.resolve(cli, new.daemon)
        logging.getLogger().setLevel(effective.log_level.upper())
        if effective.control_socket != settings.control_socket:
            log.warning(
                "control_socket changed to %s: takes effect when mcrd restarts", effective.control_socket
            )
        await supervisor.apply(new.rules)

    def status_line() -> str:
        active, pending = supervisor.counts()
        text = f"{active} rule(s) active, {pending} pending"
        if reloader.loaded is not None and reloader.loaded.missing:
            text += f"; {loaded.path} missing"
        if reloader.last is not None and reloader.last.result == "rejected":
            text += f"; last reload rejected: {reloader.last.errors[0]}"
        return text

    reloader = Reloader(
        loaded.path,
        lambda: supervisor.rules,
        apply,
        before=systemd.reloading,
        after=lambda outcome: systemd.ready(status_line()),
        loaded=loaded,
    )
    reloader.seen = read_rule_file(loaded.path) if not loaded.missing else None
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reloader.request("SIGHUP"))
    server = ControlServer(settings.control_socket, control_handlers(supervisor, reloader, settings))
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot serve the control socket %s: %s", settings.control_socket, exc.strerror or exc)
        return EX_FAIL
    tasks: list[asyncio.Task[None]] = []
    try:
        await supervisor.start()
        tasks = [
            asyncio.create_task(reloader.run(), name="reloader"),
            asyncio.create_task(keep_alive(supervisor, systemd, status_line), name="keepalive"),
        ]
        if settings.watch:
            tasks.append(asyncio.create_task(watch_file(loaded.path, reloader, stop), name="watcher"))
        active, pending = supervisor.counts()
        log.info(
            "mcrd %s ready: %d rule(s) active, %d pending, control socket %s",
            __version__,
            active,
            pending,
            settings.control_socket,
        )
        systemd.ready(status_line())
        await stop.wait()
        log.info("stopping")
        systemd.stopping()
    finally:
        for task in tasks:
            task.cancel()
        await supervisor.stop()
        await server.close()
    return EX_OK


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


def control_handlers(
    supervisor: Supervisor, reloader: Reloader, settings: DaemonSettings
) -> dict[str, Handler]:
    async def ping(_: dict[str, Any]) -> Any:
        return {"pong": True, "pid": os.getpid()}

    async def version(_: dict[str, Any]) -> Any:
        return {"version": __version__, "protocol": 1}

    async def rules(_: dict[str, Any]) -> Any:
        return {"rules": supervisor.rule_views()}

    async def stats(_: dict[str, Any]) -> Any:
        await supervisor.sample_all()
        return supervisor.stats_view()

    async def workers(_: dict[str, Any]) -> Any:
        return {"workers": supervisor.worker_views()}

    async def reload(_: dict[str, Any]) -> Any:
        outcome = await reloader.request("mcrctl reload")
        return outcome.as_dict()

    async def status(_: dict[str, Any]) -> Any:
        active, pending = supervisor.counts()
        loaded = reloader.loaded
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(reloader.path),
            "config_missing": bool(loaded and loaded.missing),
            "rules": active + pending,
            "active": active,
            "pending": pending,
            "workers": supervisor.worker_views(),
            "last_reload": reloader.last.as_dict() if reloader.last else None,
            "reloads": reloader.count,
            "watching": settings.watch,
            "log_level": logging.getLevelName(logging.getLogger().level).lower(),
        }

    return {
        "ping": ping,
        "version": version,
        "list": rules,
        "stats": stats,
        "workers": workers,
        "status": status,
        "reload": reload,
    }


if __name__ == "__main__":
    sys.exit(main())
