"""End to end: the daemon's life — missing interfaces, mcrctl, bad clients, shutdown."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab.net import Lab, Receiver, TrafficSender, inside
from mcrd import netio
from mcrd.bpf_classic import compile_filters
from mcrd.packet import FilterEntry, ip_to_int
from tests.helpers.daemon import Daemon, Net, mcrctl, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]


RULES = """
[[rule]]
name = "present"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [
  { interface = "out0", group = "239.2.2.2", port = 6000 },
  { interface = "gone9", group = "239.2.2.3", port = 6000 },
]

[[rule]]
name = "absent"
input = { interface = "nosuch0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.4", port = 6000 } ]
"""


def test_missing_interfaces_leave_the_rest_relaying(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, RULES, all_active=False)

    def listed() -> dict[str, Any]:
        return {r["name"]: r for r in mcrctl_json(daemon.socket, "list")["rules"]}

    # the socket answers while mcrd starts; the missing interface must not hold the other rule back
    wait_until(lambda: listed()["present"]["state"] == "active", what="the rule whose interface exists")
    rules = listed()
    assert rules["absent"]["state"] == "pending"
    assert rules["absent"]["reason"] == "no interface named 'nosuch0'"
    outputs = rules["present"]["outputs"]
    assert [o["state"] for o in outputs] == ["active", "pending"]
    assert outputs[1]["reason"] == "no interface named 'gone9'"
    listing = mcrctl(daemon.socket, "list").stdout
    assert "pending (no interface named 'nosuch0')" in listing
    assert "[pending: no interface named 'gone9']" in listing

    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=1, count=200)
    assert rx.wait_for(lambda a: len(rx.seqs(1)) == 200)
    assert rx.seqs(1) == list(range(200))
    status = mcrctl(daemon.socket, "status").stdout
    assert "rules:   2 (1 active, 1 pending; 2 file)" in status


def test_sigterm_stops_workers_leaves_groups_and_removes_the_socket(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, RULES.split('[[rule]]\nname = "absent"', maxsplit=1)[0])
    (worker,) = mcrctl_json(daemon.socket, "workers")["workers"]
    groups = subprocess.run(
        ["ip", "-n", net.relay, "maddr", "show", "dev", "in0"], capture_output=True, text=True, check=True
    ).stdout
    assert "239.1.1.1" in groups
    began = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - began < 2.0
    assert not daemon.socket.exists()
    assert not Path(f"/proc/{worker['pid']}").exists()
    groups = subprocess.run(
        ["ip", "-n", net.relay, "maddr", "show", "dev", "in0"], capture_output=True, text=True, check=True
    ).stdout
    assert "239.1.1.1" not in groups
    assert "stopping" in daemon.log.read_text()


def test_missing_rule_file_runs_with_no_rules(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, None)
    status = mcrctl_json(daemon.socket, "status")
    assert status["config_missing"] and status["rules"] == 0
    assert mcrctl(daemon.socket, "list").stdout.strip() == "no rules"
    assert "does not exist: running with no rules" in daemon.log.read_text()


def test_a_second_daemon_on_the_same_socket_is_refused(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, "")
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcrd.daemon",
            "--config",
            str(daemon.config),
            "--control-socket",
            str(daemon.socket),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    assert "another mcrd is already listening on" in second.stderr
    assert mcrctl(daemon.socket, "ping").returncode == 0


BASIC = RULES.split('[[rule]]\nname = "absent"', maxsplit=1)[0].replace(
    '  { interface = "gone9", group = "239.2.2.3", port = 6000 },\n', ""
)


def test_mcrctl_commands_and_bad_clients_while_relaying(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, BASIC)
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    half = 400
    tx.stream("239.1.1.1", 5000, stream=1, count=half)
    # Garbage, truncated, oversized and abandoned requests, and many clients.
    for payload in (
        b"\x00\xff garbage\n",
        b'{"version": 1, "comm',
        b"{" * 100_000 + b"\n",
        b"[]\n",
        b'{"version": 99, "command": "ping"}\n',
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(daemon.socket))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            if payload.endswith(b"\n") or payload.startswith(b'{"version": 1'):
                assert json.loads(reply.splitlines()[0])["ok"] is False
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(50)]
    for s in idle:
        s.connect(str(daemon.socket))
    tx.stream("239.1.1.1", 5000, stream=1, count=half, first=half)
    assert rx.wait_for(lambda a: len(rx.seqs(1)) == 2 * half)
    assert rx.seqs(1) == list(range(2 * half)), "a bad client disturbed the data path"
    for s in idle:
        s.close()

    for command in ("ping", "version", "status", "list", "stats", "workers"):
        human = mcrctl(daemon.socket, command)
        assert human.stdout.strip(), command
        assert isinstance(mcrctl_json(daemon.socket, command), dict)
    stats = mcrctl(daemon.socket, "stats").stdout
    assert "present" in stats and "-> 239.2.2.2:6000 on out0 ttl 1" in stats and str(2 * half) in stats
    wait_until(lambda: daemon.rule_stats("present")["packets"] == 2 * half, what="counters")


def test_mcrctl_without_a_daemon(tmp_path: Path) -> None:
    result = mcrctl(tmp_path / "none.sock", "ping", check=False)
    assert result.returncode == 3
    assert result.stderr == f"mcrctl: mcrd is not running (no daemon at {tmp_path / 'none.sock'})\n"
    usage = mcrctl(tmp_path / "none.sock", "frobnicate", check=False)
    assert usage.returncode == 2


MANY = [FilterEntry(ip_to_int("239.1.0.0") + n, 5000 + n % 7, None) for n in range(600)]
FEW = [FilterEntry(ip_to_int("239.1.1.1"), 5000, ip_to_int("192.0.2.10"))]


def test_the_kernel_accepts_filters_of_every_precision(lab: Lab) -> None:
    ns = lab.netns("filters")
    covered = set()
    with inside(ns):
        for entries in (FEW, MANY):
            for blob, precision in compile_filters(entries):
                with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0) as sock:
                    netio.attach_filter(sock, blob)  # raises if the kernel refuses it
                covered.add(int(precision))
    assert covered == {0, 1, 2}, "not every precision was tried"


def test_filters_fall_back_when_socket_memory_is_tight(lab: Lab) -> None:
    # Debian 12's kernel allows 20 KiB of socket option memory: an exact
    # filter for 600 groups does not fit, and a swap needs old + new.
    ns = lab.netns("optmem")
    lab.sysctl(ns, "net.core.optmem_max", "20480")
    with inside(ns):
        sock, precision = netio.open_packet_socket("lo", MANY)
        with sock:
            assert precision < 2
            assert netio.attach_best_filter(sock, MANY[:300]) in (0, 1)
            assert netio.attach_best_filter(sock, FEW) == 2
        small, precision = netio.open_packet_socket("lo", FEW)
        small.close()
        assert precision == 2
