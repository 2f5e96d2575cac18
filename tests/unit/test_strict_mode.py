"""Strict mode (tests/helpers/strict.py): with MCRD_TEST_STRICT=1, as CI
sets it, a skipped test fails the run. Runs pytest on a small test file in a
child process, with and without the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent.parent

SKIPPING = """
import shutil

import pytest

needs_a_tool = pytest.mark.skipif(shutil.which("no-such-tool") is None, reason="no-such-tool is missing")


def test_runs() -> None:
    assert True


@needs_a_tool
def test_marked() -> None:
    pass


def test_skips_itself() -> None:
    pytest.skip("not here")


@pytest.fixture
def tool() -> None:
    pytest.skip("a fixture skips")


def test_with_a_fixture_that_skips(tool: None) -> None:
    pass
"""

SKIPPING_MODULE = """
import pytest

pytest.skip("not on this machine", allow_module_level=True)


def test_never_collected() -> None:
    pass
"""


def run_pytest(tmp_path: Path, strict: str | None, test: str = SKIPPING) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(test)
    env = {k: v for k, v in os.environ.items() if k != "MCRD_TEST_STRICT"}
    if strict is not None:
        env["MCRD_TEST_STRICT"] = strict
    env["PYTHONPATH"] = str(REPO)  # for -p tests.helpers.strict
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.helpers.strict",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-q",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )


def test_without_strict_mode_skips_pass(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 3 skipped" in result.stdout
    assert run_pytest(tmp_path, "0").returncode == 0
    assert "1 skipped" in run_pytest(tmp_path, None, SKIPPING_MODULE).stdout  # exit 5: nothing ran


def test_in_strict_mode_every_skip_fails(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "1")
    assert result.returncode == 1, result.stdout
    summary = result.stdout.splitlines()[-1]
    assert all(part in summary for part in ("1 failed", "1 passed", "2 errors")), result.stdout
    assert "skipped" not in summary, result.stdout
    assert "MCRD_TEST_STRICT is set, so a skip fails: no-such-tool is missing" in result.stdout
    assert "a skip fails: a fixture skips" in result.stdout


def test_in_strict_mode_a_module_that_skips_fails_collection(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "1", SKIPPING_MODULE)
    assert result.returncode not in (0, 5), result.stdout  # 5: no tests, which CI would fail anyway
    assert "a skip fails: not on this machine" in result.stdout


def test_ci_runs_the_readme_command_in_strict_mode() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "export MCRD_TEST_STRICT=1" in ci and "exec scripts/test" in ci
