"""How the end-to-end tests run mcrd: a `Daemon` in the relay namespace of a
`Net`, and mcrctl against it. Starting and stopping are lab.launch's, the
same as the demo's and the benchmarks'."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from lab import launch
from lab.launch import McrdProcess
from lab.net import Lab

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for network namespaces"
)


def mcrctl(sock: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = launch.mcrctl(sock, *args)
    if check and proc.returncode != 0:
        raise AssertionError(f"mcrctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def mcrctl_json(sock: Path, *args: str) -> Any:
    return json.loads(mcrctl(sock, "--json", *args).stdout)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition that changes on an event elsewhere (a reply, a counter)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Daemon(McrdProcess):
    """A real mcrd process in a namespace for one test: debug log in
    `workdir`/mcrd.log, control socket `workdir`/control.sock unless given."""

    log: Path

    def __init__(
        self,
        ns: str,
        config: Path,
        workdir: Path,
        env: dict[str, str] | None = None,
        socket: Path | None = None,
        runtime_rules: Path | None = None,
    ) -> None:
        super().__init__(
            ns,
            config,
            socket or workdir / "control.sock",
            log=workdir / "mcrd.log",
            log_level="debug",
            env=env,
            runtime_rules=runtime_rules,
        )

    def start(self, *extra: str, all_active: bool = True, timeout: float = 20.0) -> Self:
        return super().start(*extra, all_active=all_active, timeout=timeout)

    def stats(self) -> Any:
        return mcrctl_json(self.socket, "stats")

    def rule_stats(self, name: str) -> Any:
        return next(r for r in self.stats()["rules"] if r["name"] == name)


@dataclass
class Net:
    """The tests' usual topology (conftest's `net` fixture): src -- relay,
    whose out0 leads to dst1 and out1 to dst2."""

    lab: Lab
    src: str
    relay: str
    dst1: str
    dst2: str


def start_mcrd(
    net: Net,
    tmp_path: Path,
    daemons: list[Daemon],
    rules: str | None,
    *extra: str,
    env: dict[str, str] | None = None,
    runtime_rules: Path | None = None,
    all_active: bool = True,
) -> Daemon:
    """Start mcrd in `net`'s relay namespace on `rules` (None: no rule file),
    with `extra` arguments; `daemons` (the fixture) stops it after the test."""
    config = tmp_path / "mcr.toml"
    if rules is not None:
        config.write_text(rules)
    daemon = Daemon(net.relay, config, tmp_path, env=env, runtime_rules=runtime_rules)
    daemons.append(daemon)
    return daemon.start(*extra, all_active=all_active)
