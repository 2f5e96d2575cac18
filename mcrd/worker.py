"""The data-plane worker: one process per input interface.

Started by the supervisor as a fresh interpreter (`python -m mcrd.worker FD`)
with one end of a channel. Everything else — the filtered AF_PACKET socket and
the output sockets — arrives over that channel as file descriptors, so the
worker itself never needs privilege to open them. It relays datagrams, counts,
and answers the supervisor; it exits when the channel closes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import socket
import sys
from time import monotonic
from typing import Any

from mcrd import channel
from mcrd.netio import packet_statistics
from mcrd.packet import DROP_REASONS, Datagram, ip_to_int, parse
from mcrd.privdrop import drop_privileges

log = logging.getLogger("mcrd.worker")

BATCH = 256  # datagrams between two looks at the channel


class Output:
    __slots__ = ("address", "errors", "label", "last_error", "octets", "packets", "sock")

    def __init__(self, sock: socket.socket, group: str, port: int, label: str) -> None:
        self.sock = sock
        self.address = (group, port)
        self.label = label
        self.packets = 0
        self.octets = 0
        self.errors = 0
        self.last_error = ""

    def counters(self) -> dict[str, Any]:
        return {
            "destination": self.label,
            "packets": self.packets,
            "bytes": self.octets,
            "errors": self.errors,
            "last_error": self.last_error,
        }


class Policer:
    """Token buckets for datagrams and bits per second, each holding 0.1 s of rate."""

    __slots__ = ("bit_tokens", "bps", "last", "packet_tokens", "pps")

    BURST = 0.1

    def __init__(self, pps: int | None, bps: int | None, now: float) -> None:
        self.pps = pps
        self.bps = bps
        self.packet_tokens = max(pps * self.BURST, 1.0) if pps else 0.0
        self.bit_tokens = max(bps * self.BURST, 65535 * 8.0) if bps else 0.0
        self.last = now

    def allow(self, length: int, now: float) -> bool:
        elapsed = now - self.last
        self.last = now
        bits = length * 8
        if self.pps:
            self.packet_tokens = min(self.packet_tokens + elapsed * self.pps, max(self.pps * self.BURST, 1.0))
            if self.packet_tokens < 1.0:
                return False
        if self.bps:
            self.bit_tokens = min(
                self.bit_tokens + elapsed * self.bps, max(self.bps * self.BURST, 65535 * 8.0)
            )
            if self.bit_tokens < bits:
                return False
            self.bit_tokens -= bits
        if self.pps:
            self.packet_tokens -= 1.0
        return True


class Rule:
    __slots__ = ("key", "limited", "octets", "outputs", "packets", "policer")

    def __init__(self, key: str, outputs: list[Output], policer: Policer | None = None) -> None:
        self.key = key
        self.outputs = outputs
        self.policer = policer
        self.packets = 0
        self.octets = 0
        self.limited = 0

    def counters(self) -> dict[str, Any]:
        return {
            "packets": self.packets,
            "bytes": self.octets,
            "limited": self.limited,
            "outputs": [o.counters() for o in self.outputs],
        }


class Worker:
    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan
        self.packet_sock: socket.socket | None = None
        self.owned: list[socket.socket] = []
        self.rules: list[Rule] = []
        # (group, port) -> {source or None: rule}: one dict lookup per datagram,
        # whatever the number of rules.
        self.table: dict[tuple[int, int], dict[int | None, Rule]] = {}
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.received = 0
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)
        self.running = True

    # -- control -----------------------------------------------------------

    def configure(self, message: dict[str, Any], fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        for sock in socks:
            sock.setblocking(False)
        for sock in self.owned:  # new descriptors for the same sockets arrived
            sock.close()
        self.owned = socks
        self.packet_sock = socks[message["packet_fd"]]
        # Counters follow a rule (by key) and an output (by destination)
        # across reconfigurations: a reload does not reset what was counted.
        old_rules = {r.key: r for r in self.rules}
        rules: list[Rule] = []
        table: dict[tuple[int, int], dict[int | None, Rule]] = {}
        for spec in message["rules"]:
            old = old_rules.get(spec["key"])
            old_outputs = {o.label: o for o in old.outputs} if old else {}
            outputs = []
            for o in spec["outputs"]:
                out = Output(socks[o["fd"]], o["group"], o["port"], o["label"])
                prev = old_outputs.get(out.label)
                if prev is not None:
                    out.packets, out.octets, out.errors, out.last_error = (
                        prev.packets,
                        prev.octets,
                        prev.errors,
                        prev.last_error,
                    )
                outputs.append(out)
            limit = spec.get("rate_limit")
            policer = None
            if limit:
                same = (
                    old is not None
                    and old.policer is not None
                    and (old.policer.pps, old.policer.bps) == (limit.get("pps"), limit.get("bps"))
                )
                policer = (
                    old.policer if same and old else Policer(limit.get("pps"), limit.get("bps"), monotonic())
                )
            rule = Rule(spec["key"], outputs, policer)
            if old is not None:
                rule.packets, rule.octets, rule.limited = old.packets, old.octets, old.limited
            rules.append(rule)
            source = ip_to_int(spec["source"]) if spec["source"] else None
            table.setdefault((ip_to_int(spec["group"]), spec["port"]), {})[source] = rule
        self.rules, self.table = rules, table

    def stats(self) -> dict[str, Any]:
        if self.packet_sock is not None:
            _packets, dropped = packet_statistics(self.packet_sock)
            self.drops["overflow"] += dropped
        return {
            "received": self.received,
            "drops": dict(self.drops),
            "rules": {r.key: r.counters() for r in self.rules},
        }

    def handle_channel(self) -> None:
        try:
            got = channel.receive(self.chan)
        except ConnectionError:
            got = None
        if got is None:
            self.running = False
            return
        message, fds = got
        op = message.get("op")
        if op == "configure":
            self.configure(message, fds)
            channel.send(self.chan, {"op": "configured", "id": message.get("id"), "pid": os.getpid()})
        elif op == "stats":
            channel.send(self.chan, {"op": "stats", "id": message.get("id"), **self.stats()})
        elif op == "stop":
            self.running = False
        else:
            for fd in fds:
                os.close(fd)

    # -- data path ---------------------------------------------------------

    def drain(self) -> bool:
        """Relay up to BATCH datagrams; True when more may be waiting."""
        sock = self.packet_sock
        if sock is None:
            return False
        recv_into = sock.recv_into
        buf, view, table, drops = self.buf, self.view, self.table, self.drops
        for _ in range(BATCH):
            try:
                size = recv_into(buf)
            except BlockingIOError:
                return False
            except OSError as exc:  # ENETDOWN when the link goes down: frames just stop
                log.warning("receive: %s", exc.strerror or exc)
                return False
            self.received += 1
            dgram = parse(buf, size)
            if dgram.__class__ is str:
                drops[dgram] += 1
                continue
            assert isinstance(dgram, Datagram)
            by_source = table.get((dgram.group, dgram.port))
            rule = None
            if by_source is not None:
                rule = by_source.get(dgram.source) or by_source.get(None)
            if rule is None:
                drops["unmatched"] += 1
                continue
            payload = view[dgram.start : dgram.end]
            length = dgram.end - dgram.start
            rule.packets += 1
            rule.octets += length
            if rule.policer is not None and not rule.policer.allow(length, monotonic()):
                rule.limited += 1
                continue
            for out in rule.outputs:
                try:
                    out.sock.sendto(payload, out.address)
                except OSError as exc:
                    out.errors += 1
                    out.last_error = errno.errorcode.get(exc.errno or 0, str(exc))
                else:
                    out.packets += 1
                    out.octets += length
        return True

    def run(self) -> None:
        poller = select.poll()
        chan_fd = self.chan.fileno()
        poller.register(chan_fd, select.POLLIN)
        registered = -1  # by number: a reconfiguration replaces the descriptor
        while self.running:
            wanted = self.packet_sock.fileno() if self.packet_sock is not None else -1
            if wanted != registered:
                if registered >= 0:
                    poller.unregister(registered)
                if wanted >= 0:
                    poller.register(wanted, select.POLLIN)
                registered = wanted
            for fd, events in poller.poll(1000):
                if fd == chan_fd:
                    self.handle_channel()
                elif fd == registered and events & (select.POLLIN | select.POLLERR):
                    while self.drain() and not _readable(self.chan):
                        pass
                if not self.running:
                    break


def _readable(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


EX_BOOT = 3  # the worker could not take up its post: the supervisor backs off


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mcrd-worker", description="mcrd data-plane worker (started by mcrd)"
    )
    parser.add_argument("channel", type=int, help="descriptor of the channel to the supervisor")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="mcrd-worker[%(process)d]: %(message)s")
    # The supervisor stops us through the channel; a terminal's ^C goes to the
    # whole process group and must not kill the data path before it asks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        drop_privileges(args.uid, args.gid)
    except OSError as exc:
        log.error("cannot drop privileges to %d:%d: %s", args.uid, args.gid, exc.strerror or exc)
        return EX_BOOT
    chan = socket.socket(fileno=args.channel)
    Worker(chan).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
