"""End to end: build the .deb, install it on a clean Debian booted with systemd.

Builds the package from the files git tracks, debootstraps Debian 13
(trixie) with mcrd's dependencies, boots it with `systemd-nspawn -b`, moves
veth ends of namespaces the test creates into the container, and checks the
installed service: READY under systemd, relaying, reload without restart (and
refusing a broken file), the watchdog restarting a stopped daemon, who may
use mcrctl, upgrade keeping an edited /etc/mcr.toml, and purge. Everything is
removed afterwards, also on failure. Skips only where containers cannot run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.net import Lab, Receiver, TrafficSender
from tests.helpers.daemon import needs_root, wait_until

pytestmark = [needs_root, pytest.mark.netns, pytest.mark.install]

REPO = Path(__file__).parent.parent.parent
SUITE = os.environ.get("MCRD_TEST_SUITE", "trixie")
MIRROR = os.environ.get("MCRD_TEST_MIRROR", "http://deb.debian.org/debian")
DEPENDENCIES = [
    "python3-pydantic",
    "python3-pydantic-settings",
    "python3-pyroute2",
    "python3-sdnotify",
    "python3-tomli-w",
    "python3-watchfiles",
]
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

RULES = """
[[rule]]
name = "{name}"
input = {{ interface = "{inp}", group = "239.1.1.1", port = 5000 }}
outputs = [ {{ interface = "{out}", group = "{group}", port = 6000 }} ]
"""


def run(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def build_package(work: Path, version: str | None = None) -> Path:
    """dpkg-buildpackage on a copy of what git tracks; returns the .deb."""
    src = work / f"src-{version or 'release'}"
    src.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).exists():
            target = src / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target, follow_symlinks=False)
    if version is not None:
        changelog = (src / "debian" / "changelog").read_text()
        (src / "debian" / "changelog").write_text(
            re.sub(r"^mcrd \(([^)]+)\)", f"mcrd ({version})", changelog)
        )
    result = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (deb,) = work.glob(f"mcrd_{version or '*'}_all.deb")
    return deb


@dataclass
class Machine:
    """A booted container; commands run inside through nsenter."""

    proc: subprocess.Popen[bytes]
    leader: int
    root: Path

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(
            "nsenter",
            "--target",
            str(self.leader),
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--cgroup",
            "--",
            "/bin/sh",
            "-c",
            script,
            check=check,
            timeout=timeout,
        )

    def main_pid(self) -> int:
        return int(self.sh("systemctl show -p MainPID --value mcrd").stdout.strip())

    def active(self) -> bool:
        return self.sh("systemctl is-active mcrd", check=False).stdout.strip() == "active"


def _leader(nspawn_pid: int) -> int | None:
    try:
        children = Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:  # the container's init: its comm is systemd
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return int(child)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Machine, Lab, dict[str, str], Path]]:
    for tool in ("debootstrap", "systemd-nspawn", "dpkg-buildpackage", "nsenter", "git"):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the package is built from the files git tracks")
    work = Path(f"/var/tmp/mcrd-install-{os.getpid()}")
    work.mkdir()
    tag = f"{os.getpid() % 10000}"
    names = {"in": f"mci{tag}", "out": f"mco{tag}"}
    lab = Lab("mcri")
    proc: subprocess.Popen[bytes] | None = None
    try:
        deb = build_package(work)
        if shutil.which("lintian", path=CLEAN_PATH):
            tags = run("lintian", "--info", "--pedantic", str(deb), check=False).stdout
            assert not re.findall(r"^[EWIP]: .*$", tags, re.M), f"lintian:\n{tags}"
        root = work / "rootfs"
        run(
            "debootstrap",
            "--variant=minbase",
            f"--include=systemd,systemd-sysv,dbus,iproute2,procps,passwd,{','.join(DEPENDENCIES)}",
            SUITE,
            str(root),
            MIRROR,
            timeout=1200,
        )
        (root / "etc" / "hostname").write_text("mcrd-test\n")
        src, dst = lab.netns("src"), lab.netns("dst")
        # Host-side names only until nspawn moves them into the container.
        run("ip", "link", "add", names["in"], "type", "veth", "peer", "name", "eth0", "netns", src)
        run("ip", "link", "add", names["out"], "type", "veth", "peer", "name", "eth0", "netns", dst)
        lab.ip(src, "addr", "add", "192.0.2.10/24", "dev", "eth0")
        lab.ip(src, "link", "set", "eth0", "up")
        lab.ip(dst, "addr", "add", "198.51.100.2/24", "dev", "eth0")
        lab.ip(dst, "link", "set", "eth0", "up")
        shutil.copy(deb, root / "root" / deb.name)
        with (work / "boot.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    # nspawn waits for udev to initialise a moved interface when
                    # /sys is writable; there is no udev here (PID 1 is not
                    # systemd), so it sees a read-only /sys in its own mounts.
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    'mount -o remount,bind,ro /sys && exec "$0" "$@"',
                    "systemd-nspawn",
                    "--quiet",
                    "-D",
                    str(root),
                    "-b",
                    "--register=no",
                    "--keep-unit",
                    "--console=passive",
                    f"--network-interface={names['in']}",
                    f"--network-interface={names['out']}",
                    # a host has these; a container must be given them: the
                    # kernel offload loads eBPF programs
                    "--capability=CAP_BPF",
                    "--system-call-filter=bpf",
                    f"--machine=mcrdtest{tag}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"PATH": CLEAN_PATH},
            )
        leader: list[int] = []

        def booted() -> bool:
            assert proc is not None and proc.poll() is None, (work / "boot.log").read_text()[-3000:]
            pid = _leader(proc.pid)
            if pid is None:
                return False
            leader[:] = [pid]
            state = run(
                "nsenter",
                "--target",
                str(pid),
                "--mount",
                "--pid",
                "--",
                "systemctl",
                "is-system-running",
                check=False,
            ).stdout.strip()
            return state in ("running", "degraded")

        wait_until(booted, timeout=120, what="the container to boot")
        machine = Machine(proc, leader[0], root)
        machine.sh(
            f"ip addr add 192.0.2.1/24 dev {names['in']} && ip link set {names['in']} up && "
            f"ip addr add 198.51.100.1/24 dev {names['out']} && ip link set {names['out']} up"
        )
        machine.sh(f"apt-get install -y /root/{deb.name}", timeout=300)
        yield machine, lab, names, work
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn shuts the container down
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in names.values():
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


def relays(lab: Lab, group: str, stream: int) -> bool:
    """Whether a stream sent into the container's input arrives at `group` in dst."""
    src, dst = lab.namespaces[0], lab.namespaces[1]
    rx = Receiver(dst, group, 6000, "eth0")
    try:
        TrafficSender(src, "eth0").stream("239.1.1.1", 5000, stream=stream, count=100, rate=1000)
        return rx.wait_for(lambda a: len(rx.seqs(stream)) == 100, timeout=5)
    finally:
        rx.close()


