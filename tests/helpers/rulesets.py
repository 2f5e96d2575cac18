"""Small rule files the reload and planning tests share, and `rules()` to
turn rule-file text into rule specs without a file."""

from __future__ import annotations

from pathlib import Path

from mcrd.config import parse_config
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
