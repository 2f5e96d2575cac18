"""The supervisor with discovery rules, through its seams: what the loop
guard and faithful outputs ask of the configuration, the lanes and the
output sockets. Real asyncio, fakes at the seams, no root."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mcrd.links import Link
from mcrd.rules import RuleSpec
from mcrd.supervisor import Supervisor
from mcrd.wire import OutputConfig
from tests.helpers.fakes import FakeSeams, FakeWorker, fake_seams, until
from tests.helpers.rulesets import rules


def one_way(a: str, b: str) -> str:
    return (
        f'[[rule]]\nname = "{a}-{b}"\ninput = {{ interface = "{a}", group = "224.0.0.251", port = 5353 }}\n'
        f'outputs = [ {{ interface = "{b}", group = "224.0.0.251", ttl = 255 }} ]\n'
    )


PAIR = rules(one_way("e0", "e1") + one_way("e1", "e0"))
ONE_WAY = rules(one_way("e0", "e1"))
VIDEO = rules(
    '[[rule]]\ninput = { interface = "e0", group = "239.1.1.1", port = 5000 }\n'
    'outputs = [ { interface = "e1", group = "239.2.2.2" } ]\n'
)
LINKS = {
    "e0": Link(10, "e0", True, frozenset({"192.0.2.1"})),
    "e1": Link(11, "e1", True, frozenset({"198.51.100.1"})),
}


def live(fakes: FakeSeams) -> list[FakeWorker]:
    return [w for w in fakes.spawner.workers if w.returncode is None and w.configs]


def scenario(
    body: Callable[[Supervisor, FakeSeams], Awaitable[None]],
    start: list[RuleSpec],
    lanes: int = 1,
    addresses: bool = True,
) -> None:
    async def run() -> None:
        fakes = fake_seams(e0=10, e1=11)
        if addresses:
            fakes.net.addresses.update({"e0": "192.0.2.1", "e1": "198.51.100.1"})
            sup = Supervisor(start, (65534, 65534), lanes=lanes, seams=fakes.seams())
            sup.started = True
            sup.observe_links(dict(LINKS))
        else:
            sup = Supervisor(start, (65534, 65534), lanes=lanes, seams=fakes.seams())
        await sup.start()
        try:
            await body(sup, fakes)
        finally:
            await sup.stop()
        assert fakes.net.live == {}

    asyncio.run(run())


def test_a_pair_is_configured_under_the_guard_with_faithful_outputs() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        workers = fakes.spawner.workers
        assert len(workers) == 2
        for worker in workers:
            config = worker.configs[-1]
            (rule,) = config.rules
            assert rule.guard and rule.rewrite == "mdns"
            assert config.local_addresses == ("192.0.2.1", "198.51.100.1")
            (out,) = rule.outputs
            assert out.raw and out.ttl == 255 and out.source_port is None  # None: the sender's
            assert out.source in ("192.0.2.1", "198.51.100.1")
        # one raw socket per output interface, no UDP output socket
        assert sorted(fakes.net.opened("raw")) == [("raw", "e0"), ("raw", "e1")]
        assert fakes.net.opened("output") == []

    scenario(body, PAIR)


def test_rules_under_the_guard_get_one_lane_and_others_keep_theirs() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        assert len(sup.ports["e0"].lanes) == 2, "a one-way rule is not guarded"
        await sup.apply(PAIR)  # now the rules feed each other
        assert len(sup.ports["e0"].lanes) == 1 and len(sup.ports["e1"].lanes) == 1
        await until(lambda: len(live(fakes)) == 2, "a worker for each port's one lane")
        assert all(w.configs[-1].rules[0].guard for w in live(fakes))
        await sup.apply(VIDEO)
        assert len(sup.ports["e0"].lanes) == 2
        await until(lambda: len(live(fakes)) == 2, "the two lanes' workers")
        assert not any(r.guard for w in live(fakes) for r in w.configs[-1].rules)

    scenario(body, ONE_WAY, lanes=2)


def test_a_faithful_output_without_an_address_to_send_from_waits_for_one() -> None:
    async def body(sup: Supervisor, fakes: FakeSeams) -> None:
        (view,) = sup.rule_views()
        (out,) = view["outputs"]
        assert out["state"] == "pending" and out["reason"] == "no IPv4 address to send from on e1"
        (worker,) = fakes.spawner.workers
        assert len(worker.configs[-1].rules[0].outputs) == 0
        fakes.net.addresses["e1"] = "198.51.100.1"
        sup.observe_links({**LINKS, "e1": Link(11, "e1", True, frozenset({"198.51.100.1", "198.51.100.9"}))})
        await asyncio.sleep(0)
        await sup.reconcile("address added")
        outputs: tuple[OutputConfig, ...] = worker.configs[-1].rules[0].outputs
        assert [o.source for o in outputs] == ["198.51.100.1"]
        assert sup.rule_views()[0]["outputs"][0]["state"] == "active"

    scenario(body, ONE_WAY, addresses=False)
