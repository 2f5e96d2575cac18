"""`mcrd --check` and a refused start, run as processes: the same loader as
a reload, the same messages, exit 78 (EX_CONFIG) and nothing touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_config import CATALOGUE, _write


def _mcrd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcrd.daemon", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in CATALOGUE], ids=[i for i, _, _ in CATALOGUE]
)
def test_mcrd_check_and_start_refuse_each_mistake(
    tmp_path: Path, text: str | bytes, expected: list[str]
) -> None:
    _write(tmp_path, text)
    check = _mcrd(tmp_path, "--check", "--config", "bad.toml")
    assert check.returncode == 78
    assert check.stderr.splitlines() == expected
    start = _mcrd(tmp_path, "--config", "bad.toml", "--control-socket", str(tmp_path / "c.sock"))
    assert start.returncode == 78
    assert start.stderr.splitlines() == [*expected, "mcrd: refusing to start: bad.toml is invalid"]
    assert not (tmp_path / "c.sock").exists()


def test_check_accepts_the_shipped_example(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "etc" / "mcr.toml"
    result = _mcrd(tmp_path, "--check", "--config", str(example))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{example}: OK, 6 rule(s)\n"


def test_check_of_a_missing_file_fails(tmp_path: Path) -> None:
    result = _mcrd(tmp_path, "--check", "--config", "nope.toml")
    assert result.returncode == 78
    assert result.stderr == "nope.toml: no such file\n"
