"""The rule book and log rate limiting: pure, no daemon (mcrctl: tests/unit/test_ctl.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mcrd.config import parse_config
from mcrd.logs import RateLimit
from mcrd.rulebook import RuleBook, dump_rules, rule_id

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


def test_repeated_log_messages_are_rate_limited() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, window=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("mcrd", logging.WARNING, __file__, 1, msg, None, None)

    passed = [limit.filter(record("worker 7 is late")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(record("another message"))
    assert all(limit.filter(record(f"reload {n}: applied")) for n in range(10))  # different texts
    now[0] = 11.0
    again = record("worker 7 is late")
    assert limit.filter(again)
    assert again.getMessage() == "worker 7 is late (7 identical message(s) suppressed)"


def test_changelogs_agree_on_the_version() -> None:
    import re

    import mcrd

    root = Path(__file__).parent.parent
    debian = (root / "debian" / "changelog").read_text().splitlines()[0]
    assert debian.startswith(f"mcrd ({mcrd.__version__})")
    released = re.findall(r"^## \[(\d[^\]]*)\]", (root / "CHANGELOG.md").read_text(), re.M)
    assert released[0] == mcrd.__version__
