"""Reconcile planning: what a reload changes, as a pure comparison.

Rules are matched by key (their input). A rule whose key is new is added, one
whose key is gone is removed, one whose key stays but whose outputs or name
differ is changed, and the rest are unchanged and must not be disturbed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mcrd.rules import RuleKey, RuleSpec


@dataclass(frozen=True)
class Plan:
    added: list[RuleSpec] = field(default_factory=list)
    removed: list[RuleSpec] = field(default_factory=list)
    changed: list[RuleSpec] = field(default_factory=list)  # the new version of each
    unchanged: list[RuleSpec] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": [r.display_name() for r in self.added],
            "removed": [r.display_name() for r in self.removed],
            "changed": [r.display_name() for r in self.changed],
        }


def plan(running: list[RuleSpec], desired: list[RuleSpec]) -> Plan:
    before: dict[RuleKey, RuleSpec] = {r.key: r for r in running}
    after: dict[RuleKey, RuleSpec] = {r.key: r for r in desired}
    result = Plan()
    for key, rule in after.items():
        old = before.get(key)
        if old is None:
            result.added.append(rule)
        elif old != rule:
            result.changed.append(rule)
        else:
            result.unchanged.append(rule)
    result.removed.extend(rule for key, rule in before.items() if key not in after)
    return result
