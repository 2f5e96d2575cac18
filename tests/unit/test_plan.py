"""The reload plan: rules added, removed, changed or unchanged, by input."""

from __future__ import annotations

import pytest

from mcrd.plan import plan
from tests.helpers.rulesets import A_CHANGED, A_RENAMED, B_OTHER_SOURCE, EMPTY, A, B, rules


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
