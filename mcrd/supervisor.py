"""The supervisor: owns the privileged sockets and keeps one worker per input interface.

It opens every socket the data path needs (filtered AF_PACKET receive sockets,
group memberships, output sockets bound to their devices) and hands them to
workers, which it spawns as fresh interpreters, never forks. A worker that
dies is restarted with backoff on the same sockets, so datagrams queued in the
meantime are still relayed. Runs on one asyncio loop; the control server calls
into it. Depends on the pure core (`rules`, `packet`) and the `netio` adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mcrd import channel, netio
from mcrd.packet import DROP_REASONS, FilterEntry, compile_filter, ip_to_int
from mcrd.rules import Destination, RuleSpec, is_multicast

log = logging.getLogger("mcrd")

CONFIGURE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 1.0
SAMPLE_INTERVAL = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long resets the backoff


def backoff_delay(failures: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1)))


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return f"{exc.strerror or exc} (mcrd needs CAP_NET_RAW and CAP_NET_ADMIN)"
    return exc.strerror or str(exc)


class WorkerLink:
    """One running worker process and our end of its channel."""

    def __init__(self, process: asyncio.subprocess.Process, chan: socket.socket) -> None:
        self.process = process
        self.chan = chan
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.closed = False
        chan.setblocking(False)
        asyncio.get_running_loop().add_reader(chan.fileno(), self._readable)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _readable(self) -> None:
        while True:
            try:
                got = channel.receive(self.chan)
            except BlockingIOError:
                return
            except (OSError, ValueError) as exc:
                log.warning("worker %d sent something unreadable: %s", self.pid, exc)
                got = None
            if got is None:
                self.close()
                return
            message, fds = got
            for fd in fds:  # workers have no business sending descriptors
                os.close(fd)
            future = self.pending.pop(message.get("id", 0), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def request(
        self, message: dict[str, Any], fds: list[int] | None = None, timeout: float = REQUEST_TIMEOUT
    ) -> dict[str, Any]:
        if self.closed:
            raise ConnectionError("worker channel is closed")
        ident = self.next_id
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        try:
            channel.send(self.chan, {**message, "id": ident}, fds)
            return await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(ident, None)

    def notify(self, message: dict[str, Any]) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                channel.send(self.chan, message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().remove_reader(self.chan.fileno())
        self.chan.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("worker channel closed"))


@dataclass
class OutputBinding:
    destination: Destination
    sock: socket.socket | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        return str(self.destination)


@dataclass
class RuleBinding:
    spec: RuleSpec
    outputs: list[OutputBinding]


def _empty_counters() -> dict[str, Any]:
    return {"received": 0, "drops": dict.fromkeys(DROP_REASONS, 0), "rules": {}}


def add_counters(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Sum two worker counter snapshots (used to carry counts across restarts)."""
    total = {
        "received": base["received"] + more["received"],
        "drops": {k: base["drops"].get(k, 0) + more["drops"].get(k, 0) for k in DROP_REASONS},
        "rules": {},
    }
    for key in set(base["rules"]) | set(more["rules"]):
        a = base["rules"].get(key, {"packets": 0, "bytes": 0, "outputs": []})
        b = more["rules"].get(key, {"packets": 0, "bytes": 0, "outputs": []})
        outs: dict[str, dict[str, Any]] = {}
        for o in [*a["outputs"], *b["outputs"]]:
            prev = outs.get(o["destination"])
            if prev is None:
                outs[o["destination"]] = dict(o)
            else:
                for k in ("packets", "bytes", "errors"):
                    prev[k] += o[k]
                prev["last_error"] = o["last_error"] or prev["last_error"]
        total["rules"][key] = {
            "packets": a["packets"] + b["packets"],
            "bytes": a["bytes"] + b["bytes"],
            "outputs": list(outs.values()),
        }
    return total


@dataclass
class InputPort:
    """Everything for one input interface: its sockets, its worker, its counters."""

    interface: str
    rules: list[RuleBinding]
    packet_sock: socket.socket | None = None
    precision: int = 2
    holds: list[socket.socket] = field(default_factory=list)  # memberships and sinks
    reason: str = ""
    worker: WorkerLink | None = None
    state: str = "starting"
    restarts: int = 0
    carried: dict[str, Any] = field(default_factory=_empty_counters)  # from dead workers
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # first start tried

    def filter_entries(self) -> Iterable[FilterEntry]:
        for rb in self.rules:
            i = rb.spec.input
            yield FilterEntry(ip_to_int(i.group), i.port, ip_to_int(i.source) if i.source else None)

    def close(self) -> None:
        for sock in self.holds:
            sock.close()
        self.holds.clear()
        if self.packet_sock is not None:
            self.packet_sock.close()
            self.packet_sock = None

    def current(self) -> dict[str, Any]:
        latest = self.samples[-1][1] if self.samples else _empty_counters()
        return add_counters(self.carried, latest)


