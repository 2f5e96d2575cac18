"""Real mDNS and SSDP clients and servers in namespaces, for end-to-end tests.

Each role runs as its own process in a namespace (`ip netns exec NS python -m
tests.helpers.discovery ROLE PARAMS`): an *agent* that speaks JSON lines on
stdout (events) and stdin (commands). The classes here start one, wait for it
to be ready, and stop it (also when a test fails: use them as context
managers; `Lab.close()` kills whatever is left in its namespaces anyway).

    mDNS (python-zeroconf):  MdnsPublisher  registers a service until closed
                             MdnsBrowser    browse+resolve ("browse"), QU queries
                                            only ("qu"), or no queries at all
                                            ("passive", announcements only)
    SSDP (async-upnp-client): SsdpDevice    a UpnpServer root device
                             SsdpSearcher   M-SEARCH and collect the responses

Agents bind to one interface's address only, and watch that interface with a
packet tap, so a result also says how its packets came (source, destination,
TTL) and what the agent itself put on the wire (how many queries, QU or QM).

Two zeroconf agents in one namespace share port 5353 with SO_REUSEPORT, and
the kernel then hands each unicast datagram to one of them only: keep to one
zeroconf agent per namespace where unicast answers matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

from lab.net import Lab

MDNS_TYPE = "_mcrdtest._tcp.local."
MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353
SSDP_GROUP, SSDP_PORT = "239.255.255.250", 1900
SSDP_DEVICE_TYPE = "urn:schemas-mcrd-test:device:Probe:1"

Event = dict[str, Any]
BrowseMode = Literal["browse", "qu", "passive"]

_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------
# Topologies and interface helpers (run in the test process)


@dataclass(frozen=True)
class Topology:
    """Where the two ends of a discovery test live. `relay` is the namespace
    between them (None when they share one segment); A and B each have one
    interface, eth0; the relay's are in0 (towards A) and out0 (towards B)."""

    a: str
    b: str
    a_addr: str
    b_addr: str
    relay: str | None = None
    relay_a_addr: str | None = None
    relay_b_addr: str | None = None


def multicast_route(lab: Lab, ns: str, interface: str = "eth0") -> None:
    """Send multicast (224.0.0.0/4) out of `interface` in `ns`."""
    lab.ip(ns, "route", "replace", "224.0.0.0/4", "dev", interface)


def shared_segment(lab: Lab) -> Topology:
    """A and B on one veth pair: A eth0 192.0.2.10/24 --- B eth0 192.0.2.20/24."""
    a, b = lab.netns("a"), lab.netns("b")
    lab.link(a, "eth0", b, "eth0", "192.0.2.10/24", "192.0.2.20/24")
    for ns in (a, b):
        multicast_route(lab, ns)
    return Topology(a, b, "192.0.2.10", "192.0.2.20")


