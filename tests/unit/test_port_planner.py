"""The pure port planner (mcrd.supervisor.ports.plan_port): from a port's
rules, the interface as observed and what the port holds, whether to open,
update in place, reopen or close it, and which groups, sinks and filter
entries change."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcrd.config import parse_config
from mcrd.links import Link
from mcrd.packet import FilterEntry, ip_to_int
from mcrd.rules import RuleSpec
from mcrd.supervisor.ports import Held, PortAction, filter_entries, plan_port


def rules(text: str) -> list[RuleSpec]:
    return parse_config(text, Path("t.toml")).rules


def rule(group: str, port: int, source: str | None = None) -> str:
    src = f', source = "{source}"' if source else ""
    return (
        f'[[rule]]\ninput = {{ interface = "x", group = "{group}", port = {port}{src} }}\n'
        'outputs = [ { interface = "e1", group = "239.9.9.9" } ]\n'
    )


def entry(group: str, port: int, source: str | None = None) -> FilterEntry:
    return FilterEntry(ip_to_int(group), port, ip_to_int(source) if source else None)


A = rule("239.1.1.1", 5000)
A_OTHER_PORT = rule("239.1.1.1", 5001)  # same group as A: the same membership
B_SSM = rule("232.1.1.1", 5000, "192.0.2.9")
U = rule("192.0.2.1", 7000)  # unicast input: a sink, no membership
U_FROM = rule("192.0.2.1", 7001, "198.51.100.7")

LINK = Link(4, "x", True)
REPLACED = Link(9, "x", True)


def held_for(text: str, ifindex: int = 4) -> Held:
    """What a port holds once it carried out the plan for `text` on `ifindex`."""
    plan = plan_port("x", rules(text), Link(ifindex, "x", True), Held())
    return Held(ifindex, plan.entries, plan.join, plan.open_sinks)


def test_filter_entries() -> None:
    assert filter_entries(rules(A + B_SSM + U)) == {
        entry("239.1.1.1", 5000),
        entry("232.1.1.1", 5000, "192.0.2.9"),
        entry("192.0.2.1", 7000),
    }
    assert filter_entries([]) == frozenset()


@pytest.mark.parametrize("held", [Held(), Held(4, frozenset({entry("239.1.1.1", 5000)}))])
def test_no_link_closes(held: Held) -> None:
    plan = plan_port("x", rules(A), None, held)
    assert plan.action is PortAction.CLOSE
    assert plan.reason == "no interface named 'x'"


def test_closed_port_opens_with_everything() -> None:
    plan = plan_port("x", rules(A + A_OTHER_PORT + B_SSM + U + U_FROM), LINK, Held())
    assert plan.action is PortAction.OPEN
    assert plan.reason == ""
    assert plan.entries == {
        entry("239.1.1.1", 5000),
        entry("239.1.1.1", 5001),
        entry("232.1.1.1", 5000, "192.0.2.9"),
        entry("192.0.2.1", 7000),
        entry("192.0.2.1", 7001, "198.51.100.7"),
    }
    assert plan.join == {("239.1.1.1", None), ("232.1.1.1", "192.0.2.9")}
    assert plan.open_sinks == {("192.0.2.1", 7000), ("192.0.2.1", 7001)}
    assert plan.leave == frozenset()
    assert plan.close_sinks == frozenset()
    assert plan.narrow is None


def test_held_on_another_ifindex_reopens() -> None:
    held = held_for(A + U, ifindex=4)
    plan = plan_port("x", rules(A + U), REPLACED, held)
    assert plan.action is PortAction.REOPEN
    assert plan.reason == "interface replaced"
    # everything is opened anew on the new interface
    assert plan.entries == {entry("239.1.1.1", 5000), entry("192.0.2.1", 7000)}
    assert plan.join == {("239.1.1.1", None)}
    assert plan.open_sinks == {("192.0.2.1", 7000)}


def test_same_interface_same_rules_changes_nothing() -> None:
    held = held_for(A + B_SSM + U)
    plan = plan_port("x", rules(A + B_SSM + U), LINK, held)
    assert plan.action is PortAction.UPDATE
    assert plan.narrow is None
    assert plan.entries == held.entries
    assert plan.join == plan.leave == frozenset()
    assert plan.open_sinks == plan.close_sinks == frozenset()


def test_rule_order_does_not_matter() -> None:
    plan = plan_port("x", rules(U + B_SSM + A), LINK, held_for(A + B_SSM + U))
    assert plan.action is PortAction.UPDATE
    assert plan.narrow is None
    assert plan.join == plan.leave == frozenset()
    assert plan.open_sinks == plan.close_sinks == frozenset()


@pytest.mark.parametrize(
    ("before", "after", "join", "leave"),
    [
        (A, A + B_SSM, {("232.1.1.1", "192.0.2.9")}, set()),  # a rule added
        (A + B_SSM, A, set(), {("232.1.1.1", "192.0.2.9")}),  # a rule removed
        (A + B_SSM, B_SSM, set(), {("239.1.1.1", None)}),
        (A + B_SSM, A_OTHER_PORT, set(), {("232.1.1.1", "192.0.2.9")}),
        # the group stays joined while another rule needs it
        (A + A_OTHER_PORT, A, set(), set()),
        (A, A + A_OTHER_PORT, set(), set()),
        (A, B_SSM, {("232.1.1.1", "192.0.2.9")}, {("239.1.1.1", None)}),
    ],
)
def test_rules_changed_update_in_place(
    before: str, after: str, join: set[tuple[str, str | None]], leave: set[tuple[str, str | None]]
) -> None:
    held = held_for(before)
    new_entries = filter_entries(rules(after))
    plan = plan_port("x", rules(after), LINK, held)
    assert plan.action is PortAction.UPDATE
    assert plan.entries == new_entries
    assert plan.narrow == held.entries & new_entries  # only what both the old and new tables have
    assert plan.join == join
    assert plan.leave == leave
    assert plan.open_sinks == plan.close_sinks == frozenset()


def test_unicast_rule_added_opens_its_sink() -> None:
    plan = plan_port("x", rules(A + U), LINK, held_for(A))
    assert plan.action is PortAction.UPDATE
    assert plan.open_sinks == {("192.0.2.1", 7000)}
    assert plan.close_sinks == frozenset()
    assert plan.join == plan.leave == frozenset()  # a unicast input joins no group
    assert plan.narrow == frozenset({entry("239.1.1.1", 5000)})


def test_unicast_rule_removed_closes_its_sink() -> None:
    plan = plan_port("x", rules(A), LINK, held_for(A + U + U_FROM))
    assert plan.action is PortAction.UPDATE
    assert plan.close_sinks == {("192.0.2.1", 7000), ("192.0.2.1", 7001)}
    assert plan.open_sinks == frozenset()
    assert plan.entries == {entry("239.1.1.1", 5000)}


def test_sink_that_was_never_opened_is_opened_again() -> None:
    """The address was not local yet when the port opened: nothing is held
    for it, so the next pass tries again (and the filter stays)."""
    held = held_for(A + U)
    held = Held(held.ifindex, held.entries, held.memberships, frozenset())
    plan = plan_port("x", rules(A + U), LINK, held)
    assert plan.action is PortAction.UPDATE
    assert plan.open_sinks == {("192.0.2.1", 7000)}
    assert plan.narrow is None
    assert plan.join == frozenset()


def test_membership_lost_is_joined_again() -> None:
    held = held_for(A + B_SSM)
    held = Held(held.ifindex, held.entries, frozenset({("239.1.1.1", None)}), held.sinks)
    plan = plan_port("x", rules(A + B_SSM), LINK, held)
    assert plan.join == {("232.1.1.1", "192.0.2.9")}
    assert plan.leave == frozenset()
