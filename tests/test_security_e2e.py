"""End to end: privilege separation and access control, with real users.

The test creates its own system users and groups (unique names, removed on
exit) and runs mcrctl as them.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcrd.lab import Receiver, Sender
from mcrd.privdrop import process_credentials

from .conftest import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]

BASIC = """
[[rule]]
name = "camera"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]
"""
SIDE = """
[[rule]]
name = "side"
input = { interface = "out1", group = "239.5.5.5", port = 5000 }
outputs = [ { interface = "out0", group = "239.6.6.6" } ]
"""

NO_CAPS = "0000000000000000"


@dataclass
class Accounts:
    tag: str
    users: list[str]
    groups: list[str]

    def user(self, name: str, *groups: str) -> str:
        full = f"{self.tag}{name}"
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
        if groups:
            cmd += ["--groups", ",".join(groups)]
        subprocess.run([*cmd, full], check=True, capture_output=True)
        self.users.append(full)
        return full

    def group(self, name: str) -> str:
        full = f"{self.tag}{name}"
        subprocess.run(["groupadd", "--system", full], check=True, capture_output=True)
        self.groups.append(full)
        return full


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    made = Accounts(f"mt{os.getpid() % 100000}", [], [])
    try:
        yield made
    finally:
        for user in made.users:
            subprocess.run(["userdel", user], capture_output=True, check=False)
        for group in made.groups:
            subprocess.run(["groupdel", group], capture_output=True, check=False)


def test_workers_run_unprivileged_and_still_relay(
    net: Net, tmp_path: Path, daemons: list[Daemon], accounts: Accounts
) -> None:
    user = accounts.user("worker")
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(user).gr_gid
    daemon = start_mcrd(net, tmp_path, daemons, BASIC, "--user", user)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    Sender(net.src, "eth0").stream("239.1.1.1", 5000, stream=1, count=100)
    assert rx.wait_for(lambda a: len(rx.seqs(1)) == 100)

    # A rule on an interface that had no worker: the supervisor opens its
    # sockets, the new worker still runs with nothing.
    daemon.config.write_text(BASIC + SIDE)
    wait_until(lambda: len(mcrctl_json(daemon.socket, "workers")["workers"]) == 2, what="the second worker")
    wait_until(daemon.all_active, what="the new rule")
    for worker in mcrctl_json(daemon.socket, "workers")["workers"]:
        creds = process_credentials(worker["pid"])
        assert creds["Uid"].split() == [str(uid)] * 4, creds
        assert creds["Gid"].split() == [str(gid)] * 4, creds
        assert creds["Groups"] == ""
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert creds[cap] == NO_CAPS, (cap, creds)
        assert creds["NoNewPrivs"] == "1"
    rx2 = Receiver(net.dst1, "239.6.6.6", 5000, "eth0")
    Sender(net.dst2, "eth0").stream("239.5.5.5", 5000, stream=2, count=50)
    assert rx2.wait_for(lambda a: len(rx2.seqs(2)) == 50)
    # The supervisor keeps what it needs.
    assert process_credentials(daemon.proc.pid if daemon.proc else 0)["Uid"].split()[0] == "0"


def test_default_worker_identity_is_nobody(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    (worker,) = mcrctl_json(daemon.socket, "workers")["workers"]
    creds = process_credentials(worker["pid"])
    assert creds["Uid"].split()[0] == str(pwd.getpwnam("nobody").pw_uid)
    assert creds["CapEff"] == NO_CAPS and creds["CapBnd"] == NO_CAPS


def test_unknown_worker_user_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "mcr.toml").write_text('[daemon]\nuser = "no-such-user-here"\n')
    result = subprocess.run(
        [sys.executable, "-m", "mcrd.daemon", "--check", "--config", str(tmp_path / "mcr.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78
    assert result.stderr == "mcrd: no such user 'no-such-user-here'\n"
