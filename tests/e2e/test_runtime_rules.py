"""End to end: runtime rules, saving them, the limits, and every mcrctl command."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lab.net import Receiver, TrafficSender, collecting
from tests.helpers.daemon import Daemon, Net, mcrctl, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]

FILE_RULES = """# operator's comments must survive everything mcrctl does
[[rule]]
name = "camera"   # the lobby camera
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]
"""

ADD = [
    "add",
    "--input-interface",
    "in0",
    "--input-group",
    "239.1.1.7",
    "--input-port",
    "5000",
    "--outputs",
    "239.2.2.7:6007:out0,198.51.100.2:7007:out0:9",
    "--name",
    "extra",
]


@pytest.fixture
def daemon(net: Net, tmp_path: Path, daemons: list[Daemon]) -> Daemon:
    """mcrd on FILE_RULES, keeping its runtime rules in tmp_path/state."""
    return start_mcrd(net, tmp_path, daemons, FILE_RULES, runtime_rules=tmp_path / "state" / "runtime.toml")


def test_add_list_stats_remove_with_real_packets(net: Net, daemon: Daemon) -> None:
    added = mcrctl(daemon.socket, *ADD)
    assert added.stdout.startswith("added rule extra (id ") and added.stdout.strip().endswith(": active")
    rules = {r["name"]: r for r in mcrctl_json(daemon.socket, "list")["rules"]}
    assert rules["extra"]["origin"] == "runtime" and rules["camera"]["origin"] == "file"
    assert [o["destination"] for o in rules["extra"]["outputs"]] == [
        "239.2.2.7:6007 on out0 ttl 1",
        "198.51.100.2:7007 on out0 ttl 9",
    ]
    listing = mcrctl(daemon.socket, "list").stdout
    assert rules["extra"]["id"] in listing and "runtime" in listing

    group_rx = Receiver(net.dst1, "239.2.2.7", 6007, "eth0")
    host_rx = Receiver(net.dst1, "198.51.100.2", 7007)
    camera_rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    tx.stream("239.1.1.7", 5000, stream=1, count=100)
    tx.stream("239.1.1.1", 5000, stream=2, count=100)
    assert group_rx.wait_for(lambda a: len(group_rx.seqs(1)) == 100)
    assert host_rx.wait_for(lambda a: len(host_rx.seqs(1)) == 100)
    assert camera_rx.wait_for(lambda a: len(camera_rx.seqs(2)) == 100)
    assert {a.ttl for a in host_rx.arrivals} == {9}
    stats = {r["name"]: r for r in mcrctl_json(daemon.socket, "stats")["rules"]}
    assert stats["extra"]["packets"] == 100
    assert [o["packets"] for o in stats["extra"]["outputs"]] == [100, 100]
    assert "extra" in mcrctl(daemon.socket, "stats").stdout

    refused = mcrctl(daemon.socket, "remove", "--name", "camera", check=False)
    assert refused.returncode == 1
    assert f"rule 'camera' comes from {daemon.config}: remove it from that file" in refused.stderr
    removed = mcrctl(daemon.socket, "remove", "--rule-id", rules["extra"]["id"])
    assert removed.stdout.strip() == f"removed rule extra (id {rules['extra']['id']})"
    assert [r["name"] for r in mcrctl_json(daemon.socket, "list")["rules"]] == ["camera"]
    tx.stream("239.1.1.7", 5000, stream=3, count=20)
    tx.stream("239.1.1.1", 5000, stream=4, count=20)
    assert camera_rx.wait_for(lambda a: len(camera_rx.seqs(4)) == 20)
    group_rx.poll(0)
    assert group_rx.seqs(3) == [], "a removed rule still relays"
    missing = mcrctl(daemon.socket, "remove", "--name", "extra", check=False)
    assert missing.returncode == 1 and "no rule named 'extra'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--input-port", "70000"], 1, "input.port: must be from 1 to 65535, got 70000"),
        (["--outputs", "239.2.2.7:6007"], 1, "outputs[0]: a multicast output needs an 'interface'"),
        (["--outputs", "239.2.2.7"], 2, "--outputs: '239.2.2.7' is not GROUP:PORT[:IFACE[:TTL]]"),
        (["--outputs", "239.2.2.7:x:out0"], 2, "port and TTL must be numbers"),
        (["--input-group", "239.1.1.1"], 1, "input in0 239.1.1.1:5000 is already used by rule 1 ('camera')"),
        (["--name", "camera"], 1, "name 'camera' is already used by rule 1 ('camera')"),
        (["--input-interface", "bad/name"], 1, "input.interface: invalid interface name 'bad/name'"),
    ],
)
def test_runtime_rules_are_validated_like_file_rules(
    daemon: Daemon, args: list[str], code: int, message: str
) -> None:
    command = list(ADD)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        command[command.index(flag) + 1] = value
    result = mcrctl(daemon.socket, *command, check=False)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert [r["name"] for r in mcrctl_json(daemon.socket, "list")["rules"]] == ["camera"]


def test_config_save_survives_a_restart_and_leaves_the_rule_file_alone(
    net: Net, tmp_path: Path, daemon: Daemon
) -> None:
    digest = hashlib.sha256(daemon.config.read_bytes()).hexdigest()
    mcrctl(daemon.socket, *ADD)
    mcrctl(
        daemon.socket,
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.8",
        "--input-port",
        "5000",
        "--outputs",
        "239.2.2.8:6008:out0",
        "--rate-pps",
        "50",
    )
    shown = mcrctl(daemon.socket, "config", "show").stdout
    assert f"# from {daemon.config}" in shown and "# added at run time, not saved" in shown
    saved = mcrctl(daemon.socket, "config", "save")
    state = tmp_path / "state" / "runtime.toml"
    assert saved.stdout.strip() == f"saved 2 runtime rule(s) to {state}"
    assert state.read_text().startswith("# Rules added to mcrd at run time")
    assert "saved" in mcrctl(daemon.socket, "list").stdout
    before = {r["id"]: r for r in mcrctl_json(daemon.socket, "list")["rules"]}

    assert daemon.stop() == 0
    daemon.start()
    after = {r["id"]: r for r in mcrctl_json(daemon.socket, "list")["rules"]}
    assert after.keys() == before.keys()
    assert {r["name"]: r["origin"] for r in after.values()} == {
        "camera": "file",
        "extra": "saved",
        None: "saved",
    }
    assert hashlib.sha256(daemon.config.read_bytes()).hexdigest() == digest
    rx = Receiver(net.dst1, "239.2.2.7", 6007, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.7", 5000, stream=5, count=50)
    assert rx.wait_for(lambda a: len(rx.seqs(5)) == 50)

    # A reload of the file keeps runtime rules, and may not take their inputs.
    daemon.config.write_text(
        FILE_RULES
        + FILE_RULES.replace("camera", "clash")
        .replace("239.1.1.1", "239.1.1.7")
        .replace("239.2.2.2", "239.2.2.9")
    )
    result = mcrctl(daemon.socket, "reload", check=False)
    assert result.returncode == 1
    assert "rule 2 ('clash'): input in0 239.1.1.7:5000 is already used by saved rule 'extra'" in result.stdout
    check = mcrctl(daemon.socket, "config", "check", str(daemon.config), check=False)
    assert check.returncode == 1 and "already used by saved rule 'extra'" in check.stdout
    good = tmp_path / "good.toml"
    good.write_text(FILE_RULES)
    assert mcrctl(daemon.socket, "config", "check", str(good)).stdout.strip() == "OK, 1 rule(s)"


def test_log_level_get_and_set(daemon: Daemon) -> None:
    assert mcrctl(daemon.socket, "log-level", "get").stdout.strip() == "debug"
    assert mcrctl(daemon.socket, "log-level", "set", "warning").stdout.strip() == "log level is now warning"
    assert mcrctl_json(daemon.socket, "log-level", "get") == {"level": "warning"}
    assert mcrctl(daemon.socket, "log-level", "set", "loud", check=False).returncode == 2


def test_rate_limit_drops_the_excess_and_counts_it(net: Net, daemon: Daemon) -> None:
    mcrctl(
        daemon.socket,
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.9",
        "--input-port",
        "5000",
        "--outputs",
        "239.2.2.9:6009:out0",
        "--name",
        "limited",
        "--rate-pps",
        "100",
    )
    rx = Receiver(net.dst1, "239.2.2.9", 6009, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.9", 5000, stream=6, count=1000, rate=2000)

    def counted() -> bool:
        r = next(r for r in mcrctl_json(daemon.socket, "stats")["rules"] if r["name"] == "limited")
        return bool(r["packets"] == 1000)

    wait_until(counted, what="all 1000 datagrams to be counted")
    stats = next(r for r in mcrctl_json(daemon.socket, "stats")["rules"] if r["name"] == "limited")
    relayed = stats["outputs"][0]["packets"]
    assert stats["drops"]["rate_limit"] == 1000 - relayed
    # 0.5 s of sending at 100/s plus a 0.1 s burst, with room for a slow machine.
    assert 40 <= relayed <= 200, relayed
    assert rx.wait_for(lambda a: len(rx.seqs(6)) == relayed)


def test_limits_on_rules_and_clients_while_relaying(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    many = "".join(
        FILE_RULES.replace("camera", f"r{n}").replace("239.1.1.1", f"239.1.3.{n}") for n in range(3)
    )
    daemon = start_mcrd(
        net,
        tmp_path,
        daemons,
        FILE_RULES,
        env={
            "MCRD_MAX_RULES": "3",
            "MCRD_MAX_CLIENTS": "8",
            "MCRD_CLIENT_TIMEOUT": "1",
            "MCRD_RUNTIME_RULES": str(tmp_path / "runtime.toml"),
        },
    )
    daemon.config.write_text(FILE_RULES + many)
    result = mcrctl(daemon.socket, "reload", check=False)
    assert result.returncode == 1 and "4 rules exceed the limit of 3 (max_rules)" in result.stdout
    mcrctl(daemon.socket, *ADD)
    second = mcrctl(
        daemon.socket,
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.20",
        "--input-port",
        "1",
        "--outputs",
        "239.2.2.20:1:out0",
        check=False,
    )
    assert second.returncode == 0
    third = mcrctl(
        daemon.socket,
        "add",
        "--input-interface",
        "in0",
        "--input-group",
        "239.1.1.21",
        "--input-port",
        "1",
        "--outputs",
        "239.2.2.21:1:out0",
        check=False,
    )
    assert third.returncode == 1 and "4 rules exceed the limit of 3 (max_rules)" in third.stderr

    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    stop = threading.Event()
    sent: list[int] = []
    sender = threading.Thread(
        target=lambda: sent.append(tx.stream_until(stop, "239.1.1.1", 5000, 7, rate=1000))
    )
    with collecting(rx):
        sender.start()
        try:
            slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            slow.connect(str(daemon.socket))
            slow.sendall(b'{"version": 1, "command": "pi')
            slow.settimeout(5)
            assert json.loads(slow.recv(65536))["error"]["code"] == "timeout"
            slow.close()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as big:
                big.connect(str(daemon.socket))
                big.settimeout(5)
                with contextlib.suppress(OSError):  # mcrd may close before taking it all
                    big.sendall(b"x" * (2 << 20))
                assert json.loads(big.recv(65536))["error"]["code"] == "too-large"
            held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(8)]
            for s in held:
                s.connect(str(daemon.socket))
            busy = mcrctl(daemon.socket, "ping", check=False)
            assert busy.returncode == 1 and "too many clients: at most 8 at once" in busy.stderr
            for s in held:
                s.close()
            wait_until(lambda: mcrctl(daemon.socket, "ping", check=False).returncode == 0, what="a free slot")
            for _ in range(500):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(daemon.socket))
                    s.sendall(b'{"version": 1, "command": "ping"}\n')
                    assert s.recv(4096).startswith(b'{"version": 1, "ok": true')
        finally:
            stop.set()
            sender.join()
        wait_until(lambda: len(rx.seqs(7)) >= sent[0], what="the stream")
    assert rx.seqs(7) == list(range(sent[0])), "abusive clients disturbed the data path"


def test_stats_watch_refreshes_in_place(daemon: Daemon) -> None:
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mcrd.ctl",
            "--socket",
            str(daemon.socket),
            "stats",
            "--watch",
            "--interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None
    frames = 0
    for line in watcher.stdout:
        frames += "mcrd stats (every 0.2s, ^C to stop)" in line
        if frames == 2:  # it has redrawn once
            break
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(10) == 0
