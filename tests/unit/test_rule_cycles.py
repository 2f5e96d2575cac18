"""Rules that feed each other in a cycle are refused, each cycle once."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcrd.config import parse_config


def test_separate_cycles_are_each_reported_once() -> None:
    from mcrd.config import ConfigError

    def r(i: str, g: str, o: str, og: str) -> str:
        return (
            f'[[rule]]\ninput = {{ interface = "{i}", group = "{g}", port = 1 }}\n'
            f'outputs = [ {{ interface = "{o}", group = "{og}" }} ]\n'
        )

    text = (
        r("a", "239.0.0.1", "b", "239.0.0.2")
        + r("b", "239.0.0.2", "a", "239.0.0.1")
        + r("c", "239.0.0.3", "d", "239.0.0.4")
        + r("d", "239.0.0.4", "e", "239.0.0.5")
        + r("e", "239.0.0.5", "c", "239.0.0.3")
        + r("x", "239.0.0.9", "a", "239.0.0.1")
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("c.toml"))
    assert info.value.errors == [
        "c.toml:1: rule 1: rules feed each other in a cycle: rule 1 -> rule 2 -> rule 1",
        "c.toml:7: rule 3: rules feed each other in a cycle: rule 3 -> rule 4 -> rule 5 -> rule 3",
    ]
