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
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mcrd import __version__
from mcrd.config import DEFAULT_CONFIG, ConfigError, DaemonSettings, LoadedConfig, load_config
from mcrd.control import ControlServer, Handler
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
        settings = DaemonSettings.resolve(
            {"control_socket": args.control_socket, "log_level": args.log_level}, loaded.daemon
        )
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
    if args.check:
        print(f"{path}: OK, {len(loaded.rules)} rule(s)")
        return EX_OK
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(run(settings, loaded))
    except KeyboardInterrupt:
        return EX_OK


async def run(settings: DaemonSettings, loaded: LoadedConfig) -> int:
    if loaded.missing:
        log.warning("%s does not exist: running with no rules", loaded.path)
    elif not loaded.rules:
        log.warning("%s has no rules", loaded.path)
    supervisor = Supervisor(loaded.rules)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = ControlServer(settings.control_socket, control_handlers(supervisor, settings, loaded))
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot serve the control socket %s: %s", settings.control_socket, exc.strerror or exc)
        return EX_FAIL
    try:
        await supervisor.start()
        active = sum(1 for v in supervisor.rule_views() if v["state"] == "active")
        log.info(
            "mcrd %s ready: %d rule(s) active, %d pending, control socket %s",
            __version__,
            active,
            len(loaded.rules) - active,
            settings.control_socket,
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await supervisor.stop()
        await server.close()
    return EX_OK


def control_handlers(
    supervisor: Supervisor, settings: DaemonSettings, loaded: LoadedConfig
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

    async def status(_: dict[str, Any]) -> Any:
        views = supervisor.rule_views()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config": str(loaded.path),
            "config_missing": loaded.missing,
            "rules": len(views),
            "active": sum(1 for v in views if v["state"] == "active"),
            "pending": sum(1 for v in views if v["state"] != "active"),
            "workers": supervisor.worker_views(),
            "log_level": settings.log_level,
        }

    return {
        "ping": ping,
        "version": version,
        "list": rules,
        "stats": stats,
        "workers": workers,
        "status": status,
    }


if __name__ == "__main__":
    sys.exit(main())
