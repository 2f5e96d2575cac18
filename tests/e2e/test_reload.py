"""End to end: hot reload, systemd notify and watchdog, interfaces that come and go.

Uses the topology of the relay tests (src -> relay -> dst1 / dst2, see
tests/helpers/daemon.py, Net). Every wait is on an event: a reload outcome, a notify message,
a datagram, a rule's state.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lab.net import Receiver, TrafficSender, collecting, make_payload
from tests.helpers.daemon import Daemon, Net, mcrctl, mcrctl_json, needs_root, start_mcrd, wait_until

pytestmark = [needs_root, pytest.mark.netns]

X_IN = '{ interface = "in0", group = "239.1.1.1", port = 5000 }'


def x_rule(group: str = "239.2.2.2") -> str:
    output = f'{{ interface = "out0", group = "{group}", port = 6000 }}'
    return f'[[rule]]\nname = "x"\ninput = {X_IN}\noutputs = [ {output} ]\n'


def other_rules(n: int) -> str:
    """A different set of other rules for each n: added, removed and changed ones."""
    text = ""
    for k in range(n % 5 + 1):
        source = f'{{ interface = "in0", group = "239.1.2.{k}", port = {5000 + k} }}'
        text += (
            f'[[rule]]\nname = "o{k}"\ninput = {source}\n'
            f'outputs = [ {{ interface = "out1", group = "239.3.3.{k}", ttl = {n % 3 + 1} }} ]\n'
        )
    if n % 2 == 0:  # a whole input interface (and its worker) comes and goes
        text += (
            '[[rule]]\nname = "side"\ninput = { interface = "out1", group = "239.5.5.5", port = 5000 }\n'
            'outputs = [ { interface = "out0", group = "239.6.6.6" } ]\n'
        )
    return text


def reloads(daemon: Daemon) -> tuple[int, Any]:
    status = mcrctl_json(daemon.socket, "status")
    return status["reloads"], status["last_reload"]


def wait_reload(daemon: Daemon, after: int, timeout: float = 15.0) -> Any:
    """Wait for the reload after the `after`-th and return its outcome."""
    result: list[Any] = []

    def done() -> bool:
        count, last = reloads(daemon)
        if count > after:
            result.append(last)
            return True
        return False

    wait_until(done, timeout, what=f"reload number {after + 1}")
    return result[0]


def save(path: Path, text: str, style: str = "rename") -> None:
    if style == "in-place":
        with path.open("w") as f:
            f.write(text)
    elif style == "rename":
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.rename(path)
    elif style == "recreate":
        path.unlink()
        path.write_text(text)
    elif style == "symlink":
        # as configuration management does: a new file, then a symlink swapped over the old one
        target = path.with_name(f"{path.name}.{time.monotonic_ns()}")
        target.write_text(text)
        link = path.with_name(f".{path.name}.link")
        link.symlink_to(target.name)
        link.rename(path)
    else:
        raise ValueError(style)


def test_unchanged_flow_loses_nothing_over_fifty_rewrites(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule() + other_rules(0))
    old = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    new = Receiver(net.dst1, "239.2.2.3", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    stop = threading.Event()
    sent: list[int] = []
    sender = threading.Thread(
        target=lambda: sent.append(tx.stream_until(stop, "239.1.1.1", 5000, 1, rate=1000))
    )
    styles = ["rename", "in-place", "recreate", "symlink"]
    applied = 0
    with collecting(old, new):
        sender.start()
        try:
            count, _ = reloads(daemon)
            for n in range(1, 51):
                group = "239.2.2.2" if n < 25 else "239.2.2.3"  # X's own outputs change once, at n = 25
                save(daemon.config, x_rule(group) + other_rules(n), styles[n % len(styles)])
                outcome = wait_reload(daemon, count)
                count += 1
                assert outcome["result"] in ("applied", "unchanged"), outcome
                assert ("x" in outcome["changed"]) == (n == 25), outcome
                applied += outcome["result"] == "applied"
        finally:
            stop.set()
            sender.join()
        total = sent[0]
        wait_until(lambda: len(old.seqs(1)) + len(new.seqs(1)) >= total, what="the whole stream")
    assert applied >= 45
    first = old.seqs(1)
    second = new.seqs(1)
    assert first == list(range(len(first))), "X lost, duplicated or reordered datagrams before its change"
    assert second == list(range(len(first), total)), "X's switch to its new output was not clean"
    assert len(first) > 100 and len(second) > 100
    assert mcrctl_json(daemon.socket, "workers")["workers"][0]["restarts"] == 0


@pytest.mark.parametrize("style", ["in-place", "rename", "recreate", "symlink"])
def test_each_save_style_is_applied_within_a_second(
    net: Net, tmp_path: Path, daemons: list[Daemon], style: str
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule())
    if style == "symlink":
        save(daemon.config, x_rule() + other_rules(0), "symlink")  # from now on a symlink
        wait_reload(daemon, 0)
    count, _ = reloads(daemon)
    began = time.monotonic()
    save(daemon.config, x_rule() + other_rules(3), style)
    wait_until(lambda: len(mcrctl_json(daemon.socket, "list")["rules"]) == 5, timeout=5, what="the new rules")
    elapsed = time.monotonic() - began
    assert elapsed < 1.0, f"{style} save took {elapsed:.2f}s to apply"
    assert wait_reload(daemon, count)["result"] == "applied"
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=2, count=50)
    assert rx.wait_for(lambda a: len(rx.seqs(2)) == 50)


def test_a_burst_of_writes_is_one_reload(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule())
    count, _ = reloads(daemon)
    for n in range(20):
        save(daemon.config, x_rule() + other_rules(n), "rename")
    outcome = wait_reload(daemon, count)
    wait_until(
        lambda: len(mcrctl_json(daemon.socket, "list")["rules"]) == 1 + 19 % 5 + 1, what="the last write"
    )
    final, _ = reloads(daemon)
    assert final - count <= 2, f"{final - count} reloads for one burst"
    assert outcome["result"] == "applied"


BROKEN = {
    "syntax": "this is not toml ]]\n",
    "bad-port": x_rule().replace("port = 6000", "port = 99999"),
    "unknown-key": x_rule().replace('name = "x"', 'name = "x"\nnmae = "y"'),
    "cycle": x_rule() + "[[rule]]\nloop_guard = false\n"
    'input = { interface = "out0", group = "239.2.2.2", port = 6000 }\n'
    'outputs = [ { interface = "in0", group = "239.1.1.1", port = 5000 } ]\n',
    "binary": "\x00\x01\x02",
}


def test_a_broken_file_changes_nothing_and_the_fix_applies(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule())
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    stop = threading.Event()
    sent: list[int] = []
    sender = threading.Thread(
        target=lambda: sent.append(tx.stream_until(stop, "239.1.1.1", 5000, 3, rate=500))
    )
    count, _ = reloads(daemon)
    before = mcrctl_json(daemon.socket, "list")
    with collecting(rx):
        sender.start()
        try:
            for kind, text in BROKEN.items():
                save(daemon.config, text)
                outcome = wait_reload(daemon, count)
                count += 1
                assert outcome["result"] == "rejected", kind
                assert outcome["errors"] and all(str(daemon.config) in e for e in outcome["errors"]), outcome
                assert mcrctl_json(daemon.socket, "list") == before, f"{kind}: the running rules changed"
                status = mcrctl(daemon.socket, "status").stdout
                assert "reload:  rejected" in status and outcome["errors"][0] in status
        finally:
            stop.set()
            sender.join()
        wait_until(lambda: len(rx.seqs(3)) >= sent[0], what="the stream")
    assert rx.seqs(3) == list(range(sent[0])), "a rejected reload disturbed relaying"
    save(daemon.config, x_rule("239.2.2.4"))
    fixed = wait_reload(daemon, count)
    assert fixed["result"] == "applied" and fixed["changed"] == ["x"]
    assert "last reload rejected" not in mcrctl(daemon.socket, "status").stdout


def test_sighup_and_mcrctl_reload_are_the_same_reload(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule(), "--no-watch")
    assert daemon.proc is not None
    count, _ = reloads(daemon)
    daemon.config.write_text(x_rule() + other_rules(2))
    time.sleep(0.3)  # proving a negative: the unwatched file is not picked up by itself
    assert reloads(daemon)[0] == count
    # mcrd runs under `ip netns exec`, which execs it: the pid is mcrd's own.
    os.kill(daemon.proc.pid, signal.SIGHUP)
    by_signal = wait_reload(daemon, count)
    assert by_signal["result"] == "applied" and by_signal["triggers"] == ["SIGHUP"]
    assert sorted(by_signal["added"]) == ["o0", "o1", "o2", "side"]
    # a reload answers once the rules are applied; a new input's worker may still be starting
    wait_until(daemon.all_active, what="the added rules' workers")
    listed = mcrctl_json(daemon.socket, "list")

    daemon.config.write_text(x_rule())
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_reload(daemon, count + 1)
    daemon.config.write_text(x_rule() + other_rules(2))
    result = mcrctl(daemon.socket, "reload", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "applied (5 rule(s))"
    wait_until(daemon.all_active, what="the added rules' workers")
    assert mcrctl_json(daemon.socket, "list") == listed

    unchanged = mcrctl(daemon.socket, "reload", check=False)
    assert unchanged.returncode == 4 and unchanged.stdout.strip() == "unchanged (5 rule(s))"
    assert mcrctl(daemon.socket, "reload", "--unchanged-ok", check=False).returncode == 0
    daemon.config.write_text(BROKEN["bad-port"])
    rejected = mcrctl(daemon.socket, "reload", check=False)
    assert rejected.returncode == 1
    assert rejected.stdout.splitlines() == [
        "rejected, running rules kept:",
        f"  {daemon.config}:4: rule 1 ('x'): outputs[0].port: must be from 1 to 65535, got 99999",
    ]
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_until(lambda: reloads(daemon)[1]["triggers"] == ["SIGHUP"], what="the SIGHUP reload")
    assert reloads(daemon)[1]["errors"] == [e.strip() for e in rejected.stdout.splitlines()[1:]]
    assert mcrctl_json(daemon.socket, "list") == listed


class NotifyListener:
    """The systemd end of sd_notify: a datagram socket that records messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def poll(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
                self.messages.append((time.monotonic(), fields))
                self.sock.settimeout(0)
        except (TimeoutError, BlockingIOError):
            pass

    def wait_for(self, key: str, value: str | None = None, after: int = 0, timeout: float = 10.0) -> int:
        """Index of the first message from `after` on that sets `key` (to `value`)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.messages)):
                fields = self.messages[i][1]
                if key in fields and (value is None or fields[key] == value):
                    return i
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {key}={value} from mcrd; got {[m for _, m in self.messages[after:]]}"
                )
            self.poll(0.1)

    def pings(self) -> list[float]:
        return [t for t, m in self.messages if m.get("WATCHDOG") == "1"]


def test_systemd_notify_and_watchdog(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    tx = TrafficSender(net.src, "eth0")
    config = tmp_path / "mcr.toml"
    config.write_text(x_rule())
    daemon = Daemon(
        net.relay,
        config,
        tmp_path,
        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000", "MCRD_WORKER_TIMEOUT": "60"},
    )
    daemons.append(daemon)
    daemon.start(all_active=False)
    ready = listener.wait_for("READY", "1")
    # READY means relaying: what is sent now is relayed, with no further wait.
    assert all(r["state"] == "active" for r in mcrctl_json(daemon.socket, "list")["rules"])
    tx.stream("239.1.1.1", 5000, stream=5, count=50)
    assert rx.wait_for(lambda a: len(rx.seqs(5)) == 50)
    assert listener.messages[ready][1]["STATUS"] == "1 rule(s) active, 0 pending"

    save(config, x_rule() + other_rules(1))
    reloading = listener.wait_for("RELOADING", "1", after=ready + 1)
    assert int(listener.messages[reloading][1]["MONOTONIC_USEC"]) > 0
    again = listener.wait_for("READY", "1", after=reloading + 1)
    assert listener.messages[again][1]["STATUS"] == "3 rule(s) active, 0 pending"

    save(config, BROKEN["bad-port"])
    rejected = listener.wait_for("READY", "1", after=again + 1)
    assert listener.messages[rejected][1]["STATUS"].startswith(
        f"3 rule(s) active, 0 pending; last reload rejected: {config}:4: rule 1 ('x'): outputs[0].port"
    )

    # Pings flow while all is well, at about half the watchdog interval.
    listener.wait_for("WATCHDOG", "1", after=rejected + 1)
    start = len(listener.messages)
    listener.wait_for("WATCHDOG", "1", after=start)
    (worker,) = [w for w in mcrctl_json(daemon.socket, "workers")["workers"] if w["interface"] == "in0"]
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        # Within a few seconds the pings stop, and stay stopped for longer than
        # the watchdog interval: systemd would fire.
        deadline = stopped_at + 10
        while time.monotonic() < deadline:
            listener.poll(0.2)
            pings = listener.pings()
            if pings and time.monotonic() - pings[-1] > 2.5:
                break
        else:
            raise AssertionError("watchdog pings went on while a worker was stopped")
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    resumed = len(listener.messages)
    listener.wait_for("WATCHDOG", "1", after=resumed)

    assert daemon.stop() == 0
    listener.poll(0.2)
    assert any(m.get("STOPPING") == "1" for _, m in listener.messages)


def test_a_hung_worker_is_killed_and_restarted(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule(), env={"MCRD_WORKER_TIMEOUT": "2"})
    (worker,) = mcrctl_json(daemon.socket, "workers")["workers"]
    os.kill(worker["pid"], signal.SIGSTOP)

    def replaced() -> bool:
        (w,) = mcrctl_json(daemon.socket, "workers")["workers"]
        return bool(w["state"] == "active" and w["pid"] not in (None, worker["pid"]))

    wait_until(replaced, timeout=15, what="the hung worker to be replaced")
    assert "has not answered for 2s; killing it" in daemon.log.read_text()
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=6, count=100)
    assert rx.wait_for(lambda a: len(rx.seqs(6)) == 100)


def test_interfaces_that_come_go_and_come_back(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    lab = net.lab
    dst3 = lab.netns("dst3")
    daemon = start_mcrd(
        net,
        tmp_path,
        daemons,
        """
[[rule]]
name = "late"
input = { interface = "in1", group = "239.1.1.1", port = 5000 }
outputs = [
  { interface = "out0", group = "239.2.2.2", port = 6000 },
  { interface = "out2", group = "239.2.2.9", port = 6000 },
]
""",
        all_active=False,
    )

    def state() -> tuple[str, str]:
        (rule,) = mcrctl_json(daemon.socket, "list")["rules"]
        return rule["state"], rule["reason"]

    def outputs() -> list[str]:
        (rule,) = mcrctl_json(daemon.socket, "list")["rules"]
        return [o["state"] for o in rule["outputs"]]

    assert state() == ("pending", "no interface named 'in1'")
    assert outputs() == ["active", "pending"]
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")

    def connect_input() -> None:
        lab.link(net.src, "eth1", net.relay, "in1", "198.51.100.130/25", "198.51.100.129/25")

    def send_and_check(stream: int) -> None:
        TrafficSender(net.src, "eth1").stream("239.1.1.1", 5000, stream=stream, count=100)
        assert rx.wait_for(lambda a: len(rx.seqs(stream)) == 100), f"stream {stream} was not relayed"
        assert rx.seqs(stream) == list(range(100))

    connect_input()
    wait_until(lambda: state()[0] == "active", what="the rule to start on the new interface")
    send_and_check(10)

    lab.ip(net.src, "link", "del", "eth1")  # takes its peer in1 with it
    wait_until(lambda: state() == ("pending", "no interface named 'in1'"), what="the rule to go pending")
    connect_input()  # same name, new ifindex
    wait_until(lambda: state()[0] == "active", what="the rule to resume")
    send_and_check(11)

    # An output interface that appears later, then is replaced.
    lab.link(net.relay, "out2", dst3, "eth0", "203.0.113.129/25", "203.0.113.130/25")
    wait_until(lambda: outputs() == ["active", "active"], what="the late output")
    rx3 = Receiver(dst3, "239.2.2.9", 6000, "eth0")
    TrafficSender(net.src, "eth1").stream("239.1.1.1", 5000, stream=12, count=50)
    assert rx3.wait_for(lambda a: len(rx3.seqs(12)) == 50)
    lab.ip(net.relay, "link", "del", "out2")
    wait_until(lambda: outputs() == ["active", "pending"], what="the output to go pending")
    lab.link(net.relay, "out2", dst3, "eth0", "203.0.113.129/25", "203.0.113.130/25")
    wait_until(lambda: outputs() == ["active", "active"], what="the output to come back")
    rx3b = Receiver(dst3, "239.2.2.9", 6000, "eth0")
    TrafficSender(net.src, "eth1").stream("239.1.1.1", 5000, stream=13, count=50)
    assert rx3b.wait_for(lambda a: len(rx3b.seqs(13)) == 50), "the replaced output was not reopened"

    lab.ip(net.relay, "link", "set", "out0", "down")
    wait_until(lambda: outputs()[0] == "down", what="link down to show")
    lab.ip(net.relay, "link", "set", "out0", "up")
    wait_until(lambda: outputs()[0] == "active", what="link up to show")
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_removed_file_means_no_rules_until_it_returns(
    net: Net, tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = start_mcrd(net, tmp_path, daemons, x_rule())
    count, _ = reloads(daemon)
    daemon.config.unlink()
    outcome = wait_reload(daemon, count)
    assert outcome["result"] == "applied" and outcome["removed"] == ["x"]
    assert mcrctl_json(daemon.socket, "status")["config_missing"]
    assert mcrctl(daemon.socket, "list").stdout.strip() == "no rules"
    assert "does not exist: running with no rules from it" in daemon.log.read_text()
    assert "missing" in mcrctl(daemon.socket, "status").stdout
    daemon.config.write_text(x_rule())
    assert wait_reload(daemon, count + 1)["added"] == ["x"]
    wait_until(daemon.all_active, what="the restored rule")
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    TrafficSender(net.src, "eth0").stream("239.1.1.1", 5000, stream=7, count=50)
    assert rx.wait_for(lambda a: len(rx.seqs(7)) == 50)


def test_a_unicast_input_address_that_appears_later(net: Net, tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = start_mcrd(
        net,
        tmp_path,
        daemons,
        """
[[rule]]
name = "u"
input = { interface = "in0", group = "192.0.2.77", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]
""",
    )

    def held() -> bool:
        listening = subprocess.run(
            ["ip", "netns", "exec", net.relay, "ss", "-Hlun", "sport = :5000"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return "192.0.2.77:5000" in listening

    assert not held()  # not an address of the host yet
    rx = Receiver(net.dst1, "239.2.2.2", 6000, "eth0")
    net.lab.ip(net.relay, "addr", "add", "192.0.2.77/32", "dev", "in0")
    wait_until(held, what="mcrd to hold the port of the new address")
    tx = TrafficSender(net.src, "eth0", ttl=64)
    tx.sock.connect(("192.0.2.77", 5000))
    for n in range(50):
        tx.sock.send(make_payload(8, n))
    assert rx.wait_for(lambda a: len(rx.seqs(8)) == 50)
    tx.sock.settimeout(0.3)  # proving a negative: no port-unreachable comes back
    with pytest.raises(TimeoutError):
        tx.sock.recv(10)
    assert daemon.rule_stats("u")["packets"] == 50
