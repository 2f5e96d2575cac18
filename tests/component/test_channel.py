"""The supervisor's end of a worker channel under load: large messages go
in pieces, two requests never interleave their pieces, a worker that goes
away in the middle of one fails the request cleanly, and what a worker
sends is bounded. Real asyncio and a real socket pair; the worker's end is
read by hand."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import pytest

from mcrd import wire
from mcrd.supervisor.workers import WorkerHandle
from tests.helpers.fakes import FakeClock


class Proc:
    pid = 4242
    returncode: int | None = None

    def __init__(self) -> None:
        self.killed = False

    async def wait(self) -> int:
        return 0

    def kill(self) -> None:
        self.killed = True


def big(n: int) -> dict[str, Any]:
    return {"op": "configure", "blob": "x" * n}


def slow_reader(sock: socket.socket, count: int, got: list[Any]) -> threading.Thread:
    """Reads `count` messages slowly (the channel fills up meanwhile), replying to each."""

    def run() -> None:
        incoming = wire.Reassembly()
        sock.setblocking(True)
        try:
            for _ in range(count):
                time.sleep(0.05)
                result = incoming.receive(sock)
                if result is None:
                    return
                message, _fds = result
                got.append(message)
                wire.send(sock, {"op": "reply", "id": message["id"]})
        except ValueError as exc:
            got.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_two_requests_at_once_arrive_whole_one_after_the_other() -> None:
    async def run() -> None:
        ours, theirs = wire.socketpair()
        handle = WorkerHandle(Proc(), ours, FakeClock())
        first = asyncio.create_task(handle.request(big(12 << 20), timeout=5))
        while handle._room is None:  # the channel is full: the first waits for room
            await asyncio.sleep(0.001)
        second = asyncio.create_task(handle.request({"op": "stats"}, timeout=5))
        await asyncio.sleep(0.05)  # the second is under way too
        got: list[Any] = []
        reader = slow_reader(theirs, 2, got)  # now the worker reads
        replies = await asyncio.gather(first, second, return_exceptions=True)
        await asyncio.to_thread(reader.join)
        assert [m["op"] if isinstance(m, dict) else m for m in got] == ["configure", "stats"]
        assert len(got[0]["blob"]) == 12 << 20
        assert [r["op"] if isinstance(r, dict) else r for r in replies] == ["reply", "reply"]
        handle.close()
        theirs.close()

    asyncio.run(run())


def test_a_worker_gone_in_the_middle_of_a_message_fails_the_request_cleanly() -> None:
    async def run() -> None:
        ours, theirs = wire.socketpair()
        proc = Proc()
        handle = WorkerHandle(proc, ours, FakeClock())
        request = asyncio.create_task(handle.request(big(12 << 20), timeout=20))
        await asyncio.sleep(0.05)  # the channel is full: the request waits for room
        theirs.close()  # the worker dies
        with pytest.raises(ConnectionError):
            await request
        assert handle.closed
        # nothing of the old channel is left registered with the loop
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        loop.add_writer(a.fileno(), lambda: None)
        loop.remove_writer(a.fileno())
        a.close()
        b.close()

    asyncio.run(run())


def test_a_request_that_times_out_in_the_middle_kills_the_worker() -> None:
    async def run() -> None:
        ours, theirs = wire.socketpair()
        proc = Proc()
        handle = WorkerHandle(proc, ours, FakeClock())
        with pytest.raises(TimeoutError):
            await handle.request(big(12 << 20), timeout=0.2)  # nobody reads
        assert proc.killed, "half a message on the channel: the worker cannot go on"
        handle.close()
        theirs.close()

    asyncio.run(run())


def test_what_a_worker_sends_is_bounded_and_its_descriptors_closed() -> None:
    ours, theirs = wire.socketpair()
    incoming = wire.Reassembly(keep_fds=False, limit=1 << 20)
    r, w = os.pipe()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            wire.send_frame(theirs, b"+" + b"y" * (512 << 10), [r, r])
        with pytest.raises(ValueError, match="too large"):
            incoming.receive(ours)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()
