"""The channel between the supervisor and a worker: framing and messages.

One JSON object per SOCK_SEQPACKET message, file descriptors alongside as
SCM_RIGHTS. JSON rather than pickle: the worker runs with less privilege than
the supervisor, and nothing it sends may execute code in the supervisor.
Both sides import this module, so it stays cheap (no pydantic): the
supervisor turns a worker's stats reply into counters itself
(`mcrd.counters.parse_stats`), checking every value.

The messages (`op`):
- supervisor → worker: `configure` (a `Configure`, with the descriptors),
  `stats`, `stop`;
- worker → supervisor: `configured`, `stats` (the replies, carrying the
  request's `id`), and `boot-failed` (with a reason, before it exits with
  `EX_BOOT`).
Rules and outputs are named by small integers the supervisor gives out
(`rule`, `output`), stable for as long as the rule or the output exists, so
that a worker's counts follow them across reconfigurations.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from mcrd.netio import SO_RCVBUFFORCE, SO_SNDBUFFORCE, force_buffer

MAX_MESSAGE = 4 << 20
MAX_FDS = 250  # SCM_MAX_FD is 253
CHUNK = 1 << 20  # bytes of a message per datagram
#: what one message may add up to: 100,000 rules and their outputs fit
MAX_ASSEMBLED = 512 << 20
MAX_ASSEMBLED_FDS = 65536
#: what the supervisor takes from a worker in one message (its counts)
MAX_REPLY = 64 << 20

#: the worker's exit status when it could not take up its post (dropping
#: privileges failed): the supervisor reports the reason it sent and does
#: not restart it until the port's configuration changes
EX_BOOT = 3


@dataclass(frozen=True)
class OutputConfig:
    """One output of a rule, as the worker gets it: which descriptor to send
    on, and where to."""

    output: int  # the output's identity
    fd: int  # index into the descriptors sent with the message
    group: str
    port: int
    socket: int  # generation of the output socket: a new one means new GSO limits
    label: str  # for the worker's log lines only
    #: a faithful output: the worker builds each datagram's IP and UDP headers
    #: from the received one and sends them through a raw socket
    raw: bool = False
    ttl: int = 0  # raw and keep_port only: the TTL to send with
    #: raw: the address to send from (None: the sender's); keep_port: the
    #: address to bind to (None: any)
    source: str | None = None
    source_port: int | None = None  # raw only: the port to send from; None: the sender's
    dscp: int | None = None  # the DSCP to send with; None: each datagram's own
    #: a UDP output that sends each datagram from the sender's source port,
    #: through sockets the worker binds to it, on `interface`
    keep_port: bool = False
    interface: str | None = None

    def message(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "fd": self.fd,
            "group": self.group,
            "port": self.port,
            "socket": self.socket,
            "label": self.label,
            "raw": self.raw,
            "ttl": self.ttl,
            "source": self.source,
            "source_port": self.source_port,
            "dscp": self.dscp,
            "keep_port": self.keep_port,
            "interface": self.interface,
        }

    @classmethod
    def parse(cls, o: dict[str, Any]) -> OutputConfig:
        return cls(
            o["output"],
            o["fd"],
            o["group"],
            o["port"],
            o["socket"],
            o["label"],
            o["raw"],
            o["ttl"],
            o["source"],
            o["source_port"],
            o["dscp"],
            o["keep_port"],
            o["interface"],
        )


@dataclass(frozen=True)
class RuleConfig:
    """One rule, as the worker matches and relays it."""

    rule: int  # the rule's identity
    group: str
    port: int
    source: str | None
    outputs: tuple[OutputConfig, ...]
    pps: int | None = None
    bps: int | None = None
    guard: bool = False  # the loop guard: drop what this host sent, and reflections
    #: "mdns": ask for multicast answers where a relayed query asks for unicast ones
    rewrite: str | None = None

    def message(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "group": self.group,
            "port": self.port,
            "source": self.source,
            "pps": self.pps,
            "bps": self.bps,
            "guard": self.guard,
            "rewrite": self.rewrite,
            "outputs": [o.message() for o in self.outputs],
        }

    @classmethod
    def parse(cls, m: dict[str, Any]) -> RuleConfig:
        outputs = tuple(OutputConfig.parse(o) for o in m["outputs"])
        return cls(
            m["rule"],
            m["group"],
            m["port"],
            m["source"],
            outputs,
            m["pps"],
            m["bps"],
            m["guard"],
            m["rewrite"],
        )


@dataclass(frozen=True)
class Configure:
    """Everything a worker relays: its packet socket (descriptor 0), its
    ring's shape and its rules. Equal messages configure alike, so the
    supervisor skips sending one equal to the last."""

    frame_size: int
    frame_count: int
    rules: tuple[RuleConfig, ...]
    #: this host's addresses, for the loop guard (sorted: equal hosts, equal messages)
    local_addresses: tuple[str, ...] = ()
    #: microseconds to keep polling the ring after the last frame (0: sleep at once)
    busy_poll: int = 0

    def message(self) -> dict[str, Any]:
        return {
            "op": "configure",
            "packet_fd": 0,
            "ring": {
                "frame_size": self.frame_size,
                "frame_count": self.frame_count,
                "busy_poll": self.busy_poll,
            },
            "rules": [r.message() for r in self.rules],
            "local_addresses": list(self.local_addresses),
        }

    @classmethod
    def parse(cls, m: dict[str, Any]) -> Configure:
        ring = m["ring"]
        return cls(
            ring["frame_size"],
            ring["frame_count"],
            tuple(RuleConfig.parse(r) for r in m["rules"]),
            tuple(m["local_addresses"]),
            ring["busy_poll"],
        )


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A channel pair with room for large messages (a worker with many rules)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        force_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, MAX_MESSAGE)
        force_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, MAX_MESSAGE)
    return ours, theirs


def frames(message: dict[str, Any], fds: list[int] | None = None) -> list[tuple[bytes, list[int]]]:
    """A message as the datagrams that carry it, each with its descriptors.

    One datagram when it fits (the JSON itself, beginning with "{"); else
    pieces of at most CHUNK bytes and MAX_FDS descriptors, each but the last
    marked "+" and the last ".", which the receiver puts back together: a
    worker with thousands of rules, or an input with hundreds of outputs,
    does not fit one datagram (and SCM_RIGHTS carries at most 253)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    fds = list(fds or [])
    if len(data) <= CHUNK and len(fds) <= MAX_FDS:
        return [(data, fds)]
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    groups = [fds[i : i + MAX_FDS] for i in range(0, len(fds), MAX_FDS)]
    count = max(len(pieces), len(groups))
    return [
        (
            (b"." if k == count - 1 else b"+") + (pieces[k] if k < len(pieces) else b""),
            groups[k] if k < len(groups) else [],
        )
        for k in range(count)
    ]


