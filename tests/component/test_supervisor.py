"""The supervisor driven through its seams: a fake network, in-process
workers on the real channel protocol, a clock that moves when it sleeps.
Real asyncio, no root, milliseconds a test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from mcrd.links import Link
from mcrd.rules import RuleSpec
from mcrd.supervisor import Supervisor
from tests.helpers.fakes import FakeSeams, FakeSocket, fake_seams, until
from tests.helpers.rulesets import rules


def rule(group: str, out: str, ttl: int = 1, port: int = 5000) -> str:
    return (
        f'[[rule]]\ninput = {{ interface = "e0", group = "{group}", port = {port} }}\n'
        f'outputs = [ {{ interface = "e1", group = "{out}", ttl = {ttl} }} ]\n'
    )


A = rules(rule("239.1.1.1", "239.2.2.1"))
B = rules(rule("239.1.1.2", "239.2.2.2", ttl=2))
C = rules(rule("239.1.1.2", "239.2.2.2", ttl=3))


def scenario(body: Callable[[Supervisor, FakeSeams], Awaitable[None]], start: list[RuleSpec] = A) -> None:
    async def run() -> None:
        fakes = fake_seams(e0=10, e1=11)
        sup = Supervisor(start, (65534, 65534), seams=fakes.seams())
        await sup.start()
        try:
            await body(sup, fakes)
        finally:
            await sup.stop()
        assert fakes.net.live == {}, "every socket is closed when the supervisor stops"

    asyncio.run(run())


def test_rules_a_b_a_converge_in_place_on_one_worker() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        net, spawner = fakes.net, fakes.spawner
        (worker,) = spawner.workers
        assert sup.counts() == (1, 0)
        assert [r.group for r in worker.configs[-1].rules] == ["239.1.1.1"]
        assert net.opened("member") == [("member", "e0", "239.1.1.1", None)]
        assert net.opened("output") == [("output", "e1", 1)]

        await sup.apply(B)
        assert spawner.workers == [worker] and worker.returncode is None, "updated in place"
        assert [(r.group, r.outputs[0].group) for r in worker.configs[-1].rules] == [
            ("239.1.1.2", "239.2.2.2")
        ]
        assert net.opened("member") == [("member", "e0", "239.1.1.2", None)]
        assert net.opened("output") == [("output", "e1", 2)]
        # narrowed to what both sets share (nothing), then widened to B
        filters = [what for event, what in net.events if event == "filter"]
        assert filters[0] == () and len(filters[1]) == 1

        await sup.apply(A)
        assert spawner.workers == [worker]
        assert [r.group for r in worker.configs[-1].rules] == ["239.1.1.1"]
        assert net.opened("member") == [("member", "e0", "239.1.1.1", None)]
        assert net.opened("output") == [("output", "e1", 1)]
        assert len(worker.configs) == 3, "one configuration per change, none repeated"
        assert sup.rule_views()[0]["state"] == "active"

    scenario(body)


def test_an_unchanged_rule_set_sends_nothing_to_the_worker() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (worker,) = fakes.spawner.workers
        before = list(fakes.net.events)
        await sup.apply(list(A))
        await sup.reconcile("nothing changed")
        assert len(worker.configs) == 1
        assert fakes.net.events == before

    scenario(body)


def test_a_replaced_interface_gets_new_sockets_and_a_new_worker() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (old,) = fakes.spawner.workers
        sup.observe_links({"e0": Link(10, "e0", True), "e1": Link(11, "e1", True)})
        await sup.reconcile("first snapshot")
        fakes.net.ifaces["e0"] = 20
        sup.observe_links({"e0": Link(20, "e0", True), "e1": Link(11, "e1", True)})
        await until(
            lambda: len(fakes.spawner.running()) == 1 and fakes.spawner.running()[0] is not old, "respawn"
        )
        assert old.returncode == 0, "the old worker was asked to stop"
        assert fakes.net.opened("packet") == [("packet", "e0", 20)]
        await until(lambda: sup.counts() == (1, 0), "active again")

        sup.observe_links({"e1": Link(11, "e1", True)})  # e0 is gone
        await until(lambda: sup.counts() == (0, 1), "pending")
        assert sup.rule_views()[0]["reason"] == "no interface named 'e0'"
        assert fakes.spawner.running() == [] and fakes.net.opened("packet") == []

    scenario(body)


def test_a_reload_arriving_while_a_pass_awaits_is_applied_whole_by_the_next_pass() -> None:
    """No pass may close an output socket that the worker's configuration
    still uses: with the desired rules read again after an await, the pass
    for B closed B's output (judging by C) right after handing it over."""

    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (worker,) = fakes.spawner.workers
        misuse: list[tuple[object, ...]] = []

        def check(sock: FakeSocket) -> None:
            if sock.ino in worker.in_use:
                misuse.append(sock.what)

        fakes.net.closing.append(check)
        worker.hold = asyncio.Event()
        to_b = asyncio.create_task(sup.apply(B))
        await until(lambda: len(worker.configs) == 2, "the pass for B waits on the worker")
        to_c = asyncio.create_task(sup.apply(C))
        await asyncio.sleep(0.01)
        assert len(worker.configs) == 2, "C waits for the pass for B"
        worker.hold.set()
        await asyncio.gather(to_b, to_c)
        assert misuse == []
        ttls = [r.outputs[0].label.rsplit(" ", 1)[1] for c in worker.configs for r in c.rules]
        assert ttls == ["1", "2", "3"], "A, then B whole, then C whole"
        assert fakes.net.opened("output") == [("output", "e1", 3)]

    scenario(body)


