"""The man pages and the example rule file say of every setting what
mcrd.settings defines: its flag, its variable, and live or restart-only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mcrd.settings import DEFINITIONS, Definition

ROOT = Path(__file__).parents[2]
IN_FILE = [d for d in DEFINITIONS.values() if d.in_file]


def _roff(text: str) -> str:
    return text.replace("\\-", "-")


@pytest.mark.parametrize("d", list(DEFINITIONS.values()), ids=lambda d: d.name)
def test_mcrd_8_lists_every_flag_and_variable(d: Definition) -> None:
    page = _roff((ROOT / "man" / "mcrd.8").read_text())
    assert d.flag in page and d.env in page
    if d.in_file:
        when = "live" if d.live else "restart-only"
        assert f".B {d.env}\n.B {d.name}\n({when})" in page


@pytest.mark.parametrize("d", IN_FILE, ids=lambda d: d.name)
def test_mcr_toml_5_marks_every_key(d: Definition) -> None:
    page = _roff((ROOT / "man" / "mcr.toml.5").read_text())
    when = "live" if d.live else "restart-only"
    assert re.search(rf"^\\fB{d.name}\\fR = .* \\\(em \\fI{when}\\fR$", page, re.M), d.name
    assert d.flag in page


@pytest.mark.parametrize("d", IN_FILE, ids=lambda d: d.name)
def test_the_example_file_marks_every_key(d: Definition) -> None:
    text = (ROOT / "etc" / "mcr.toml").read_text()
    mark = "live" if d.live else "restart"
    assert re.search(rf"^(# )?{d.name} = .*  # \[{mark}\]$", text, re.M), d.name