def send_frame(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send a message on a blocking channel (or one with room for it)."""
    for data, group in frames(message, fds):
        send_frame(sock, data, group)


def _close(fds: list[int]) -> None:
    for fd in fds:
        socket.close(fd)


class Reassembly:
    """Reads messages from a channel, putting pieces back together. Keeps a
    message's pieces across reads of a non-blocking channel that ran dry
    (BlockingIOError) in the middle of it."""

    def __init__(self, *, keep_fds: bool = True, limit: int = MAX_ASSEMBLED) -> None:
        """`keep_fds` False: close every descriptor as it arrives (from a
        side that has no business sending any); `limit`: the most bytes one
        message may add up to."""
        self.keep_fds = keep_fds
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.fds: list[int] = []

    def _reset(self) -> tuple[bytes, list[int]]:
        parts, fds = b"".join(self.parts), self.fds
        self.parts, self.size, self.fds = [], 0, []
        return parts, fds

    def _garbage(self, fds: list[int], why: str) -> ValueError:
        _close(fds)
        _close(self._reset()[1])  # not leaked with the garbage they came with
        return ValueError(why)

    def receive(self, sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and the descriptors that came with it; None at end of stream."""
        while True:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            if not self.keep_fds:
                _close(fds)
                fds = []
            if not data:
                _close(fds)
                _close(self._reset()[1])
                return None
            head = data[:1]
            if head in (b"+", b"."):
                self.parts.append(data[1:])
                self.size += len(data) - 1
                self.fds += fds
                if self.size > self.limit or len(self.fds) > MAX_ASSEMBLED_FDS:
                    raise self._garbage([], "channel message too large")
                if head == b"+":
                    continue
                data, fds = self._reset()
            elif self.parts:
                raise self._garbage(fds, "channel message cut short")
            try:
                message = json.loads(data)
                if not isinstance(message, dict):
                    raise ValueError("channel message is not an object")
            except (ValueError, RecursionError):
                raise self._garbage(fds, "channel message is not a JSON object") from None
            return message, fds


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message on a blocking channel (see `Reassembly`)."""
    return Reassembly().receive(sock)
