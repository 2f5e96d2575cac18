"""The reload plan: rules added, removed, changed or unchanged, by input."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcrd.config import parse_config
from mcrd.plan import plan
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
