"""Reconcile planning and the other pure pieces of the appliance loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mcrd.config import LoadedConfig, parse_config
from mcrd.links import IFF_UP, Link, LinkTable
from mcrd.notify import watchdog_interval
from mcrd.plan import plan
from mcrd.reload import Reloader
from mcrd.rules import RuleSpec


def rules(text: str) -> list[RuleSpec]:
    return parse_config(text, Path("t.toml")).rules


A = (
    '[[rule]]\nname = "a"\ninput = { interface = "e0", group = "239.1.1.1", port = 1 }\n'
    'outputs = [ { interface = "e1", group = "239.2.2.1" } ]\n'
)
A_CHANGED = A.replace("239.2.2.1", "239.2.2.9")
A_RENAMED = A.replace('name = "a"', 'name = "a2"')
B = (
    '[[rule]]\nname = "b"\ninput = { interface = "e0", group = "239.1.1.2", port = 1 }\n'
    'outputs = [ { interface = "e1", group = "239.2.2.2" } ]\n'
)
B_OTHER_SOURCE = B.replace("port = 1 }", 'port = 1, source = "192.0.2.1" }')
EMPTY = ""


@pytest.mark.parametrize(
    ("before", "after", "added", "removed", "changed", "unchanged"),
    [
        (EMPTY, A, ["a"], [], [], []),
        (A, EMPTY, [], ["a"], [], []),
        (A, A, [], [], [], ["a"]),
        (A + B, B + A, [], [], [], ["b", "a"]),  # order does not matter
        (A, A_CHANGED, [], [], ["a"], []),
        (A, A_RENAMED, [], [], ["a2"], []),  # same input: the same rule, renamed
        (A + B, A_CHANGED, [], ["b"], ["a"], []),
        (B, B_OTHER_SOURCE, ["b"], ["b"], [], []),  # another source is another input
        (A + B, A + B_OTHER_SOURCE, ["b"], ["b"], [], ["a"]),
    ],
)
def test_plan(
    before: str, after: str, added: list[str], removed: list[str], changed: list[str], unchanged: list[str]
) -> None:
    p = plan(rules(before), rules(after))
    assert [r.display_name() for r in p.added] == added
    assert [r.display_name() for r in p.removed] == removed
    assert [r.display_name() for r in p.changed] == changed
    assert [r.display_name() for r in p.unchanged] == unchanged
    assert p.empty == (not added and not removed and not changed)


class Msg(dict[str, Any]):
    """Stands in for a pyroute2 message: a dict with attributes."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_link_table_follows_links_and_addresses() -> None:
    t = LinkTable()
    t.apply(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_NEWLINK", index=3, flags=0))
    assert t.snapshot() == {"eth0": Link(3, "eth0", False)}
    t.apply(Msg({"IFA_LOCAL": "192.0.2.1"}, event="RTM_NEWADDR", index=3, family=2))
    t.apply(Msg({"IFLA_IFNAME": "eth0"}, event="RTM_NEWLINK", index=3, flags=IFF_UP))
    assert t.snapshot() == {"eth0": Link(3, "eth0", True, frozenset({"192.0.2.1"}))}
    t.apply(Msg({"IFA_ADDRESS": "2001:db8::1"}, event="RTM_NEWADDR", index=3, family=10))  # not IPv4
    t.apply(Msg({"IFLA_IFNAME": "wan"}, event="RTM_NEWLINK", index=3, flags=IFF_UP))  # renamed
    assert list(t.snapshot()) == ["wan"]
    t.apply(Msg({"IFA_LOCAL": "192.0.2.1"}, event="RTM_DELADDR", index=3, family=2))
    assert t.snapshot()["wan"].addresses == frozenset()
    t.apply(Msg({}, event="RTM_DELLINK", index=3))
    t.apply(Msg({"IFLA_IFNAME": "wan"}, event="RTM_NEWLINK", index=9, flags=IFF_UP))  # recreated
    assert t.snapshot() == {"wan": Link(9, "wan", True)}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, 3.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "41"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=42) == expected


def test_reloads_coalesce_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mcr.toml"
    path.write_text(A)
    running: list[RuleSpec] = rules(A)
    applied: list[list[str]] = []
    gate = asyncio.Event()

    async def apply(loaded: LoadedConfig) -> None:
        await gate.wait()
        applied.append([r.display_name() for r in loaded.rules])
        running[:] = loaded.rules

    async def scenario() -> None:
        reloader = Reloader(path, lambda: running, apply, loaded=LoadedConfig(path, running))
        task = asyncio.create_task(reloader.run())
        assert (await reloader.request("first")).result == "unchanged"
        path.write_text(A + B)
        first = reloader.request("one")
        await asyncio.sleep(0)  # the reload is now waiting in apply
        second = reloader.request("two")
        third = reloader.request("three")
        assert second is third  # queued requests join one reload
        path.write_text(A_CHANGED + B)
        gate.set()
        assert (await first).added == ["b"]
        outcome = await second
        assert outcome.triggers == ["two", "three"] and outcome.changed == ["a"]
        path.write_text("not toml [[")
        bad = await reloader.request("bad")
        assert bad.result == "rejected" and bad.errors[0].startswith(f"{path}:1:")
        assert [r.display_name() for r in running] == ["a", "b"]
        path.unlink()
        gone = await reloader.request("gone")
        assert gone.result == "applied" and gone.removed == ["a", "b"] and running == []
        assert reloader.count == 5
        task.cancel()

    asyncio.run(scenario())
    assert applied == [["a", "b"], ["a", "b"], []]


def test_separate_cycles_are_each_reported_once() -> None:
    from mcrd.config import ConfigError

    def r(i: str, g: str, o: str, og: str) -> str:
        return (
            f'[[rule]]\ninput = {{ interface = "{i}", group = "{g}", port = 1 }}\n'
            f'outputs = [ {{ interface = "{o}", group = "{og}" }} ]\n'
        )

    text = (
        r("a", "239.0.0.1", "b", "239.0.0.2")
        + r("b", "239.0.0.2", "a", "239.0.0.1")
        + r("c", "239.0.0.3", "d", "239.0.0.4")
        + r("d", "239.0.0.4", "e", "239.0.0.5")
        + r("e", "239.0.0.5", "c", "239.0.0.3")
        + r("x", "239.0.0.9", "a", "239.0.0.1")
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("c.toml"))
    assert info.value.errors == [
        "c.toml:1: rule 1: rules feed each other in a cycle: rule 1 -> rule 2 -> rule 1",
        "c.toml:7: rule 3: rules feed each other in a cycle: rule 3 -> rule 4 -> rule 5 -> rule 3",
    ]
