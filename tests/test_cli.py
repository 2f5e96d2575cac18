"""mcrctl's command line, the rule book and log rate limiting: pure, no daemon."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from mcrd.config import parse_config
from mcrd.ctl import UsageError, build_parser, parse_outputs, request_for
from mcrd.logs import RateLimit
from mcrd.rulebook import RuleBook, dump_rules, rule_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("239.2.2.2:6000:eth1", [{"group": "239.2.2.2", "port": 6000, "interface": "eth1"}]),
        (
            "239.2.2.2:6000:eth1,198.51.100.7:7000",
            [
                {"group": "239.2.2.2", "port": 6000, "interface": "eth1"},
                {"group": "198.51.100.7", "port": 7000},
            ],
        ),
        ("239.2.2.2:6000:eth1:8", [{"group": "239.2.2.2", "port": 6000, "interface": "eth1", "ttl": 8}]),
        ("198.51.100.7:7000::8", [{"group": "198.51.100.7", "port": 7000, "ttl": 8}]),
    ],
)
def test_parse_outputs(text: str, expected: list[dict[str, Any]]) -> None:
    assert parse_outputs(text) == expected


@pytest.mark.parametrize(
    "text", ["239.2.2.2", ":6000:eth1", "239.2.2.2:http:eth1", "a:1:b:c:d", "239.2.2.2:1:e:x"]
)
def test_parse_outputs_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_outputs(text)


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (
            [
                "add",
                "--input-interface",
                "eth0",
                "--input-group",
                "239.1.1.1",
                "--input-port",
                "5000",
                "--outputs",
                "239.2.2.2:6000:eth1",
                "--name",
                "cam",
                "--source",
                "192.0.2.9",
                "--rate-pps",
                "10",
            ],
            (
                "add",
                {
                    "rule": {
                        "input": {
                            "interface": "eth0",
                            "group": "239.1.1.1",
                            "port": 5000,
                            "source": "192.0.2.9",
                        },
                        "outputs": [{"group": "239.2.2.2", "port": 6000, "interface": "eth1"}],
                        "name": "cam",
                        "rate_limit": {"pps": 10},
                    }
                },
            ),
        ),
        (["remove", "--name", "cam"], ("remove", {"name": "cam"})),
        (["remove", "--rule-id", "abcd1234"], ("remove", {"id": "abcd1234"})),
        (["remove", "--id", "abcd1234"], ("remove", {"id": "abcd1234"})),
        (["config", "show"], ("config.show", {})),
        (["config", "save"], ("config.save", {})),
        (["log-level", "get"], ("log-level.get", {})),
        (["log-level", "set", "debug"], ("log-level.set", {"level": "debug"})),
        (["stats", "--json"], ("stats", {})),
    ],
)
def test_command_lines_become_requests(argv: list[str], wanted: tuple[str, dict[str, Any]]) -> None:
    assert request_for(build_parser().parse_args(argv)) == wanted


def test_global_options_go_before_or_after_the_command() -> None:
    for argv in (["--json", "--socket", "/s", "stats"], ["stats", "--json", "--socket", "/s"]):
        args = build_parser().parse_args(argv)
        assert args.json is True and args.socket == Path("/s")


def test_config_check_reads_the_file(tmp_path: Path) -> None:
    (tmp_path / "f.toml").write_text("x = 1\n")
    args = build_parser().parse_args(["config", "check", str(tmp_path / "f.toml")])
    assert request_for(args) == ("config.check", {"text": "x = 1\n", "path": str(tmp_path / "f.toml")})
    with pytest.raises(UsageError, match="cannot read"):
        request_for(build_parser().parse_args(["config", "check", str(tmp_path / "none.toml")]))


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
