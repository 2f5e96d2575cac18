"""`mcrctl`: talk to a running mcrd over its control socket.

Human tables by default, `--json` for scripts. Exit codes: 0 success, 1 the
daemon answered with an error (or refused the rule, file or command),
2 usage error, 3 no daemon reachable, 4 `reload` found nothing to change.
`add` takes MCR's mcrctl options, so its users can move over unchanged.

Imports only the control client, the protocol and the defaults: no asyncio,
no pydantic, nothing of the daemon's side. It must start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcrd import __version__
from mcrd.control.client import call
from mcrd.control.protocol import ControlError
from mcrd.defaults import DEFAULT_CONTROL_SOCKET, LOG_LEVELS

EX_OK, EX_ERROR, EX_USAGE, EX_UNREACHABLE, EX_UNCHANGED = 0, 1, 2, 3, 4


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted after the command too (`mcrctl stats --json`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-s", "--socket", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument(
        "-j", "--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    p = argparse.ArgumentParser(prog="mcrctl", description="Control and inspect a running mcrd.")
    p.add_argument(
        "-s",
        "--socket",
        type=Path,
        default=None,
        help=f"control socket (default: $MCRD_CONTROL_SOCKET or {DEFAULT_CONTROL_SOCKET})",
    )
    p.add_argument("-j", "--json", action="store_true", help="print the daemon's reply as JSON")
    p.add_argument("-V", "--version", action="version", version=f"mcrctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("ping", parents=[common], help="check that mcrd answers")
    sub.add_parser("version", parents=[common], help="the daemon's version")
    sub.add_parser("status", parents=[common], help="daemon health, rule file, last reload, rule counts")
    sub.add_parser(
        "list", parents=[common], help="every rule with its id, origin, state and why it is pending"
    )
    stats = sub.add_parser("stats", parents=[common], help="per-rule and per-output counters and rates")
    stats.add_argument("-w", "--watch", action="store_true", help="refresh in place until interrupted")
    stats.add_argument(
        "-n", "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    sub.add_parser("workers", parents=[common], help="worker processes")
    reload = sub.add_parser(
        "reload",
        parents=[common],
        help="re-read the rule file and apply it; waits for the outcome "
        "(exit 0 applied, 4 unchanged, 1 rejected)",
    )
    reload.add_argument(
        "--unchanged-ok", action="store_true", help="exit 0 when nothing changed (for ExecReload=)"
    )
    add = sub.add_parser("add", parents=[common], help="add a runtime rule (MCR's mcrctl options)")
    add.add_argument("--input-interface", required=True, metavar="IFACE")
    add.add_argument("--input-group", required=True, metavar="GROUP")
    add.add_argument("--input-port", required=True, type=int, metavar="PORT")
    add.add_argument("--source", default=None, metavar="ADDR", help="only this sender: an (S,G) rule")
    add.add_argument(
        "--outputs",
        required=True,
        metavar="GROUP:PORT[:IFACE[:TTL]][,...]",
        help="comma-separated destinations",
    )
    add.add_argument("--name", default=None)
    add.add_argument(
        "--rate-pps", type=int, default=None, metavar="N", help="drop datagrams beyond N per second"
    )
    add.add_argument(
        "--rate-bps", type=int, default=None, metavar="N", help="drop datagrams beyond N bits per second"
    )
    remove = sub.add_parser("remove", parents=[common], help="remove a runtime rule")
    which = remove.add_mutually_exclusive_group(required=True)
    which.add_argument("--name")
    which.add_argument("--id", "--rule-id", dest="id", metavar="ID")
    config = sub.add_parser(
        "config", parents=[common], help="the running rules as TOML, check a file, save runtime rules"
    )
    csub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    csub.add_parser("show", parents=[common], help="print the running rules as TOML, each with its origin")
    check = csub.add_parser(
        "check", parents=[common], help="would this file be accepted by a reload? (exit 0 yes, 1 no)"
    )
    check.add_argument("file", type=Path)
    csub.add_parser(
        "save", parents=[common], help="persist the runtime rules to the saved-rules file (atomically)"
    )
    level = sub.add_parser("log-level", parents=[common], help="get or set the daemon's log level")
    lsub = level.add_subparsers(dest="action", metavar="ACTION", required=True)
    lsub.add_parser("get", parents=[common])
    lset = lsub.add_parser("set", parents=[common])
    lset.add_argument("level", choices=LOG_LEVELS)
    return p


def parse_outputs(text: str) -> list[dict[str, Any]]:
    """MCR's output list: GROUP:PORT:IFACE[,...], here also GROUP:PORT and a fourth field TTL."""
    outputs = []
    for item in text.split(","):
        fields = item.strip().split(":")
        if not 2 <= len(fields) <= 4 or not all(fields[:2]):
            raise UsageError(f"--outputs: {item.strip()!r} is not GROUP:PORT[:IFACE[:TTL]]")
        out: dict[str, Any] = {"group": fields[0]}
        try:
            out["port"] = int(fields[1])
            if len(fields) == 4:
                out["ttl"] = int(fields[3])
        except ValueError:
            raise UsageError(f"--outputs: {item.strip()!r}: port and TTL must be numbers") from None
        if len(fields) >= 3 and fields[2]:
            out["interface"] = fields[2]
        outputs.append(out)
    return outputs


