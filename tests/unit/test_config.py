"""The rule file: a catalogue of mistakes, each with its exact error, and the
valid forms with their defaults. `mcrd --check` and a refused start are run
as real processes for every bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcrd.config import ConfigError, load_config
from mcrd.rules import Destination, RuleKey

GOOD_OUT = '{ interface = "eth1", group = "239.2.2.2", port = 6000 }'


def rule(
    inp: str = 'interface = "eth0", group = "239.1.1.1", port = 5000',
    outputs: str = GOOD_OUT,
    extra: str = "",
) -> str:
    return f"[[rule]]\n{extra}input = {{ {inp} }}\noutputs = [ {outputs} ]\n"


# (id, file text, the exact error lines for a file named bad.toml)
CATALOGUE: list[tuple[str, str | bytes, list[str]]] = [
    (
        "toml-syntax",
        "[[rule]\nname = 1\n",
        ["bad.toml:1:7: invalid TOML: Expected ']]' at the end of an array declaration"],
    ),
    (
        "toml-duplicate-key",
        rule(extra='name = "a"\nname = "b"\n'),
        ["bad.toml:3:11: invalid TOML: Cannot overwrite a value"],
    ),
    ("not-utf8", b'[[rule]]\nname = "\xff"\n', ["bad.toml:2: not valid UTF-8"]),
    (
        "rule-not-array",
        '[rule]\nname = "x"\n',
        ["bad.toml:1: rule: must be an array of tables: write [[rule]], not [rule]"],
    ),
    ("unknown-top-key", '[[rules]]\nname = "x"\n', ["bad.toml:1: rules: unknown key (did you mean 'rule'?)"]),
    (
        "unknown-rule-key",
        rule(extra='nmae = "x"\n'),
        ["bad.toml:2: rule 1: nmae: unknown key (did you mean 'name'?)"],
    ),
    (
        "unknown-input-key",
        rule('interface = "eth0", gruop = "239.1.1.1", group = "239.1.1.1", port = 5000'),
        ["bad.toml:2: rule 1: input.gruop: unknown key (did you mean 'group'?)"],
    ),
    (
        "unknown-output-key",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", tll = 4 }'),
        ["bad.toml:3: rule 1: outputs[0].tll: unknown key (did you mean 'ttl'?)"],
    ),
    (
        "unknown-daemon-key",
        '[daemon]\nlog_levle = "debug"\n',
        ["bad.toml:2: [daemon] log_levle: unknown key (did you mean 'log_level'?)"],
    ),
    (
        "bad-log-level",
        '[daemon]\nlog_level = "loud"\n',
        ["bad.toml:2: [daemon] log_level: must be one of 'debug', 'info', 'warning' or 'error', got 'loud'"],
    ),
    (
        "missing-input",
        '[[rule]]\nname = "cam"\noutputs = [ ' + GOOD_OUT + " ]\n",
        ["bad.toml:1: rule 1 ('cam'): input: missing required key"],
    ),
    (
        "missing-outputs",
        '[[rule]]\ninput = { interface = "eth0", group = "239.1.1.1", port = 5000 }\n',
        ["bad.toml:1: rule 1: outputs: missing required key"],
    ),
    ("empty-outputs", rule(outputs=""), ["bad.toml:3: rule 1: outputs: needs at least one output"]),
    (
        "missing-interface",
        rule('group = "239.1.1.1", port = 5000'),
        ["bad.toml:2: rule 1: input.interface: missing required key"],
    ),
    (
        "missing-port",
        rule('interface = "eth0", group = "239.1.1.1"'),
        ["bad.toml:2: rule 1: input.port: missing required key"],
    ),
    (
        "missing-output-group",
        rule(outputs='{ interface = "eth1", port = 6000 }'),
        ["bad.toml:3: rule 1: outputs[0].group: missing required key"],
    ),
    (
        "ifname-too-long",
        rule('interface = "eth0123456789abc", group = "239.1.1.1", port = 5000'),
        [
            "bad.toml:2: rule 1: input.interface: invalid interface name 'eth0123456789abc': "
            "1-15 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        ],
    ),
    (
        "ifname-leading-dash",
        rule(outputs='{ interface = "-eth1", group = "239.2.2.2" }'),
        [
            "bad.toml:3: rule 1: outputs[0].interface: invalid interface name '-eth1': "
            "1-15 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        ],
    ),
    (
        "ifname-slash",
        rule('interface = "eth0/1", group = "239.1.1.1", port = 5000'),
        [
            "bad.toml:2: rule 1: input.interface: invalid interface name 'eth0/1': "
            "1-15 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        ],
    ),
    (
        "port-zero",
        rule('interface = "eth0", group = "239.1.1.1", port = 0'),
        ["bad.toml:2: rule 1: input.port: must be from 1 to 65535, got 0"],
    ),
    (
        "port-too-big",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", port = 65536 }'),
        ["bad.toml:3: rule 1: outputs[0].port: must be from 1 to 65535, got 65536"],
    ),
    (
        "port-string",
        rule('interface = "eth0", group = "239.1.1.1", port = "5000"'),
        ["bad.toml:2: rule 1: input.port: must be an integer, got a string '5000'"],
    ),
    (
        "port-float",
        rule('interface = "eth0", group = "239.1.1.1", port = 5000.0'),
        ["bad.toml:2: rule 1: input.port: must be an integer, got a float 5000.0"],
    ),
    (
        "address-short",
        rule('interface = "eth0", group = "239.1.1", port = 5000'),
        ["bad.toml:2: rule 1: input.group: '239.1.1' is not a valid IPv4 address"],
    ),
    (
        "address-octet",
        rule(outputs='{ interface = "eth1", group = "239.2.2.256" }'),
        ["bad.toml:3: rule 1: outputs[0].group: '239.2.2.256' is not a valid IPv4 address"],
    ),
    (
        "address-not-string",
        rule('interface = "eth0", group = 239, port = 5000'),
        ["bad.toml:2: rule 1: input.group: must be a string, got an integer 239"],
    ),
    (
        "output-any",
        rule(outputs='{ interface = "eth1", group = "0.0.0.0" }'),
        ["bad.toml:3: rule 1: outputs[0].group: 0.0.0.0 cannot be an output destination"],
    ),
    (
        "output-broadcast-without-interface",
        rule(outputs='{ group = "255.255.255.255", port = 9 }'),
        ["bad.toml:1: rule 1: outputs[0]: a broadcast to 255.255.255.255 needs an 'interface' to leave on"],
    ),
    (
        "output-any",
        rule(outputs='{ interface = "eth1", group = "0.0.0.0" }'),
        ["bad.toml:3: rule 1: outputs[0].group: 0.0.0.0 cannot be an output destination"],
    ),
    (
        "output-source-port",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", source_port = "sender" }'),
        [
            'bad.toml:3: rule 1: outputs[0].source_port: must be "keep", "ephemeral" '
            "or a port number from 1 to 65535, got 'sender'",
        ],
    ),
    (
        "dscp-range",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", dscp = 64 }'),
        ["bad.toml:3: rule 1: outputs[0].dscp: must be from 0 to 63, got 64"],
    ),
    (
        "ttl-word",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", ttl = "decrease" }'),
        ["bad.toml:3: rule 1: outputs[0].ttl: must be from 1 to 255 or \"decrement\", got 'decrease'"],
    ),
    (
        "output-source-port-zero",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", source_port = 0 }'),
        ["bad.toml:3: rule 1: outputs[0].source_port: must be from 1 to 65535, got 0"],
    ),
    (
        "output-source-address",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", source_address = "relay" }'),
        [
            "bad.toml:3: rule 1: outputs[0].source_address: "
            "must be one of 'interface' or 'sender', got 'relay'",
        ],
    ),
    (
        "output-loopback",
        rule(outputs='{ group = "127.0.0.1", port = 9 }'),
        ["bad.toml:3: rule 1: outputs[0].group: 127.0.0.1 is a loopback address: it never leaves the host"],
    ),
    (
        "input-any",
        rule('interface = "eth0", group = "0.0.0.0", port = 5000'),
        ["bad.toml:2: rule 1: input.group: 0.0.0.0 cannot be an input address"],
    ),
    (
        "source-multicast",
        rule('interface = "eth0", group = "239.1.1.1", port = 5000, source = "239.9.9.9"'),
        [
            "bad.toml:2: rule 1: input.source: 239.9.9.9 cannot be a sender address: "
            "it must be a unicast address"
        ],
    ),
    (
        "ttl-zero",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", ttl = 0 }'),
        ["bad.toml:3: rule 1: outputs[0].ttl: must be from 1 to 255, got 0"],
    ),
    (
        "ttl-too-big",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", ttl = 256 }'),
        ["bad.toml:3: rule 1: outputs[0].ttl: must be from 1 to 255, got 256"],
    ),
    (
        "ttl-bool",
        rule(outputs='{ interface = "eth1", group = "239.2.2.2", ttl = true }'),
        ['bad.toml:3: rule 1: outputs[0].ttl: must be from 1 to 255 or "decrement", got True'],
    ),
    ("name-empty", rule(extra='name = ""\n'), ["bad.toml:2: rule 1: name: must not be empty"]),
    (
        "rate-limit-empty",
        rule(extra="rate_limit = {}\n"),
        ["bad.toml:2: rule 1: rate_limit: give pps, bps or both"],
    ),
    (
        "rate-limit-zero",
        rule(extra="rate_limit = { pps = 0 }\n"),
        ["bad.toml:2: rule 1: rate_limit.pps: must be at least 1 datagrams per second, got 0"],
    ),
    (
        "rate-limit-unknown",
        rule(extra="rate_limit = { mbps = 10 }\n"),
        ["bad.toml:2: rule 1: rate_limit.mbps: unknown key (did you mean 'bps'?)"],
    ),
    (
        "input-not-table",
        '[[rule]]\ninput = "eth0"\noutputs = [ ' + GOOD_OUT + " ]\n",
        ["bad.toml:2: rule 1: input: must be a table, got a string 'eth0'"],
    ),
    (
        "outputs-not-array",
        '[[rule]]\ninput = { interface = "eth0", group = "239.1.1.1", port = 5000 }\n'
        'outputs = { interface = "eth1", group = "239.2.2.2" }\n',
        ["bad.toml:3: rule 1: outputs: must be an array, got a table"],
    ),
    (
        "multicast-output-without-interface",
        rule(outputs='{ group = "239.2.2.2" }'),
        ["bad.toml:1: rule 1: outputs[0]: a multicast output needs an 'interface'"],
    ),
    (
        "output-is-own-input",
        rule(outputs='{ interface = "eth0", group = "239.1.1.1" }'),
        ["bad.toml:1: rule 1: outputs[0]: output 239.1.1.1:5000 on eth0 is its own input"],
    ),
    (
        "duplicate-output",
        rule(outputs=GOOD_OUT + ", " + GOOD_OUT),
        ["bad.toml:1: rule 1: outputs[1]: same destination as outputs[0]"],
    ),
    (
        "duplicate-input",
        rule(extra='name = "a"\n') + rule(extra='name = "b"\n'),
        ["bad.toml:5: rule 2 ('b'): input eth0 239.1.1.1:5000 is already used by rule 1 ('a')"],
    ),
    (
        "duplicate-name",
        rule(extra='name = "cam"\n')
        + rule('interface = "eth0", group = "239.1.1.2", port = 5000', extra='name = "cam"\n'),
        ["bad.toml:5: rule 2 ('cam'): name 'cam' is already used by rule 1 ('cam')"],
    ),
    (
        "cycle-without-guard",
        rule(
            'interface = "eth0", group = "239.1.1.1", port = 5000',
            '{ interface = "eth1", group = "239.2.2.2" }',
        )
        + rule(
            'interface = "eth1", group = "239.2.2.2", port = 5000',
            '{ interface = "eth0", group = "239.1.1.1" }',
            extra="loop_guard = false\n",
        ),
        [
            "bad.toml:1: rule 1: rules feed each other in a cycle and rule 2 turns the loop guard off "
            "(loop_guard = false): rule 1 -> rule 2 -> rule 1"
        ],
    ),
    (
        "cycle-through-loopback",
        rule('interface = "a", group = "239.0.0.1", port = 1', '{ interface = "lo", group = "239.0.0.2" }')
        + rule('interface = "lo", group = "239.0.0.2", port = 1', '{ interface = "a", group = "239.0.0.1" }'),
        [
            "bad.toml:1: rule 1: rules feed each other in a cycle through lo, where mcrd hears its own "
            "output: rule 1 -> rule 2 -> rule 1"
        ],
    ),
    (
        "several-at-once",
        rule('interface = "eth0", group = "239.1.1.1", port = 0')
        + rule(outputs='{ interface = "eth1", group = "239.2.2.2", ttl = 300 }'),
        [
            "bad.toml:2: rule 1: input.port: must be from 1 to 65535, got 0",
            "bad.toml:6: rule 2: outputs[0].ttl: must be from 1 to 255, got 300",
        ],
    ),
]


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "bad.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in CATALOGUE], ids=[i for i, _, _ in CATALOGUE]
)
def test_catalogue_of_mistakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | bytes, expected: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Path("bad.toml"))
    assert info.value.errors == expected


def test_catalogue_is_large_enough() -> None:
    assert len(CATALOGUE) >= 25


def test_defaults_and_destinations(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        rule(
            'interface = "eth0", group = "239.1.1.1", port = 5000, source = "192.0.2.10"',
            '{ interface = "eth1", group = "239.2.2.2" }, { group = "198.51.100.7", ttl = 9 }, '
            '{ interface = "eth2", group = "203.0.113.9", port = 7 }',
        )
    )
    (spec,) = load_config(path).rules
    assert spec.key == RuleKey("eth0", "239.1.1.1", 5000, "192.0.2.10")
    assert spec.display_name() == "eth0 239.1.1.1:5000 from 192.0.2.10"
    assert spec.destinations() == [
        Destination("239.2.2.2", 5000, "eth1", 1),
        Destination("198.51.100.7", 5000, None, 9),
        Destination("203.0.113.9", 7, "eth2", 64),
    ]


def test_a_chain_that_is_not_a_cycle_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        rule('interface = "a", group = "239.0.0.1", port = 1', '{ interface = "b", group = "239.0.0.2" }')
        + rule('interface = "b", group = "239.0.0.2", port = 1', '{ interface = "c", group = "239.0.0.3" }')
    )
    assert len(load_config(path).rules) == 2


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("# nothing yet\n")
    assert load_config(tmp_path / "empty.toml").rules == []
    loaded = load_config(tmp_path / "missing.toml", missing_ok=True)
    assert loaded.missing and loaded.rules == []
