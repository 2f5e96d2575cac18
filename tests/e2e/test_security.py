"""End to end: privilege separation and access control, with real users.

The test creates its own system users and groups (unique names, removed on
exit) and runs mcrctl as them.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.net import Receiver, TrafficSender
from mcrd.privdrop import process_credentials
from tests.helpers.daemon import Daemon, Net, mcrctl_json, needs_root, start_mcrd, wait_until

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
            # --force: the daemon may still run workers as this user; it is stopped after us
            subprocess.run(["userdel", "--force", user], capture_output=True, check=False)
        for group in made.groups:
            subprocess.run(["groupdel", group], capture_output=True, check=False)


def test_workers_run_unprivileged_and_still_relay(
    net: Net, tmp_path: Path, daemons: list[Daemon], accounts: Accounts
) -> None:
    user = accounts.user("worker")
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(user).gr_gid
    daemon = start_mcrd(net, tmp_path, daemons, BASIC, "--user", user)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=1, count=100)
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
    TrafficSender(net.dst2, "eth0").stream("239.5.5.5", 5000, stream=2, count=50)
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


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="mcrt-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_who_may_read_and_who_may_change(
    net: Net, tmp_path: Path, daemons: list[Daemon], accounts: Accounts, public_dir: Path
) -> None:
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 to run mcrctl as another user")
    # mcrctl needs only the standard library: a copy of the package anyone can read
    shutil.copytree(Path(__file__).parent.parent.parent / "mcrd", public_dir / "lib" / "mcrd")
    readers = accounts.group("readers")
    admins = accounts.group("admins")
    outsider = accounts.user("outsider")
    reader = accounts.user("reader", readers)
    admin = accounts.user("admin", readers, admins)
    config = tmp_path / "mcr.toml"
    config.write_text(BASIC)
    daemon = Daemon(
        net.relay,
        config,
        tmp_path,
        socket=public_dir / "run" / "control.sock",
        env={"MCRD_SOCKET_GROUP": readers, "MCRD_ADMIN_GROUP": admins},
        runtime_rules=tmp_path / "runtime.toml",
    )
    daemons.append(daemon)
    daemon.start()
    mode = daemon.socket.stat()
    assert oct(mode.st_mode & 0o777) == "0o660" and mode.st_gid == grp.getgrnam(readers).gr_gid
    assert oct(daemon.socket.parent.stat().st_mode & 0o777) == "0o750"

    def as_user(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "runuser",
                "-u",
                user,
                "--",
                system_python,
                "-m",
                "mcrd.ctl",
                "--socket",
                str(daemon.socket),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd="/",
            env={"PYTHONPATH": str(public_dir / "lib"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )

    denied = (
        f"permission denied: 'reload' changes mcrd's state and needs root or a member of group {admins!r}"
    )
    result = as_user(outsider, "status")
    assert result.returncode == 3 and "permission denied on" in result.stderr
    assert as_user(reader, "status").returncode == 0
    assert as_user(reader, "list").returncode == 0
    assert as_user(reader, "stats", "--json").returncode == 0
    result = as_user(reader, "reload")
    assert result.returncode == 1 and result.stderr.strip() == f"mcrctl: reload: {denied}"
    result = as_user(
        reader,
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.3",
        "--input-port",
        "5000",
        "--outputs",
        "239.2.2.3:6000:out0",
    )
    assert result.returncode == 1 and "permission denied: 'add'" in result.stderr
    assert as_user(reader, "log-level", "set", "error").returncode == 1
    assert as_user(admin, "status").returncode == 0
    assert as_user(admin, "reload").returncode == 4  # allowed; nothing to change
    added = as_user(
        admin,
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.3",
        "--input-port",
        "5000",
        "--outputs",
        "239.2.2.3:6000:out0",
        "--name",
        "by-admin",
    )
    assert added.returncode == 0, added.stderr
    assert as_user(admin, "remove", "--name", "by-admin").returncode == 0
    log = daemon.log.read_text()
    assert f"control: refused 'reload' to uid {pwd.getpwnam(reader).pw_uid}" in log