def rule_from_args(args: argparse.Namespace) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "input": {"interface": args.input_interface, "group": args.input_group, "port": args.input_port},
        "outputs": parse_outputs(args.outputs),
    }
    if args.source is not None:
        rule["input"]["source"] = args.source
    if args.name is not None:
        rule["name"] = args.name
    if args.rate_pps is not None or args.rate_bps is not None:
        rule["rate_limit"] = {
            k: v for k, v in (("pps", args.rate_pps), ("bps", args.rate_bps)) if v is not None
        }
    return rule


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The protocol command and arguments for a command line."""
    command: str = args.command
    if command == "add":
        return "add", {"rule": rule_from_args(args)}
    if command == "remove":
        return "remove", {"name": args.name} if args.name is not None else {"id": args.id}
    if command == "config":
        if args.action == "check":
            try:
                text = args.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"config check: cannot read {args.file}: {exc}") from None
            return "config.check", {"text": text, "path": str(args.file)}
        return f"config.{args.action}", {}
    if command == "log-level":
        return (f"log-level.{args.action}", {"level": args.level} if args.action == "set" else {})
    return command, {}


# -- human output ------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _input(view: dict[str, Any]) -> str:
    i = view["input"]
    src = f" from {i['source']}" if i.get("source") else ""
    return f"{i['interface']} {i['group']}:{i['port']}{src}"


def _rate(pps: float, bps: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bps >= scale:
            return f"{pps:.0f}/s {bps / scale:.1f}{unit}b/s"
    return f"{pps:.0f}/s {bps:.0f}b/s"


def show_list(result: dict[str, Any]) -> str:
    if not result["rules"]:
        return "no rules"
    rows = []
    for v in result["rules"]:
        state = v["state"] + (f" ({v['reason']})" if v["reason"] else "")
        outs = ", ".join(
            o["destination"] + ("" if o["state"] == "active" else f" [{o['state']}: {o['reason']}]")
            for o in v["outputs"]
        )
        path = v.get("path", "user")
        if path == "user" and v.get("path_reason") and v["path_reason"] != "offload is off":
            path += f" ({v['path_reason']})"
        rows.append([v["id"], v["name"] or "-", v["origin"], _input(v), outs, state, path])
    table = _table(rows, ["ID", "NAME", "ORIGIN", "INPUT", "OUTPUTS", "STATE", "PATH"])
    notes = [
        f"warning: {v['id']} {v['name'] or _input(v)}: {w}"
        for v in result["rules"]
        for w in v.get("warnings", [])
    ]
    return "\n".join([table, *notes])


def show_stats(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rules"]:
        limited = r.get("drops", {}).get("rate_limit", 0)
        looped = r.get("drops", {}).get("loop", 0)
        expired = r.get("drops", {}).get("ttl", 0)
        dropped = ", ".join(
            text
            for text in (
                f"rate-limited {limited}" if limited else "",
                f"loop {looped}" if looped else "",
                f"ttl expired {expired}" if expired else "",
            )
            if text
        )
        rows.append(
            [
                r["name"] or r["key"],
                "in",
                str(r["packets"]),
                str(r["bytes"]),
                _rate(r["pps"], r["bps"]),
                dropped,
                "",
            ]
        )
        for o in r["outputs"]:
            rows.append(
                [
                    "",
                    "-> " + o["destination"],
                    str(o["packets"]),
                    str(o["bytes"]),
                    _rate(o.get("pps", 0.0), o.get("bps", 0.0)),
                    str(o["errors"]),
                    o.get("last_error", ""),
                ]
            )
    parts = [
        _table(rows, ["RULE", "DIRECTION", "PACKETS", "BYTES", "RATE", "ERRORS/DROPS", "LAST ERROR"])
        if rows
        else "no rules"
    ]
    irows = []
    for i in result["interfaces"]:
        drops = ", ".join(f"{k} {v}" for k, v in i["drops"].items() if v) or "none"
        irows.append(
            [
                i["interface"],
                ",".join(str(p) for p in i.get("workers", [])) or "-",
                i["state"],
                i["filter"],
                str(i["received"]),
                drops,
            ]
        )
    if irows:
        parts.append(_table(irows, ["INTERFACE", "WORKER", "STATE", "FILTER", "RECEIVED", "DROPS"]))
    return "\n\n".join(parts)


def show_workers(result: dict[str, Any]) -> str:
    rows = [
        [
            w["interface"],
            str(w.get("lane", 0)),
            str(w["pid"] or "-"),
            w["state"],
            str(w.get("received", 0)),
            str(w["restarts"]),
            str(w["rules"]),
            w["reason"],
        ]
        for w in result["workers"]
    ]
    header = ["INTERFACE", "LANE", "PID", "STATE", "RECEIVED", "RESTARTS", "RULES", "REASON"]
    return _table(rows, header) if rows else "no workers"


def show_reload(result: dict[str, Any]) -> str:
    if result["result"] == "rejected":
        return "\n".join(["rejected, running rules kept:", *(f"  {e}" for e in result["errors"])])
    if result["result"] == "unchanged":
        lines = [f"unchanged ({result['rules']} rule(s))"]
    else:
        lines = [f"applied ({result['rules']} rule(s))"]
        for what in ("added", "removed", "changed", "settings"):
            if result.get(what):
                lines.append(f"  {what}: {', '.join(result[what])}")
    restart = result.get("restart_needed")  # an older mcrd does not send it
    if restart:
        lines.append(f"  restart needed for: {', '.join(restart)} (mcrd still runs with the old values)")
    return "\n".join(lines)


def show_status(result: dict[str, Any]) -> str:
    config = result["config"] + (" (missing)" if result["config_missing"] else "")
    restarts = sum(w["restarts"] for w in result["workers"])
    origins = ", ".join(f"{n} {o}" for o, n in result.get("origins", {}).items() if n)
    lines = [
        f"mcrd {result['version']}, pid {result['pid']}",
        f"config:  {config}",
        f"rules:   {result['rules']} ({result['active']} active, {result['pending']} pending"
        + (f"; {origins}" if origins else "")
        + ")",
        f"workers: {len(result['workers'])} ({restarts} restarts)",
    ]
    last = result.get("last_reload")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
        lines.append(f"reload:  {last['result']} at {when} ({', '.join(last['triggers'])})")
        lines.extend(f"         {e}" for e in last["errors"])
    if result.get("restart_needed"):
        lines.append(f"restart: needed for {', '.join(result['restart_needed'])}")
    return "\n".join(lines)


def show_added(result: dict[str, Any]) -> str:
    state = result["state"] + (f" ({result['reason']})" if result["reason"] else "")
    return f"added rule {result['name'] or result['key']} (id {result['id']}): {state}"


def show_check(result: dict[str, Any]) -> str:
    if result["valid"]:
        return f"OK, {result['rules']} rule(s)"
    return "\n".join(result["errors"])


SHOW: dict[str, Callable[[dict[str, Any]], str]] = {
    "ping": lambda r: f"pong from mcrd pid {r['pid']}",
    "version": lambda r: f"mcrd {r['version']} (protocol {r['protocol']}), mcrctl {__version__}",
    "status": show_status,
    "list": show_list,
    "stats": show_stats,
    "workers": show_workers,
    "reload": show_reload,
    "add": show_added,
    "remove": lambda r: f"removed rule {r['removed']} (id {r['id']})",
    "config.show": lambda r: str(r["toml"]).rstrip("\n"),
    "config.check": show_check,
    "config.save": lambda r: f"saved {r['rules']} runtime rule(s) to {r['path']}",
    "log-level.get": lambda r: str(r["level"]),
    "log-level.set": lambda r: f"log level is now {r['level']}",
}


def exit_code(command: str, result: dict[str, Any], unchanged_ok: bool = False) -> int:
    if command == "reload":
        unchanged = EX_OK if unchanged_ok else EX_UNCHANGED
        return {"applied": EX_OK, "unchanged": unchanged}.get(result["result"], EX_ERROR)
    if command == "config.check":
        return EX_OK if result["valid"] else EX_ERROR
    return EX_OK


def watch(path: Path, interval: float, as_json: bool) -> int:
    try:
        while True:
            result = call(path, "stats")
            text = json.dumps(result) if as_json else show_stats(result)
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(
                f"\x1b[H\x1b[2J{stamp}  mcrd stats (every {interval:g}s, ^C to stop)\n\n{text}\n"
            )
            sys.stdout.flush()
            time.sleep(interval)  # the refresh period the user asked for
    except KeyboardInterrupt:
        return EX_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.socket or Path(os.environ.get("MCRD_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET)
    try:
        command, request = request_for(args)
        if command == "stats" and args.watch:
            return watch(path, args.interval, args.json)
        result = call(path, command, request, timeout=30.0)
        text = json.dumps(result, indent=2) if args.json else SHOW[command](result)
        code = exit_code(command, result, getattr(args, "unchanged_ok", False))
    except UsageError as exc:
        print(f"mcrctl: {exc}", file=sys.stderr)
        return EX_USAGE
    except ControlError as exc:
        if exc.code == "bad-reply":
            print(f"mcrctl: {args.command}: malformed reply from mcrd at {path}: {exc}", file=sys.stderr)
        else:
            print(f"mcrctl: {args.command}: {exc}", file=sys.stderr)
        return EX_ERROR
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"mcrctl: mcrd is not running (no daemon at {path})", file=sys.stderr)
        return EX_UNREACHABLE
    except PermissionError:
        print(f"mcrctl: permission denied on {path}", file=sys.stderr)
        return EX_UNREACHABLE
    except OSError as exc:
        print(f"mcrctl: {path}: {exc}", file=sys.stderr)
        return EX_UNREACHABLE
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # a reply this mcrctl cannot show (another version of mcrd, or a bug):
        # say so plainly rather than with a traceback
        print(
            f"mcrctl: {args.command}: unexpected reply from mcrd ({type(exc).__name__}: {exc}); "
            "--json shows it as it came",
            file=sys.stderr,
        )
        return EX_ERROR
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
