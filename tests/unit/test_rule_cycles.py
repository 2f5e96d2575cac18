"""Rules that feed each other: relayed under the loop guard, refused only
where the guard cannot make them safe, each such cycle reported once."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcrd.config import ConfigError, parse_config
from mcrd.loops import loop_guarded
from mcrd.rules import RuleKey
from tests.helpers.rulesets import rules


def r(i: str, g: str, o: str, og: str, extra: str = "") -> str:
    return (
        f'[[rule]]\n{extra}input = {{ interface = "{i}", group = "{g}", port = 1 }}\n'
        f'outputs = [ {{ interface = "{o}", group = "{og}" }} ]\n'
    )


def test_unguarded_cycles_are_each_reported_once() -> None:
    off = "loop_guard = false\n"
    text = (
        r("a", "239.0.0.1", "b", "239.0.0.2", off)
        + r("b", "239.0.0.2", "a", "239.0.0.1")
        + r("c", "239.0.0.3", "d", "239.0.0.4")
        + r("d", "239.0.0.4", "e", "239.0.0.5", off)
        + r("e", "239.0.0.5", "c", "239.0.0.3")
        + r("x", "239.0.0.9", "a", "239.0.0.1")
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("c.toml"))
    assert info.value.errors == [
        "c.toml:1: rule 1: rules feed each other in a cycle and rule 1 turns the loop guard off "
        "(loop_guard = false): rule 1 -> rule 2 -> rule 1",
        "c.toml:8: rule 3: rules feed each other in a cycle and rule 4 turns the loop guard off "
        "(loop_guard = false): rule 3 -> rule 4 -> rule 5 -> rule 3",
    ]


MDNS_PAIR = """
[[rule]]
name = "a-to-b"
input = { interface = "a", group = "224.0.0.251", port = 5353 }
outputs = [ { interface = "b", group = "224.0.0.251", ttl = 255 } ]
[[rule]]
name = "b-to-a"
input = { interface = "b", group = "224.0.0.251", port = 5353 }
outputs = [ { interface = "a", group = "224.0.0.251", ttl = 255 } ]
"""


def test_a_two_way_pair_loads_and_is_guarded() -> None:
    loaded = parse_config(MDNS_PAIR, Path("m.toml"))
    assert loop_guarded(loaded.rules) == {
        RuleKey("a", "224.0.0.251", 5353, None),
        RuleKey("b", "224.0.0.251", 5353, None),
    }


def test_n_way_rules_are_guarded_and_a_feeder_outside_the_cycle_is_not() -> None:
    text = (
        r("a", "239.0.0.1", "b", "239.0.0.1")
        + r("b", "239.0.0.1", "c", "239.0.0.1")
        + r("c", "239.0.0.1", "a", "239.0.0.1")
        + r("x", "239.0.0.9", "a", "239.0.0.1")
    )
    guarded = loop_guarded(parse_config(text, Path("n.toml")).rules)
    assert {k.interface for k in guarded} == {"a", "b", "c"}


def test_the_guard_is_asked_for_or_turned_off_per_rule() -> None:
    one_way = rules(
        r("a", "239.0.0.1", "b", "239.0.0.1", "loop_guard = true\n") + r("c", "239.0.0.2", "d", "239.0.0.2")
    )
    assert loop_guarded(one_way) == {RuleKey("a", "239.0.0.1", 1, None)}


def test_destinations_follow_the_discovery_protocol_of_the_input() -> None:
    loaded = parse_config(MDNS_PAIR, Path("m.toml"))
    (dest,) = loaded.rules[0].destinations()
    assert (dest.source_port, dest.keep_source, dest.faithful) == ("keep", False, True)
    ssdp = rules(
        '[[rule]]\ninput = { interface = "a", group = "239.255.255.250", port = 1900 }\n'
        'outputs = [ { interface = "b", group = "239.255.255.250" },'
        ' { interface = "c", group = "239.255.255.250",'
        ' source_address = "interface", source_port = 1901 } ]\n'
    )
    kept, overridden = ssdp[0].destinations()
    assert (kept.source_port, kept.keep_source) == ("keep", True)
    assert (overridden.source_port, overridden.keep_source) == (1901, False)
    plain = rules(r("a", "239.0.0.1", "b", "239.0.0.2"))
    assert not plain[0].destinations()[0].faithful


@pytest.mark.parametrize(
    ("setting", "port", "keeps_port", "faithful"),
    [
        ("", "keep", True, False),  # the default: the sender's port, through UDP sockets
        (', source_port = "keep"', "keep", True, False),
        (', source_port = "ephemeral"', None, False, False),  # the output socket's own
        (", source_port = 7000", 7000, False, True),  # headers built per datagram
        (', source_port = "keep", ttl = "decrement"', "keep", False, True),
    ],
)
def test_an_output_keeps_the_senders_port_unless_told_otherwise(
    setting: str, port: object, keeps_port: bool, faithful: bool
) -> None:
    (rule,) = rules(
        '[[rule]]\ninput = { interface = "a", group = "239.0.0.1", port = 1 }\n'
        f'outputs = [ {{ interface = "b", group = "239.0.0.2"{setting} }} ]\n'
    )
    (dest,) = rule.destinations()
    assert (dest.source_port, dest.keeps_port, dest.faithful) == (port, keeps_port, faithful)
    assert ("source port ephemeral" in str(dest)) == (port is None)


REFLECT = """
[[reflect]]
name = "mdns"
interfaces = ["v10", "v20", "v30"]
group = "224.0.0.251"
port = 5353
ttl = 255
"""


def test_reflect_stands_for_one_rule_per_interface_to_all_the_others() -> None:
    loaded = parse_config(REFLECT, Path("r.toml"))
    assert [r.name for r in loaded.rules] == ["mdns:v10", "mdns:v20", "mdns:v30"]
    first = loaded.rules[0]
    assert first.key == RuleKey("v10", "224.0.0.251", 5353, None)
    assert [(d.interface, d.group, d.port, d.ttl, d.source_port) for d in first.destinations()] == [
        ("v20", "224.0.0.251", 5353, 255, "keep"),
        ("v30", "224.0.0.251", 5353, 255, "keep"),
    ]
    assert loop_guarded(loaded.rules) == {r.key for r in loaded.rules}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            REFLECT.replace('"v30"', '"v10"'),
            "r.toml:2: reflect 1: interface 'v10' is listed twice",
        ),
        (
            REFLECT.replace('["v10", "v20", "v30"]', '["v10"]'),
            "r.toml:4: reflect 1: interfaces: needs at least two interfaces",
        ),
        (
            REFLECT.replace("224.0.0.251", "192.0.2.1"),
            "r.toml:2: reflect 1: group 192.0.2.1 must be a multicast group or 255.255.255.255",
        ),
        (
            REFLECT.replace("ttl = 255", "tll = 255"),
            "r.toml:7: reflect 1: tll: unknown key (did you mean 'ttl'?)",
        ),
        (
            '[[rule]]\ninput = { interface = "v20", group = "224.0.0.251", port = 5353 }\n'
            'outputs = [ { interface = "v10", group = "224.0.0.251" } ]\n' + REFLECT,
            "r.toml:5: reflect 1 ('mdns') on v20: input v20 224.0.0.251:5353 is already used by rule 1",
        ),
    ],
    ids=["twice", "one-interface", "unicast", "unknown-key", "clash-with-a-rule"],
)
def test_reflect_mistakes_name_the_table(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("r.toml"))
    assert info.value.errors == [error]
