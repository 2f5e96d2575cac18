"""Starting a real mcrd in a network namespace, and stopping it: the one way
the demo, the benchmarks and the end-to-end tests do it.

mcrd is asked whether it is ready through `mcrctl --json` (its public
interface) on the control socket, as an operator would, not through mcrd's
internal modules.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self


class LaunchError(RuntimeError):
    """mcrd exited, or did not become ready in time."""


def mcrctl(
    sock: Path, *args: str, timeout: float = 20.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run mcrctl of this checkout's mcrd (or, with `env` naming another
    PYTHONPATH, that one's) on control socket `sock`."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "mcrd.ctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **env} if env else None,
    )


def mcrctl_json(sock: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """mcrctl's JSON answer; LaunchError if it failed."""
    proc = mcrctl(sock, "--json", *args, env=env)
    if proc.returncode != 0:
        raise LaunchError(f"mcrctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


class McrdProcess:
    """A real mcrd process in namespace `ns`, on rule file `config` and
    control socket `socket`.

    Its output goes to `log` (appended, stderr included) if given, is
    discarded if `quiet` (which also means warnings only and no file watching:
    benchmarks), and is ours otherwise (the demo). `runtime_rules` is where it
    keeps rules added at run time; `env` is added to our environment; `cpu`
    pins it (and its workers) to that CPU.
    """

    def __init__(
        self,
        ns: str,
        config: Path,
        socket: Path,
        *,
        log: Path | None = None,
        log_level: str | None = None,
        quiet: bool = False,
        runtime_rules: Path | None = None,
        env: dict[str, str] | None = None,
        cpu: str | None = None,
    ) -> None:
        self.ns = ns
        self.config = config
        self.socket = socket
        self.log = log
        self.log_level = log_level
        self.quiet = quiet
        self.runtime_rules = runtime_rules
        self.env = env
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        argv = ["ip", "netns", "exec", self.ns, *(["taskset", "-c", self.cpu] if self.cpu else [])]
        # -P: the package comes from the environment (the virtualenv, or a
        # PYTHONPATH naming another one), never from the current directory
        argv += [sys.executable, "-P", "-m", "mcrd.daemon", "--config", str(self.config)]
        argv += ["--control-socket", str(self.socket)]
        if self.quiet:
            argv += ["--log-level", "warning", "--no-watch"]
        elif self.log_level is not None:
            argv += ["--log-level", self.log_level]
        return [*argv, *extra]

    def spawn(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start mcrd with `extra` arguments, without waiting for it."""
        env = {**os.environ, **(self.env or {})}
        if self.runtime_rules is not None:
            env["MCRD_RUNTIME_RULES"] = str(self.runtime_rules)
        if self.log is not None:
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(self.argv(*extra), stdout=out, stderr=subprocess.STDOUT, env=env)
        else:
            out_or_none = subprocess.DEVNULL if self.quiet else None
            self.proc = subprocess.Popen(self.argv(*extra), stdout=out_or_none, stderr=out_or_none, env=env)
        return self.proc

    def answers(self) -> bool:
        """Whether mcrd answers on its control socket; LaunchError if it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            log = f":\n{self.log.read_text()}" if self.log is not None and self.log.exists() else ""
            raise LaunchError(f"mcrd exited with status {self.proc.returncode}{log}")
        return mcrctl(self.socket, "ping", env=self.env).returncode == 0

    def all_active(self) -> bool:
        """Whether every rule mcrd lists is active (relaying)."""
        return all(r["state"] == "active" for r in mcrctl_json(self.socket, "list", env=self.env)["rules"])

    def wait_ready(self, *, all_active: bool = True, timeout: float = 15.0) -> None:
        """Wait until mcrd answers and, if `all_active`, relays every rule."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if time.monotonic() > deadline:
                raise LaunchError("mcrd did not answer on its control socket in time")
            time.sleep(0.05)  # polling a process that is starting
        while all_active and not self.all_active():
            if time.monotonic() > deadline:
                raise LaunchError("mcrd did not make all its rules active in time")
            time.sleep(0.05)

    def start(self, *extra: str, all_active: bool = True, timeout: float = 15.0) -> Self:
        """Spawn with `extra` arguments, then wait until ready."""
        self.spawn(*extra)
        self.wait_ready(all_active=all_active, timeout=timeout)
        return self

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def pids(self) -> list[int]:
        """mcrd's process id and its workers'."""
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc is not None else []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (mcrd's workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