def routed_segments(lab: Lab) -> Topology:
    """A and B on two segments joined by a router R that forwards unicast and
    relays no multicast (nothing runs in it):

        A eth0 192.0.2.10/24 --- in0 192.0.2.1/24 [R] out0 198.51.100.1/24 --- eth0 198.51.100.2/24 B
    """
    a, r, b = lab.netns("a"), lab.netns("r"), lab.netns("b")
    lab.link(a, "eth0", r, "in0", "192.0.2.10/24", "192.0.2.1/24")
    lab.link(r, "out0", b, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    lab.sysctl(r, "net.ipv4.ip_forward", "1")
    lab.ip(a, "route", "add", "default", "via", "192.0.2.1")
    lab.ip(b, "route", "add", "default", "via", "198.51.100.1")
    for ns in (a, b):
        multicast_route(lab, ns)
    return Topology(a, b, "192.0.2.10", "198.51.100.2", r, "192.0.2.1", "198.51.100.1")


def interface_address(ns: str, interface: str) -> str:
    """The first IPv4 address of `interface` in `ns`."""
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", interface],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            return str(info["local"])
    raise AssertionError(f"{interface} in {ns} has no IPv4 address")


def interface_counters(ns: str, interface: str) -> dict[str, int]:
    """The kernel's counters of `interface` in `ns` (rx_packets, tx_packets,
    rx_bytes, tx_bytes, multicast, rx_dropped, ...), as `ip -s -j link` gives them."""
    out = subprocess.run(
        ["ip", "-n", ns, "-s", "-j", "link", "show", "dev", interface],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    stats = json.loads(out)[0]["stats64"]
    counters = {f"rx_{k}": int(v) for k, v in stats["rx"].items()}
    counters.update({f"tx_{k}": int(v) for k, v in stats["tx"].items()})
    counters["multicast"] = int(stats["rx"].get("multicast", 0))
    return counters


@dataclass
class PacketCount:
    """Packets an interface received and sent while a `counting` block ran."""

    rx: int = 0
    tx: int = 0
    seconds: float = 0.0

    @property
    def rx_rate(self) -> float:
        return self.rx / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def counting(ns: str, interface: str) -> Iterator[PacketCount]:
    """Count the packets `interface` in `ns` receives and sends during the
    block; the PacketCount it gives is filled in when the block ends."""
    before = interface_counters(ns, interface)
    start = time.monotonic()
    count = PacketCount()
    try:
        yield count
    finally:
        after = interface_counters(ns, interface)
        count.seconds = time.monotonic() - start
        count.rx = after["rx_packets"] - before["rx_packets"]
        count.tx = after["tx_packets"] - before["tx_packets"]


def count_packets(ns: str, interface: str, seconds: float) -> PacketCount:
    """Packets `interface` in `ns` received and sent over a window of `seconds`."""
    with counting(ns, interface) as count:
        time.sleep(seconds)  # the window is the measurement
    return count


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Frame:
    """A UDP datagram an agent's tap saw arrive on its interface."""

    src: str
    sport: int
    dst: str
    dport: int
    ttl: int

    @property
    def multicast(self) -> bool:
        return 224 <= int(self.dst.split(".", 1)[0]) <= 239

    @classmethod
    def of(cls, event: Event) -> Frame:
        return cls(event["src"], event["sport"], event["dst"], event["dport"], event["ttl"])


@dataclass(frozen=True)
class MdnsService:
    """A service an MdnsBrowser discovered and resolved, and the mDNS
    responses naming it that had arrived by then."""

    name: str
    server: str
    addresses: tuple[str, ...]
    port: int
    txt: dict[str, str | None]
    frames: tuple[Frame, ...]

    @property
    def unicast(self) -> bool:
        """Whether any response about it came by unicast."""
        return any(not f.multicast for f in self.frames)


@dataclass(frozen=True)
class QueryStats:
    """mDNS queries an agent put on the wire: how many, and how many of them
    asked only QU questions or only QM ones."""

    queries: int
    qu: int
    qm: int


@dataclass(frozen=True)
class SsdpResponse:
    """A response to an M-SEARCH: its headers, where it came from, and its
    TTL as it arrived (-1 if the tap missed it)."""

    usn: str
    st: str
    location: str
    src: str
    sport: int
    ttl: int


# --------------------------------------------------------------------------
# Agent processes, seen from the test


class AgentError(AssertionError):
    pass


class Agent:
    """A helper process in a namespace, speaking JSON lines. Starts it and
    waits for its "ready" event; `close()` stops it (politely, then by force)."""

    def __init__(self, ns: str, role: str, params: dict[str, Any], ready_timeout: float = 15.0) -> None:
        self.ns, self.role = ns, role
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._eof = False
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "tests.helpers.discovery",
                role,
                json.dumps(params),
            ],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name=f"agent-{role}", daemon=True)
        self._reader.start()
        try:
            self.ready = self.expect("ready", timeout=ready_timeout)
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with self._cond:
                    self._events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def events(self, kind: str) -> list[Event]:
        with self._cond:
            return [e for e in self._events if e.get("event") == kind]

    def wait(
        self, kind: str, predicate: Callable[[Event], bool] | None = None, timeout: float = 5.0, skip: int = 0
    ) -> Event | None:
        """The first event of `kind` (satisfying `predicate`, after the first
        `skip` of them), waiting up to `timeout` for it; None if none came
        (or the agent ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                matching = (
                    e for e in self._events if e.get("event") == kind and (predicate is None or predicate(e))
                )
                event = next(itertools.islice(matching, skip, None), None)
                if event is not None:
                    return event
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(left)

    def expect(
        self, kind: str, predicate: Callable[[Event], bool] | None = None, timeout: float = 5.0
    ) -> Event:
        event = self.wait(kind, predicate, timeout)
        if event is None:
            raise AgentError(
                f"{self.role} in {self.ns}: no {kind!r} event within {timeout}s\n{self.stderr()}"
            )
        return event

    def command(self, *words: str, reply: str, timeout: float = 5.0) -> Event:
        """Send a command; returns the reply event it causes."""
        before = len(self.events(reply))
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        event = self.wait(reply, timeout=timeout, skip=before)
        if event is None:
            raise AgentError(f"{self.role} in {self.ns}: no reply to {words}\n{self.stderr()}")
        return event

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # EOF: the agent shuts down cleanly
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MdnsPublisher(Agent):
    """A service registered with python-zeroconf in `ns`, bound to
    `interface`'s address only; registered (probed and announced) once the
    constructor returns, and until closed (which sends goodbyes)."""

    def __init__(
        self,
        ns: str,
        instance: str,
        *,
        interface: str = "eth0",
        port: int = 8080,
        txt: dict[str, str] | None = None,
        service_type: str = MDNS_TYPE,
        probe: bool = True,
    ) -> None:
        self.address = interface_address(ns, interface)
        self.name = f"{instance}.{service_type}"
        super().__init__(
            ns,
            "mdns-publish",
            {
                "address": self.address,
                "interface": interface,
                "instance": instance,
                "type": service_type,
                "port": port,
                "txt": txt or {},
                "probe": probe,
            },
        )

    def announce(self) -> None:
        """Send one unsolicited announcement (a response with all its records) now."""
        self.command("announce", reply="announced")


class MdnsBrowser(Agent):
    """A python-zeroconf client in `ns` looking for `service_type`, bound to
    `interface`'s address only, in one of three modes:

    browse:  ServiceBrowser, then AsyncServiceInfo.async_request for each
             service found (zeroconf's defaults: first queries QU, then QM)
    qu:      the same with question_type=QU: every query it sends asks for
             unicast responses
    passive: sends nothing; reports a service once responses it did not ask
             for (announcements) have brought all its records
    """

    def __init__(
        self,
        ns: str,
        *,
        mode: BrowseMode = "browse",
        interface: str = "eth0",
        service_type: str = MDNS_TYPE,
        resolve_timeout: float = 3.0,
    ) -> None:
        self.address = interface_address(ns, interface)
        self.mode = mode
        super().__init__(
            ns,
            "mdns-browse",
            {
                "address": self.address,
                "interface": interface,
                "type": service_type,
                "mode": mode,
                "resolve_ms": int(resolve_timeout * 1000),
            },
        )

    @staticmethod
    def _service(event: Event) -> MdnsService:
        return MdnsService(
            event["name"],
            event["server"],
            tuple(event["addresses"]),
            event["port"],
            dict(event["txt"]),
            tuple(Frame.of(f) for f in event["frames"]),
        )

    def wait_for(self, instance: str | None = None, timeout: float = 5.0) -> MdnsService | None:
        """The service named `instance` (any service if None) once resolved,
        waiting up to `timeout`; None if it was not."""

        def match(e: Event) -> bool:
            return instance is None or str(e["name"]).lower().startswith(f"{instance.lower()}.")

        event = self.wait("service", match, timeout)
        return None if event is None else self._service(event)

    @property
    def services(self) -> list[MdnsService]:
        return [self._service(e) for e in self.events("service")]

    def queries(self) -> QueryStats:
        """The mDNS queries sent from its interface, as its tap saw them on the
        wire: this agent's own when it is the only mDNS agent in its namespace."""
        event = self.command("stats", reply="stats")
        return QueryStats(event["queries"], event["qu"], event["qm"])


def mdns_browse(
    ns: str,
    instance: str | None = None,
    *,
    mode: BrowseMode = "browse",
    timeout: float = 5.0,
    interface: str = "eth0",
    service_type: str = MDNS_TYPE,
) -> MdnsService | None:
    """Browse from `ns` and return the service `instance` once resolved, or
    None if it was not within `timeout`."""
    with MdnsBrowser(ns, mode=mode, interface=interface, service_type=service_type) as browser:
        return browser.wait_for(instance, timeout)


class SsdpDevice(Agent):
    """A UPnP root device served by async-upnp-client's UpnpServer in `ns`:
    description over HTTP on `interface`'s address, M-SEARCH answered by
    unicast to the searcher's address and port. Runs until closed."""

    def __init__(
        self,
        ns: str,
        *,
        interface: str = "eth0",
        udn: str | None = None,
        device_type: str = SSDP_DEVICE_TYPE,
        http_port: int = 8008,
    ) -> None:
        self.address = interface_address(ns, interface)
        self.udn = udn or f"uuid:{uuid.uuid4()}"
        self.device_type = device_type
        super().__init__(
            ns,
            "ssdp-device",
            {"address": self.address, "udn": self.udn, "device_type": device_type, "http_port": http_port},
        )
        self.location: str = self.ready["location"]


class SsdpSearcher(Agent):
    """async-upnp-client's SsdpSearchListener in `ns`: sends one M-SEARCH
    (ST `st`, MX `mx`) by multicast out of `interface` when started, and
    collects the responses until closed."""

    def __init__(self, ns: str, *, interface: str = "eth0", st: str = "ssdp:all", mx: int = 1) -> None:
        self.address = interface_address(ns, interface)
        super().__init__(
            ns, "ssdp-search", {"address": self.address, "interface": interface, "st": st, "mx": mx}
        )
        self.sport: int = self.expect("searched")["sport"]  # the M-SEARCH's source port

    def search(self) -> None:
        """Send another M-SEARCH."""
        self.command("search", reply="searched")

    @staticmethod
    def _response(event: Event) -> SsdpResponse:
        return SsdpResponse(
            event["usn"], event["st"], event["location"], event["src"], event["sport"], event["ttl"]
        )

    def wait_for(self, usn: str | None = None, timeout: float = 5.0) -> SsdpResponse | None:
        """The first response whose USN contains `usn` (any if None), waiting
        up to `timeout`; None if none came."""
        event = self.wait("response", lambda e: usn is None or usn in e["usn"], timeout)
        return None if event is None else self._response(event)

    @property
    def responses(self) -> list[SsdpResponse]:
        return [self._response(e) for e in self.events("response")]


def ssdp_search(
    ns: str, usn: str | None = None, *, st: str = "ssdp:all", timeout: float = 5.0, interface: str = "eth0"
) -> list[SsdpResponse]:
    """Search from `ns`; once a response whose USN contains `usn` came (any
    response if None), returns all that came by then, or [] after `timeout`."""
    with SsdpSearcher(ns, interface=interface, st=st) as searcher:
        searcher.wait_for(usn, timeout)
        return searcher.responses


# --------------------------------------------------------------------------
# Packets to send by hand (with lab.net.TrafficSender, from any source, port, TTL)


def mdns_announcement(
    instance: str,
    address: str,
    *,
    port: int = 8080,
    txt: dict[str, str] | None = None,
    service_type: str = MDNS_TYPE,
) -> bytes:
    """An unsolicited mDNS response announcing a service (PTR, SRV, TXT, A),
    encoded as python-zeroconf encodes its own announcements."""
    from zeroconf import ServiceInfo
    from zeroconf._protocol.outgoing import DNSOutgoing

    info = ServiceInfo(
        service_type,
        f"{instance}.{service_type}",
        addresses=[socket.inet_aton(address)],
        port=port,
        properties=txt or {},
        server=f"{instance}.local.",
    )
    out = DNSOutgoing(0x8400)  # QR (a response), AA
    for record in (info.dns_pointer(), info.dns_service(), info.dns_text(), *info.dns_addresses()):
        out.add_answer_at_time(record, 0)
    (packet,) = out.packets()
    return packet


def ssdp_response(usn: str, st: str, location: str) -> bytes:
    """A response to an M-SEARCH, as a UPnP device would send it by unicast."""
    headers = {"CACHE-CONTROL": "max-age=1800", "EXT": "", "LOCATION": location, "ST": st, "USN": usn}
    return ("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


# --------------------------------------------------------------------------
# The agents (run in a namespace, as `python -m tests.helpers.discovery`)


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@dataclass
class _Seen:
    outgoing: bool
    src: str
    sport: int
    dst: str
    dport: int
    ttl: int
    payload: bytes

    def frame(self) -> dict[str, Any]:
        return {"src": self.src, "sport": self.sport, "dst": self.dst, "dport": self.dport, "ttl": self.ttl}


@dataclass
class _Tap:
    """IPv4 UDP datagrams from or to `ports` on one interface, both ways."""

    interface: str
    ports: set[int]
    seen: list[_Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        # ETH_P_ALL: a packet socket bound to ETH_P_IP sees only what arrives
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
        self.sock.bind((self.interface, 0x0003))
        self.sock.setblocking(False)

    def drain(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            if addr[1] != 0x0800 or len(data) < 28 or data[9] != 17:
                continue  # not IPv4 UDP
            if struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
                continue  # a fragment
            ihl = (data[0] & 0x0F) * 4
            sport, dport, ulen = struct.unpack_from("!HHH", data, ihl)
            if sport not in self.ports and dport not in self.ports:
                continue
            self.seen.append(
                _Seen(
                    addr[2] == socket.PACKET_OUTGOING,
                    socket.inet_ntoa(data[12:16]),
                    sport,
                    socket.inet_ntoa(data[16:20]),
                    dport,
                    data[8],
                    data[ihl + 8 : ihl + ulen],
                )
            )

    def close(self) -> None:
        self.sock.close()


class _Commands:
    """Commands from stdin, one a line, as an async queue; None at EOF."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

        def read() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(self.queue.put_nowait, line.strip())
            loop.call_soon_threadsafe(self.queue.put_nowait, None)

        threading.Thread(target=read, daemon=True).start()

    async def __aiter__(self) -> Any:
        while (line := await self.queue.get()) is not None and line != "quit":
            yield line


async def _mdns_publish(p: dict[str, Any]) -> None:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    azc = AsyncZeroconf(interfaces=[p["address"]], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        p["type"],
        f"{p['instance']}.{p['type']}",
        addresses=[socket.inet_aton(p["address"])],
        port=p["port"],
        properties=p["txt"],
        server=f"{p['instance']}.local.",
    )
    try:
        announcing = await azc.async_register_service(info, cooperating_responders=not p["probe"])
        await announcing
        _emit("ready", name=info.name)
        async for command in _Commands(asyncio.get_running_loop()):
            if command == "announce":
                azc.zeroconf.async_send(azc.zeroconf.generate_service_broadcast(info, None))
                _emit("announced")
    finally:
        await azc.async_close()


def _mdns_query_stats(tap: _Tap) -> dict[str, int]:
    from zeroconf._protocol.incoming import DNSIncoming

    tap.drain()
    queries = qu = qm = 0
    for s in tap.seen:
        if not s.outgoing or s.dport != MDNS_PORT:
            continue
        msg = DNSIncoming(s.payload)
        if not msg.valid or not msg.is_query():
            continue
        queries += 1
        qu += all(q.unicast for q in msg.questions)
        qm += not any(q.unicast for q in msg.questions)
    return {"queries": queries, "qu": qu, "qm": qm}


def _mdns_frames(tap: _Tap, name: str) -> list[dict[str, Any]]:
    """The responses that arrived naming `name` (in any record)."""
    from zeroconf._dns import DNSPointer
    from zeroconf._protocol.incoming import DNSIncoming

    tap.drain()
    frames = []
    key = name.lower()
    for s in tap.seen:
        if s.outgoing:
            continue
        msg = DNSIncoming(s.payload)
        if not msg.valid or msg.is_query():
            continue
        if any(r.key == key or (isinstance(r, DNSPointer) and r.alias.lower() == key) for r in msg.answers()):
            frames.append(s.frame())
    return frames


async def _mdns_browse(p: dict[str, Any]) -> None:
    from zeroconf import (
        DNSQuestionType,
        IPVersion,
        RecordUpdate,
        RecordUpdateListener,
        ServiceStateChange,
        Zeroconf,
    )
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    type_, mode = p["type"], p["mode"]
    tap = _Tap(p["interface"], {MDNS_PORT})
    azc = AsyncZeroconf(interfaces=[p["address"]], ip_version=IPVersion.V4Only)
    zc = azc.zeroconf
    reported: set[str] = set()
    tasks: set[asyncio.Task[None]] = set()

    def report(info: AsyncServiceInfo) -> None:
        if info.name in reported:
            return
        reported.add(info.name)
        _emit(
            "service",
            name=info.name,
            server=info.server,
            addresses=info.parsed_addresses(IPVersion.V4Only),
            port=info.port,
            txt=info.decoded_properties,
            frames=_mdns_frames(tap, info.name),
        )

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(type_, name)
        question = DNSQuestionType.QU if mode == "qu" else None
        if await info.async_request(zc, p["resolve_ms"], question_type=question):
            report(info)

    def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed and name not in reported:
            task = asyncio.get_running_loop().create_task(resolve(name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    class Passive(RecordUpdateListener):
        def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
            pass

        def async_update_records_complete(self) -> None:
            for ptr in zc.cache.get_all_by_details(type_, 12, 1):  # PTR, IN
                info = AsyncServiceInfo(type_, getattr(ptr, "alias", ""))
                if info.load_from_cache(zc):
                    report(info)

    browser = None
    listener = Passive()
    try:
        await zc.async_wait_for_start()
        if mode == "passive":
            zc.async_add_listener(listener, None)
        else:
            question = DNSQuestionType.QU if mode == "qu" else None
            browser = AsyncServiceBrowser(zc, [type_], handlers=[changed], question_type=question)
        _emit("ready")
        async for command in _Commands(asyncio.get_running_loop()):
            if command == "stats":
                _emit("stats", **_mdns_query_stats(tap))
    finally:
        if browser is not None:
            await browser.async_cancel()
        zc.async_remove_listener(listener)
        for task in tasks:
            task.cancel()
        await azc.async_close()
        tap.close()


async def _ssdp_device(p: dict[str, Any]) -> None:
    import xml.etree.ElementTree as ET

    from async_upnp_client.const import DeviceInfo
    from async_upnp_client.server import UpnpServer, UpnpServerDevice, UpnpServerService

    class Device(UpnpServerDevice):
        DEVICE_DEFINITION = DeviceInfo(
            device_type=p["device_type"],
            friendly_name="mcrd test device",
            manufacturer="mcrd tests",
            manufacturer_url=None,
            model_description=None,
            model_name="probe",
            model_number=None,
            model_url=None,
            serial_number=None,
            udn=p["udn"],
            upc=None,
            presentation_url=None,
            url="/device.xml",
            icons=[],
            xml=ET.Element("server_device"),
        )
        EMBEDDED_DEVICES: list[type[UpnpServerDevice]] = []  # noqa: RUF012
        SERVICES: list[type[UpnpServerService]] = []  # noqa: RUF012

    server = UpnpServer(Device, (p["address"], 0), http_port=p["http_port"])
    await server.async_start()
    try:
        _emit("ready", location=f"http://{p['address']}:{p['http_port']}/device.xml")
        async for _command in _Commands(asyncio.get_running_loop()):
            pass
    finally:
        await server.async_stop()


async def _ssdp_search(p: dict[str, Any]) -> None:
    from async_upnp_client.search import SsdpSearchListener
    from async_upnp_client.utils import CaseInsensitiveDict

    tap = _Tap(p["interface"], {SSDP_PORT})
    connected = asyncio.Event()

    def ttl_of(src: str, sport: int, usn: str) -> int:
        tap.drain()
        for s in tap.seen:
            if s.outgoing or (s.src, s.sport) != (src, sport):
                continue
            lines = (line.partition(":") for line in s.payload.decode(errors="replace").split("\r\n"))
            if any(k.strip().lower() == "usn" and v.strip() == usn for k, _, v in lines):
                return s.ttl
        return -1

    def response(headers: CaseInsensitiveDict) -> None:
        src, sport = headers.get_lower("_remote_addr")[:2]
        usn = str(headers.get_lower("usn", ""))
        _emit(
            "response",
            usn=usn,
            st=headers.get_lower("st", ""),
            location=headers.get_lower("location", ""),
            src=src,
            sport=sport,
            ttl=ttl_of(src, sport, usn),
        )

    listener = SsdpSearchListener(
        callback=response,
        source=(p["address"], 0),
        timeout=p["mx"],
        search_target=p["st"],
        connect_callback=connected.set,
    )

    def search() -> None:
        listener.async_search()
        transport = listener._transport
        assert transport is not None
        _emit("searched", sport=transport.get_extra_info("socket").getsockname()[1])
        tap.ports.add(transport.get_extra_info("socket").getsockname()[1])

    await listener.async_start()
    try:
        await connected.wait()
        _emit("ready")
        search()
        async for command in _Commands(asyncio.get_running_loop()):
            if command == "search":
                search()
    finally:
        listener.async_stop()
        tap.close()


_ROLES = {
    "mdns-publish": _mdns_publish,
    "mdns-browse": _mdns_browse,
    "ssdp-device": _ssdp_device,
    "ssdp-search": _ssdp_search,
}


def _agent_main(argv: list[str]) -> None:
    import logging

    logging.basicConfig(level=os.environ.get("DISCOVERY_LOG", "WARNING"), stream=sys.stderr)
    role, params = argv[0], json.loads(argv[1])
    asyncio.run(_ROLES[role](params))


if __name__ == "__main__":
    _agent_main(sys.argv[1:])
