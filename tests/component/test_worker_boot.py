"""The worker exit contract with a real worker process: one that cannot
drop privileges says why, exits with EX_BOOT, and the supervisor shows the
reason and does not restart it until the port's configuration changes."""

from __future__ import annotations

import asyncio
import os
import socket

from mcrd.supervisor import Supervisor
from mcrd.supervisor.seams import Identity, WorkerProcess, spawn_worker, worker_command
from tests.component.test_supervisor import A
from tests.helpers.fakes import fake_seams, until

#: as root: a worker without CAP_SETUID and CAP_SETGID, which then cannot
#: take the workers' identity; not root: a worker that may not become root
IDENTITY: Identity = (65534, 65534) if os.geteuid() == 0 else (0, 0)


async def spawn_crippled(channel: socket.socket, identity: Identity) -> WorkerProcess:
    if os.geteuid() != 0:
        return await spawn_worker(channel, identity)
    return await asyncio.create_subprocess_exec(
        "setpriv",
        "--bounding-set=-setuid,-setgid",
        "--inh-caps=-setuid,-setgid",
        *worker_command(channel, identity),
        pass_fds=(channel.fileno(),),
        stdin=asyncio.subprocess.DEVNULL,
    )


def test_a_real_worker_that_cannot_drop_privileges_is_reported_not_restarted() -> None:
    async def run() -> None:
        fakes = fake_seams(e0=10, e1=11)
        seams = fakes.seams()
        spawned: list[WorkerProcess] = []

        async def spawn(channel: socket.socket, identity: Identity) -> WorkerProcess:
            spawned.append(await spawn_crippled(channel, identity))
            return spawned[-1]

        seams.spawn = spawn
        sup = Supervisor(A, IDENTITY, seams=seams)
        await sup.start()  # returns once the first start was tried
        try:
            (view,) = sup.worker_views()
            uid, gid = IDENTITY
            assert view["state"] == "failed"
            assert view["reason"] == (
                f"worker failed to boot: cannot drop privileges to {uid}:{gid}: Operation not permitted"
            )
            assert [p.returncode for p in spawned] == [3]
            await sup.reconcile("nothing changed")
            lane = sup.ports["e0"].lanes[0]
            assert lane.task is not None
            await lane.task
            assert len(spawned) == 1
            await until(lambda: sup.counts() == (0, 1), "the rule is not active")
        finally:
            await sup.stop()

    asyncio.run(run())
