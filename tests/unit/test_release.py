"""The version is the same in the package and in both changelogs."""

from __future__ import annotations

from pathlib import Path


def test_changelogs_agree_on_the_version() -> None:
    import re

    import mcrd

    root = Path(__file__).parents[2]
    debian = (root / "debian" / "changelog").read_text().splitlines()[0]
    assert debian.startswith(f"mcrd ({mcrd.__version__})")
    released = re.findall(r"^## \[(\d[^\]]*)\]", (root / "CHANGELOG.md").read_text(), re.M)
    assert released[0] == mcrd.__version__
