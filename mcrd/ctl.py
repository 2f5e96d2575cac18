"""`mcrctl`: talk to a running mcrd over its control socket.

Human tables by default, `--json` for scripts. Exit codes: 0 success, 1 the
daemon answered with an error, 2 usage error, 3 no daemon reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mcrd import __version__
from mcrd.control import ControlError, call
from mcrd.defaults import DEFAULT_CONTROL_SOCKET

EX_OK, EX_ERROR, EX_USAGE, EX_UNREACHABLE, EX_UNCHANGED = 0, 1, 2, 3, 4


def build_parser() -> argparse.ArgumentParser:
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
    sub.add_parser("ping", help="check that mcrd answers")
    sub.add_parser("version", help="the daemon's version")
    sub.add_parser("status", help="daemon health and rule counts")
    sub.add_parser("list", help="every rule with its state")
    sub.add_parser("stats", help="per-rule and per-output counters")
    sub.add_parser("workers", help="worker processes")
    sub.add_parser(
        "reload",
        help="re-read the rule file and apply it; waits for the outcome "
        "(exit 0 applied, 4 unchanged, 1 rejected)",
    )
    return p


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


def show_list(result: dict[str, Any]) -> str:
    if not result["rules"]:
        return "no rules"
    rows = []
    for v in result["rules"]:
        state = v["state"] + (f" ({v['reason']})" if v["reason"] else "")
        outs = ", ".join(
            o["destination"] + ("" if o["state"] == "active" else f" [pending: {o['reason']}]")
            for o in v["outputs"]
        )
        rows.append([v["name"] or "-", _input(v), outs, state])
    return _table(rows, ["NAME", "INPUT", "OUTPUTS", "STATE"])


def show_stats(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rules"]:
        rows.append(
            [r["name"] or r["key"], "in", str(r["packets"]), str(r["bytes"]), f"{r['pps']:.0f}", "", ""]
        )
        for o in r["outputs"]:
            rows.append(
                [
                    "",
                    "-> " + o["destination"],
                    str(o["packets"]),
                    str(o["bytes"]),
                    "",
                    str(o["errors"]),
                    o.get("last_error", ""),
                ]
            )
    parts = [_table(rows, ["RULE", "DIRECTION", "PACKETS", "BYTES", "PPS", "ERRORS", "LAST ERROR"])]
    irows = []
    for i in result["interfaces"]:
        drops = ", ".join(f"{k} {v}" for k, v in i["drops"].items() if v) or "none"
        irows.append(
            [i["interface"], str(i["worker"] or "-"), i["state"], i["filter"], str(i["received"]), drops]
        )
    parts.append(_table(irows, ["INTERFACE", "WORKER", "STATE", "FILTER", "RECEIVED", "DROPS"]))
    return "\n\n".join(parts)


def show_workers(result: dict[str, Any]) -> str:
    rows = [
        [w["interface"], str(w["pid"] or "-"), w["state"], str(w["restarts"]), str(w["rules"]), w["reason"]]
        for w in result["workers"]
    ]
    return (
        _table(rows, ["INTERFACE", "PID", "STATE", "RESTARTS", "RULES", "REASON"]) if rows else "no workers"
    )


def show_reload(result: dict[str, Any]) -> str:
    if result["result"] == "rejected":
        return "\n".join(["rejected, running rules kept:", *(f"  {e}" for e in result["errors"])])
    if result["result"] == "unchanged":
        return f"unchanged ({result['rules']} rule(s))"
    lines = [f"applied ({result['rules']} rule(s))"]
    for what in ("added", "removed", "changed"):
        if result[what]:
            lines.append(f"  {what}: {', '.join(result[what])}")
    return "\n".join(lines)


def show_status(result: dict[str, Any]) -> str:
    config = result["config"] + (" (missing)" if result["config_missing"] else "")
    restarts = sum(w["restarts"] for w in result["workers"])
    lines = [
        f"mcrd {result['version']}, pid {result['pid']}",
        f"config:  {config}",
        f"rules:   {result['rules']} ({result['active']} active, {result['pending']} pending)",
        f"workers: {len(result['workers'])} ({restarts} restarts)",
    ]
    last = result.get("last_reload")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
        lines.append(f"reload:  {last['result']} at {when} ({', '.join(last['triggers'])})")
        lines.extend(f"         {e}" for e in last["errors"])
    return "\n".join(lines)


SHOW = {
    "ping": lambda r: f"pong from mcrd pid {r['pid']}",
    "version": lambda r: f"mcrd {r['version']} (protocol {r['protocol']}), mcrctl {__version__}",
    "status": show_status,
    "list": show_list,
    "stats": show_stats,
    "workers": show_workers,
    "reload": show_reload,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.socket or Path(os.environ.get("MCRD_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET)
    try:
        result = call(path, args.command)
    except ControlError as exc:
        print(f"mcrctl: {args.command}: {exc}", file=sys.stderr)
        return EX_ERROR
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"mcrctl: mcrd is not running (no daemon at {path})", file=sys.stderr)
        return EX_UNREACHABLE
    except PermissionError:
        print(f"mcrctl: permission denied on {path}", file=sys.stderr)
        return EX_UNREACHABLE
    except (OSError, ValueError) as exc:
        print(f"mcrctl: {path}: {exc}", file=sys.stderr)
        return EX_UNREACHABLE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(SHOW[args.command](result))
    if args.command == "reload":
        return {"applied": EX_OK, "unchanged": EX_UNCHANGED}.get(result["result"], EX_ERROR)
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