class Supervisor:
    def __init__(self, rules: list[RuleSpec]) -> None:
        self.rules = rules
        self.ports: dict[str, InputPort] = {}
        self.out_socks: dict[tuple[str | None, int], socket.socket] = {}
        self.out_reasons: dict[tuple[str | None, int], str] = {}
        self.stopping = False
        self.started = time.monotonic()
        self._sampler: asyncio.Task[None] | None = None

    # -- building --------------------------------------------------------

    def _output(self, dest: Destination) -> OutputBinding:
        key = (dest.interface, dest.ttl)
        sock = self.out_socks.get(key)
        if sock is None and key not in self.out_reasons:
            try:
                sock = self.out_socks[key] = netio.open_output_socket(dest.interface, dest.ttl)
            except OSError as exc:
                self.out_reasons[key] = describe_os_error(exc)
                log.warning("output %s unavailable: %s", dest, self.out_reasons[key])
        return OutputBinding(dest, sock, self.out_reasons.get(key, ""))

    def _open_port(self, interface: str, specs: list[RuleSpec]) -> InputPort:
        port = InputPort(
            interface, [RuleBinding(s, [self._output(d) for d in s.destinations()]) for s in specs]
        )
        try:
            program, port.precision = compile_filter(port.filter_entries())
            port.packet_sock = netio.open_packet_socket(interface, program)
            for spec in specs:
                i = spec.input
                if is_multicast(i.group):
                    port.holds.append(netio.join_group(interface, i.group, i.source))
                else:
                    sink = netio.open_sink(i.group, i.port)
                    if sink is not None:
                        port.holds.append(sink)
        except OSError as exc:
            port.close()
            port.reason = describe_os_error(exc)
            port.state = "pending"
            log.warning("input %s: %s; its %d rule(s) are pending", interface, port.reason, len(specs))
        if port.precision < 2:
            log.info(
                "input %s: %d rules exceed an exact kernel filter; matching the rest in the worker",
                interface,
                len(specs),
            )
        return port

    async def start(self) -> None:
        by_interface: dict[str, list[RuleSpec]] = {}
        for spec in self.rules:
            by_interface.setdefault(spec.input.interface, []).append(spec)
        for interface, specs in by_interface.items():
            port = self.ports[interface] = self._open_port(interface, specs)
            if port.packet_sock is not None:
                port.task = asyncio.create_task(self._keep_worker(port), name=f"worker-{interface}")
        waits = [p.settled.wait() for p in self.ports.values() if p.task is not None]
        if waits:
            await asyncio.gather(*waits)
        self._sampler = asyncio.create_task(self._sample_forever(), name="sampler")

    # -- workers ---------------------------------------------------------

    def _configure_message(self, port: InputPort) -> tuple[dict[str, Any], list[int]]:
        assert port.packet_sock is not None
        fds = [port.packet_sock.fileno()]
        index: dict[int, int] = {}
        rules = []
        for rb in port.rules:
            outs = []
            for ob in rb.outputs:
                if ob.sock is None:
                    continue
                fd = ob.sock.fileno()
                if fd not in index:
                    index[fd] = len(fds)
                    fds.append(fd)
                d = ob.destination
                outs.append({"fd": index[fd], "group": d.group, "port": d.port, "label": ob.label})
            i = rb.spec.input
            rules.append(
                {
                    "key": str(rb.spec.key),
                    "group": i.group,
                    "port": i.port,
                    "source": i.source,
                    "outputs": outs,
                }
            )
        return {"op": "configure", "packet_fd": 0, "rules": rules}, fds

    async def _spawn(self, port: InputPort) -> WorkerLink:
        ours, theirs = channel.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mcrd.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        link = WorkerLink(process, ours)
        try:
            message, fds = self._configure_message(port)
            await link.request(message, fds, timeout=CONFIGURE_TIMEOUT)
        except BaseException:
            link.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        return link

    async def _keep_worker(self, port: InputPort) -> None:
        failures = 0
        while not self.stopping:
            began = time.monotonic()
            try:
                port.worker = await self._spawn(port)
            except (OSError, TimeoutError, ConnectionError) as exc:
                port.state, port.reason = "restarting", f"worker failed to start: {exc}"
                log.error("input %s: %s", port.interface, port.reason)
                port.settled.set()
            else:
                port.state, port.reason = "active", ""
                port.settled.set()
                log.info(
                    "input %s: worker %d relaying %d rule(s)",
                    port.interface,
                    port.worker.pid,
                    len(port.rules),
                )
                status = await port.worker.process.wait()
                port.worker.close()
                if self.stopping:
                    return
                self._carry_counters(port)
                port.state = "restarting"
                port.reason = f"worker {port.worker.pid} exited with status {status}"
                port.restarts += 1
                log.error("input %s: %s", port.interface, port.reason)
            failures = 1 if time.monotonic() - began > STABLE_AFTER else failures + 1
            delay = backoff_delay(failures)
            log.info("input %s: restarting its worker in %.1fs", port.interface, delay)
            await asyncio.sleep(delay)

    def _carry_counters(self, port: InputPort) -> None:
        if port.samples:
            port.carried = add_counters(port.carried, port.samples[-1][1])
        port.samples.clear()

    async def _sample(self, port: InputPort) -> None:
        if port.worker is None or port.worker.closed:
            return
        try:
            reply = await port.worker.request({"op": "stats"})
        except (TimeoutError, ConnectionError, OSError):
            return
        port.samples = [*port.samples[-1:], (time.monotonic(), reply)]

    async def sample_all(self) -> None:
        await asyncio.gather(*(self._sample(p) for p in self.ports.values()))

    async def _sample_forever(self) -> None:
        while True:
            await self.sample_all()
            await asyncio.sleep(SAMPLE_INTERVAL)

    # -- views for the control socket --------------------------------------

    def rule_views(self) -> list[dict[str, Any]]:
        views = []
        for spec in self.rules:
            port = self.ports[spec.input.interface]
            binding = next(rb for rb in port.rules if rb.spec is spec)
            state = "active" if port.state == "active" else "pending"
            views.append(
                {
                    "name": spec.name,
                    "key": str(spec.key),
                    "origin": "file",
                    "input": spec.input.model_dump(),
                    "outputs": [
                        {
                            "destination": ob.label,
                            "state": "pending" if ob.sock is None else "active",
                            "reason": ob.reason,
                        }
                        for ob in binding.outputs
                    ],
                    "state": state,
                    "reason": port.reason if state != "active" else "",
                }
            )
        return views

    def stats_view(self) -> dict[str, Any]:
        rules = []
        interfaces = []
        for port in self.ports.values():
            counters = port.current()
            rate: dict[str, tuple[float, float]] = {}
            if len(port.samples) == 2:
                (t0, s0), (t1, s1) = port.samples
                dt = max(t1 - t0, 1e-6)
                for key, c in s1["rules"].items():
                    prev = s0["rules"].get(key, {"packets": 0, "bytes": 0})
                    rate[key] = ((c["packets"] - prev["packets"]) / dt, (c["bytes"] - prev["bytes"]) * 8 / dt)
            interfaces.append(
                {
                    "interface": port.interface,
                    "worker": port.worker.pid if port.worker and not port.worker.closed else None,
                    "state": port.state,
                    "filter": ["udp", "groups", "exact"][port.precision],
                    "received": counters["received"],
                    "drops": counters["drops"],
                }
            )
            for rb in port.rules:
                key = str(rb.spec.key)
                c = counters["rules"].get(key, {"packets": 0, "bytes": 0, "outputs": []})
                by_dest = {o["destination"]: o for o in c["outputs"]}
                pps, bps = rate.get(key, (0.0, 0.0))
                rules.append(
                    {
                        "name": rb.spec.name,
                        "key": key,
                        "packets": c["packets"],
                        "bytes": c["bytes"],
                        "pps": round(pps, 1),
                        "bps": round(bps, 1),
                        "outputs": [
                            by_dest.get(
                                ob.label,
                                {
                                    "destination": ob.label,
                                    "packets": 0,
                                    "bytes": 0,
                                    "errors": 0,
                                    "last_error": ob.reason,
                                },
                            )
                            for ob in rb.outputs
                        ],
                    }
                )
        return {"rules": rules, "interfaces": interfaces}

    def worker_views(self) -> list[dict[str, Any]]:
        return [
            {
                "interface": p.interface,
                "pid": p.worker.pid if p.worker and not p.worker.closed else None,
                "state": p.state,
                "reason": p.reason,
                "restarts": p.restarts,
                "rules": len(p.rules),
            }
            for p in self.ports.values()
        ]

    # -- stopping ----------------------------------------------------------

    async def stop(self) -> None:
        self.stopping = True
        if self._sampler is not None:
            self._sampler.cancel()
        links = [p.worker for p in self.ports.values() if p.worker is not None and not p.worker.closed]
        for link in links:
            link.notify({"op": "stop"})
        for port in self.ports.values():
            if port.task is not None:
                port.task.cancel()
        for link in links:
            try:
                await asyncio.wait_for(link.process.wait(), 1.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    link.process.kill()
                await link.process.wait()
            link.close()
        for port in self.ports.values():
            port.close()
        for sock in self.out_socks.values():
            sock.close()
        self.out_socks.clear()
