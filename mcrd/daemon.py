"""`mcrd`: the command line, and the checks before a start.

`main` reads the settings (flags, environment, `[daemon]`), loads and checks
everything a start needs (rule file, saved runtime rules, users and groups)
and refuses to start, with EX_CONFIG, when any of it is wrong; then it hands
over to `Service`. Owns no running state: must not be imported by anything
but the console script and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
from typing import Any

from pydantic import ValidationError

from mcrd import __version__
from mcrd.config import ConfigError, LoadedConfig, load_config
from mcrd.control.server import Access
from mcrd.logs import setup_logging
from mcrd.netio import RingSpec
from mcrd.privdrop import group_id, resolve_identity
from mcrd.rulebook import RuleBook, RuleSetRejected
from mcrd.service import EX_OK, Service
from mcrd.settings import (
    DaemonSettings,
    add_flags,
    given_on_command_line,
    rule_file_path,
    source_of,
    workers_per_input,
)
from mcrd.store import load_saved
from mcrd.supervisor import Supervisor

EX_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcrd",
        description="Multicast relay daemon: receives UDP datagrams on input interfaces "
        "and republishes them to other groups, ports, hosts and interfaces. Every setting "
        "has a flag, an MCRD_ variable and (but the rule file's path) a [daemon] key; the "
        "first of these that is given wins. Live settings follow a reload, the others need a restart.",
    )
    add_flags(p)
    p.add_argument(
        "-t",
        "--check",
        action="store_true",
        help="validate the rule file, print the result and exit (0: valid, 78: invalid)",
    )
    p.add_argument("-V", "--version", action="version", version=f"mcrd {__version__}")
    return p


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
    socket_group, admin_group = settings.socket_group, settings.admin_group
    return Access(
        own_uid=0 if own == identity[0] else own,
        socket_gid=None if socket_group is None else group_id(socket_group, "socket_group"),
        admin_gid=None if admin_group is None else group_id(admin_group, "admin_group"),
        admin_group=admin_group,
    )


def raise_fd_limit() -> None:
    """A socket per group membership: up to max_rules of them, beyond the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli: dict[str, Any] = given_on_command_line(args)
    path = rule_file_path(cli.get("config"))
    cli["config"] = path
    try:
        loaded = load_config(path, missing_ok=not args.check)
        settings = DaemonSettings.resolve(cli, loaded.daemon)
        identity = worker_identity(settings)
        access = control_access(settings, identity)
        saved = load_saved(settings.runtime_rules)
        book = RuleBook(
            tuple(loaded.rules), tuple(saved), frozenset(r.key for r in saved), settings.max_rules
        ).check()
    except RuleSetRejected as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        if not args.check:
            print(f"mcrd: refusing to start: {path} is invalid", file=sys.stderr)
        return EX_CONFIG
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if not args.check:
            print(f"mcrd: refusing to start: {exc.path} is invalid", file=sys.stderr)
        return EX_CONFIG
    except ValidationError as exc:  # from the environment or a flag
        for err in exc.errors():
            print(f"mcrd: {source_of(str(err['loc'][0]), cli)}: {err['msg']}", file=sys.stderr)
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
    try:
        return asyncio.run(_serve(settings, cli, loaded, book, identity, access))
    except KeyboardInterrupt:
        return EX_OK


async def _serve(
    settings: DaemonSettings,
    cli: dict[str, Any],
    loaded: LoadedConfig,
    book: RuleBook,
    identity: tuple[int, int],
    access: Access,
) -> int:
    supervisor = Supervisor(
        book.combined(),
        identity,
        worker_timeout=settings.worker_timeout,
        lanes=workers_per_input(settings.workers, os.cpu_count()),
        ring=RingSpec.of_size(settings.ring_size, settings.busy_poll),
        offload=settings.offload,
    )
    return await Service(settings, cli, loaded, book, access, supervisor).run()


if __name__ == "__main__":
    sys.exit(main())
