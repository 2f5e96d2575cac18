"""Shared fixtures: a running mcrd in a namespace, and a way to talk to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mcrd.lab import Lab

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 for network namespaces"
)


def mcrctl(sock: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mcrd.ctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
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


class Daemon:
    """A real mcrd process in a namespace, on its own control socket."""

    def __init__(
        self,
        ns: str,
        config: Path,
        workdir: Path,
        env: dict[str, str] | None = None,
        socket: Path | None = None,
    ) -> None:
        self.ns = ns
        self.env = env
        self.config = config
        self.socket = socket or workdir / "control.sock"
        self.log = workdir / "mcrd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, wait_active: bool = True) -> Daemon:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns,
                    sys.executable,
                    "-m",
                    "mcrd.daemon",
                    "--config",
                    str(self.config),
                    "--control-socket",
                    str(self.socket),
                    "--log-level",
                    "debug",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
            )
        wait_until(self.answers, what="mcrd to answer on its control socket")
        if wait_active:
            wait_until(self.all_active, what="all rules active")
        return self

    def answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mcrd exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return mcrctl(self.socket, "ping", check=False).returncode == 0

    def all_active(self) -> bool:
        return all(r["state"] == "active" for r in mcrctl_json(self.socket, "list")["rules"])

    def stats(self) -> Any:
        return mcrctl_json(self.socket, "stats")

    def rule_stats(self, name: str) -> Any:
        return next(r for r in self.stats()["rules"] if r["name"] == name)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("mcrt") as built:
        yield built


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


@dataclass
class Net:
    lab: Lab
    src: str
    relay: str
    dst1: str
    dst2: str


@pytest.fixture
def net(lab: Lab) -> Net:
    src, relay, dst1, dst2 = (lab.netns(r) for r in ("src", "relay", "dst1", "dst2"))
    lab.link(src, "eth0", relay, "in0", "192.0.2.10/24", "192.0.2.1/24")
    lab.link(relay, "out0", dst1, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    lab.link(relay, "out1", dst2, "eth0", "203.0.113.1/25", "203.0.113.2/25")
    return Net(lab, src, relay, dst1, dst2)


def start_mcrd(
    net: Net,
    tmp_path: Path,
    daemons: list[Daemon],
    rules: str,
    *extra: str,
    env: dict[str, str] | None = None,
    wait_active: bool = True,
) -> Daemon:
    config = tmp_path / "mcr.toml"
    config.write_text(rules)
    daemon = Daemon(net.relay, config, tmp_path, env=env)
    daemons.append(daemon)
    return daemon.start(*extra, wait_active=wait_active)