def test_installed_service_end_to_end(installed: tuple[Machine, Lab, dict[str, str], Path]) -> None:
    machine, lab, names, work = installed
    # 1. Installed, enabled, active and READY; workers run as the service user.
    wait_until(machine.active, timeout=30, what="mcrd to be active")
    assert machine.sh("systemctl is-enabled mcrd").stdout.strip() == "enabled"
    assert "rule(s) active" in machine.sh("systemctl show -p StatusText --value mcrd").stdout
    machine.sh("test -f /usr/share/man/man8/mcrd.8.gz && test -f /usr/share/man/man5/mcr.toml.5.gz")
    security = machine.sh("systemd-analyze security --no-pager mcrd", check=False).stdout
    exposure = re.search(r"Overall exposure level for mcrd.service: ([0-9.]+)", security)
    assert exposure is not None, security
    print(f"systemd-analyze security mcrd: {exposure.group(0)}")
    print("\n".join(line for line in security.splitlines() if "\u2717" in line))
    assert float(exposure.group(1)) <= 3.0, security

    # 2. A rule written to /etc/mcr.toml relays a stream between the test's namespaces.
    pid = machine.main_pid()
    rules = RULES.format(name="cam", inp=names["in"], out=names["out"], group="239.2.2.2")
    (machine.root / "etc" / "mcr.toml").write_text((machine.root / "etc" / "mcr.toml").read_text() + rules)
    wait_until(lambda: relays(lab, "239.2.2.2", 1), timeout=20, what="the installed service to relay")
    workers = machine.sh("mcrctl --json workers").stdout
    worker_pid = int(re.search(r'"pid": (\d+)', workers).group(1))  # type: ignore[union-attr]
    mcrd_uid = machine.sh("id -u mcrd").stdout.strip()
    status = machine.sh(f"cat /proc/{worker_pid}/status").stdout
    assert re.search(rf"^Uid:\s+{mcrd_uid}\s+{mcrd_uid}\s+{mcrd_uid}\s+{mcrd_uid}$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)

    # 3. Edits apply without a restart; systemctl reload tells the truth.
    text = (machine.root / "etc" / "mcr.toml").read_text().replace("239.2.2.2", "239.2.2.3")
    (machine.root / "etc" / "mcr.toml").write_text(text)
    wait_until(lambda: relays(lab, "239.2.2.3", 2), timeout=20, what="the edited rule")
    machine.sh("systemctl reload mcrd")
    assert machine.main_pid() == pid
    (machine.root / "etc" / "mcr.toml").write_text(text.replace("port = 6000", "port = 99999"))
    assert machine.sh("systemctl reload mcrd", check=False).returncode != 0
    assert relays(lab, "239.2.2.3", 3), "the old rules must keep relaying"
    assert "last reload rejected" in machine.sh("systemctl show -p StatusText --value mcrd").stdout
    (machine.root / "etc" / "mcr.toml").write_text(text)
    machine.sh("systemctl reload mcrd")

    # 4. A stopped daemon is restarted by the watchdog, and relaying resumes.
    machine.sh(f"kill -STOP {pid}")
    wait_until(
        lambda: machine.active() and machine.main_pid() not in (0, pid),
        timeout=60,
        what="the watchdog to restart mcrd",
    )
    wait_until(lambda: relays(lab, "239.2.2.3", 4), timeout=20, what="relaying after the restart")
    assert "Watchdog timeout" in machine.sh("journalctl -u mcrd --no-pager", check=False).stdout

    # 5. mcrctl: root may, an unprivileged user may not.
    assert machine.sh("mcrctl status").returncode == 0
    machine.sh("useradd --no-create-home someone")
    refused = machine.sh("runuser -u someone -- mcrctl status", check=False)
    assert refused.returncode == 3 and "permission denied" in refused.stderr

    # 6. Kernel offload works inside the unit's sandbox (bpf(2) allowed by the
    # system call filter, CAP_BPF in the bounding set), and a stop detaches it.
    assert text.count("\n[daemon]\n") == 1  # the shipped file has the table
    (machine.root / "etc" / "mcr.toml").write_text(
        text.replace("\n[daemon]\n", '\n[daemon]\noffload = "auto"\n')
    )
    machine.sh("systemctl restart mcrd")
    listing = [""]

    def offloaded() -> bool:
        listing[0] = machine.sh("mcrctl --json list").stdout
        return '"path": "kernel"' in listing[0]

    try:
        wait_until(offloaded, timeout=20, what="the rule to be offloaded")
    except AssertionError:
        raise AssertionError(f"not offloaded: {listing[0]}") from None
    ingress = f"tc filter show dev {names['in']} ingress"
    assert f"mcrd:{names['in']}" in machine.sh(ingress).stdout
    assert relays(lab, "239.2.2.3", 6), "the kernel did not relay"
    machine.sh("systemctl stop mcrd")
    assert "mcrd:" not in machine.sh(ingress).stdout, "the program outlived mcrd"
    (machine.root / "etc" / "mcr.toml").write_text(text)
    machine.sh("systemctl start mcrd")
    wait_until(lambda: relays(lab, "239.2.2.3", 7), timeout=20, what="relaying from user space again")

    # 7. An upgrade keeps the edited /etc/mcr.toml and restarts; purge leaves nothing running.
    upgrade = build_package(work, "0.1.0+test1")
    shutil.copy(upgrade, machine.root / "root" / upgrade.name)
    before = machine.main_pid()
    machine.sh(f"apt-get install -y /root/{upgrade.name}", timeout=300)
    assert (machine.root / "etc" / "mcr.toml").read_text() == text
    assert "0.1.0+test1" in machine.sh("dpkg-query -W mcrd").stdout
    wait_until(lambda: machine.active() and machine.main_pid() != before, timeout=30, what="the restart")
    wait_until(lambda: relays(lab, "239.2.2.3", 5), timeout=20, what="relaying after the upgrade")
    machine.sh("apt-get purge -y mcrd", timeout=300)
    # (not pgrep -f: it would find the shell that runs it)
    leftovers = machine.sh(
        "ps -eo user=,args= | grep -E '^mcrd |[/]usr/bin/mcr|[m]crd[.]worker'", check=False
    )
    assert leftovers.stdout == "", leftovers.stdout
    assert machine.sh("systemctl cat mcrd", check=False).returncode != 0
    assert not (machine.root / "var" / "lib" / "mcrd").exists()
    assert not (machine.root / "etc" / "mcr.toml").exists()