def test_a_worker_that_fails_to_boot_says_why_and_waits_for_a_change() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (worker,) = fakes.spawner.workers
        fakes.spawner.boot_failure = "cannot drop privileges to 65534:65534: Operation not permitted"
        worker.kill()
        await until(lambda: sup.worker_views()[0]["state"] == "failed", "failed")
        view = sup.worker_views()[0]
        assert view["reason"] == (
            "worker failed to boot: cannot drop privileges to 65534:65534: Operation not permitted"
        )
        assert sup.rule_views()[0]["state"] == "failed"
        spawned = len(fakes.spawner.workers)
        for _ in range(20):  # far past any backoff: nothing tries again
            await fakes.clock.sleep(60)
        assert len(fakes.spawner.workers) == spawned
        await sup.reconcile("links changed, rules did not")
        for lane in sup.ports["e0"].lanes:  # a restarted lane's task ends when its worker fails again
            assert lane.task is not None
            await lane.task
        assert len(fakes.spawner.workers) == spawned

        fakes.spawner.boot_failure = ""
        await sup.apply(B)  # the port's configuration changed: worth another try
        await until(lambda: sup.counts() == (1, 0), "active again")
        assert fakes.spawner.running()[0].configs[-1].rules[0].group == "239.1.1.2"

    scenario(body)


def test_a_dead_worker_is_restarted_and_its_counts_carried() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (first,) = fakes.spawner.workers
        first.packets = 10
        await sup.sample_all()
        assert sup.stats_view()["rules"][0]["packets"] == 10
        first.exit(1)
        await until(lambda: len(fakes.spawner.running()) == 1, "restarted")
        second = fakes.spawner.running()[0]
        second.packets = 5
        await until(lambda: sup.counts() == (1, 0), "active")
        await sup.sample_all()
        stats = sup.stats_view()
        assert stats["rules"][0]["packets"] == 15, "totals never go back"
        assert stats["rules"][0]["outputs"][0]["packets"] == 15
        (view,) = sup.worker_views()
        assert view["restarts"] == 1 and view["pid"] == second.pid

    scenario(body)


@pytest.mark.parametrize(
    "reply",
    [
        {"received": -1, "drops": {}, "rules": []},
        {"received": 1, "drops": {}, "rules": [{"rule": 1, "packets": "many"}]},
        {"received": 1, "drops": [], "rules": []},
    ],
)
def test_a_worker_that_sends_malformed_counts_is_replaced(reply: dict[str, object]) -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (first,) = fakes.spawner.workers
        first.stats_reply = reply
        await sup.sample_all()
        assert first.returncode == -9
        await until(lambda: len(fakes.spawner.running()) == 1, "replaced")
        assert sup.stats_view()["rules"][0]["packets"] == 0

    scenario(body)
