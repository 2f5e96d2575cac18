"""Where rules come from, and how the two sources live together.

Two sources make the running set:

- **file** rules, from the rule file (`/etc/mcr.toml`), which stays the
  source of truth for them: they change only when the file does;
- **runtime** rules, added with `mcrctl add`. They survive reloads of the
  rule file and are lost at restart unless `mcrctl config save` writes them
  to the saved-rules file (`/var/lib/mcrd/runtime.toml`), which mcrd loads
  at start; then they are **saved** rules.

Like firewalld's runtime and permanent configuration: what runs is what you
see in `mcrctl list`, with each rule's origin. Two rules may never share an
input, whatever their source: adding a runtime rule whose input a file rule
uses is refused, and so is a reload that would take an input a runtime rule
has (remove that rule first, or move it into the file). `mcrctl remove` only
removes runtime and saved rules; a file rule is removed by editing the file.
A saved rule removed at runtime comes back at the next start unless the
removal is saved too.

Owns the rule set as a whole: which rules run, where each came from, and
whether they may run together (`check`, raising `RuleSetRejected`). Pure:
values in, values or a domain error out; must not depend on the control
protocol, the reloader or anything that does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import tomli_w

from mcrd.rules import RuleKey, RuleSpec, check_rule_set, rule_label

SAVED_HEADER = """\
# Rules added to mcrd at run time (mcrctl add) and saved with `mcrctl config save`.
# mcrd loads this file at start, beside its rule file. It is rewritten by each
# `mcrctl config save`: to change a rule for good, move it into the rule file.
"""


Origin = Literal["file", "runtime", "saved"]
ORIGINS: tuple[Origin, ...] = ("file", "runtime", "saved")


class RuleSetRejected(Exception):  # noqa: N818 -- an outcome, named as the reload reports it
    """A rule set that may not run as a whole; `problems` says why, each
    naming the rule and its source. Each edge maps it once: the control
    socket to an `invalid` error, a reload to a rejected outcome."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def rule_id(key: RuleKey) -> str:
    """A short identifier for a rule, stable across reloads and restarts."""
    return hashlib.sha1(str(key).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RuleBook:
    """The rules mcrd runs, by source: the rule file's, and those added at
    run time (some of them saved). Immutable: every change makes a new book,
    which runs only if `check` passes."""

    file: tuple[RuleSpec, ...] = ()
    runtime: tuple[RuleSpec, ...] = ()
    saved: frozenset[RuleKey] = field(default_factory=frozenset)
    max_rules: int = 1000
    newer: Literal["file", "runtime"] = "runtime"  # changed last: a conflict is reported against it

    def combined(self) -> list[RuleSpec]:
        return [*self.file, *self.runtime]

    def origin(self, spec: RuleSpec) -> Origin:
        if spec.key in {r.key for r in self.runtime}:
            return "saved" if spec.key in self.saved else "runtime"
        return "file"

    def label(self, spec: RuleSpec) -> str:
        """How a message names a rule, with its source."""
        if spec in self.file:
            return rule_label(self.file.index(spec), spec.name)
        return f"{self.origin(spec)} rule {spec.name or rule_id(spec.key)!r}"

    def problems(self) -> list[str]:
        """What is wrong with the set as a whole; empty when it can run."""
        rules = [*self.file, *self.runtime] if self.newer == "runtime" else [*self.runtime, *self.file]
        if len(rules) > self.max_rules:  # before the checks whose cost grows with the count
            return [f"{len(rules)} rules exceed the limit of {self.max_rules} (max_rules)"]
        errors = [
            f"{self.label(rules[i])}: {msg}"
            for i, msg in check_rule_set(rules, lambda _i, spec: self.label(spec))
        ]
        return errors

    def check(self) -> RuleBook:
        """This book, if it may run; RuleSetRejected with every problem if not."""
        problems = self.problems()
        if problems:
            raise RuleSetRejected(problems)
        return self

    def with_file(self, rules: Iterable[RuleSpec], max_rules: int | None = None) -> RuleBook:
        limit = self.max_rules if max_rules is None else max_rules
        return replace(self, file=tuple(rules), newer="file", max_rules=limit)

    def with_added(self, spec: RuleSpec) -> RuleBook:
        return replace(self, runtime=(*self.runtime, spec), newer="runtime")

    def find(self, *, name: str | None = None, ident: str | None = None) -> RuleSpec | None:
        for spec in self.combined():
            if (name is not None and spec.name == name) or (ident is not None and rule_id(spec.key) == ident):
                return spec
        return None

    def without(self, spec: RuleSpec) -> RuleBook:
        return replace(self, runtime=tuple(r for r in self.runtime if r.key != spec.key))

    def marked_saved(self) -> RuleBook:
        return replace(self, saved=frozenset(r.key for r in self.runtime))


def rule_table(spec: RuleSpec) -> dict[str, Any]:
    """A rule as the TOML table a user would write (defaults left out)."""
    return spec.model_dump(mode="json", exclude_none=True)


def dump_rules(rules: Iterable[RuleSpec], header: str = "", notes: dict[RuleKey, str] | None = None) -> str:
    """Rules as a TOML document, each preceded by its note as a comment."""
    parts = [header] if header else []
    for spec in rules:
        note = (notes or {}).get(spec.key)
        text = tomli_w.dumps({"rule": [rule_table(spec)]})
        parts.append((f"# {note}\n" if note else "") + text)
    return "\n".join(parts)
