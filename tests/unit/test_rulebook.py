"""The rule book: sources, origins, conflicts between them, the limit, and
the domain error a rule set that may not run raises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mcrd.config import parse_config
from mcrd.rulebook import RuleBook, RuleSetRejected, dump_rules, rule_id

RULE = (
    '[[rule]]\nname = "{name}"\ninput = {{ interface = "e0", group = "{group}", port = 1 }}\n'
    'outputs = [ {{ interface = "e1", group = "239.9.9.9" }} ]\n'
)


def rules(*pairs: tuple[str, str]) -> tuple[Any, ...]:
    text = "".join(RULE.format(name=n, group=g) for n, g in pairs)
    return tuple(parse_config(text, Path("f.toml")).rules)


def test_rule_book_sources_and_conflicts() -> None:
    book = RuleBook(file=rules(("a", "239.1.1.1")), max_rules=3)
    (extra,) = rules(("x", "239.1.1.2"))
    book = book.with_added(extra)
    assert [book.origin(r) for r in book.combined()] == ["file", "runtime"]
    assert book.problems() == []
    assert book.marked_saved().origin(extra) == "saved"
    clash = book.with_file(rules(("a", "239.1.1.1"), ("b", "239.1.1.2")))
    assert clash.problems() == ["rule 2 ('b'): input e0 239.1.1.2:1 is already used by runtime rule 'x'"]
    (dup,) = rules(("y", "239.1.1.1"))
    assert book.with_added(dup).problems() == [
        "runtime rule 'y': input e0 239.1.1.1:1 is already used by rule 1 ('a')"
    ]
    (more,) = rules(("z", "239.1.1.3"))
    (most,) = rules(("w", "239.1.1.4"))
    assert book.with_added(more).with_added(most).problems() == ["4 rules exceed the limit of 3 (max_rules)"]
    assert book.find(ident=rule_id(extra.key)) == extra and book.find(name="a") is not None
    assert book.without(extra).combined() == list(book.file)


def test_dumped_rules_load_back_the_same() -> None:
    original = rules(("a", "239.1.1.1"), ("b", "239.1.1.2"))
    text = dump_rules(original, "# header\n", {original[0].key: "a note"})
    assert "# a note\n" in text and text.startswith("# header\n")
    assert tuple(parse_config(text, Path("saved.toml")).rules) == original


def test_a_book_that_may_not_run_is_rejected_with_every_problem() -> None:
    book = RuleBook(file=rules(("a", "239.1.1.1")), max_rules=1)
    assert book.check() is book
    (dup,) = rules(("y", "239.1.1.1"))
    with pytest.raises(RuleSetRejected) as info:
        book.with_added(dup).check()
    assert info.value.problems == ["2 rules exceed the limit of 1 (max_rules)"]
    with pytest.raises(RuleSetRejected) as info:
        book.with_file(rules(("a", "239.1.1.1")), max_rules=3).with_added(dup).check()
    assert info.value.problems == ["runtime rule 'y': input e0 239.1.1.1:1 is already used by rule 1 ('a')"]
    assert book.with_file((), max_rules=5).max_rules == 5 and book.with_file(()).max_rules == 1
