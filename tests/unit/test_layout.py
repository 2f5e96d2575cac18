"""Architecture checks on the package: every module says what it is for, none
grows past 500 lines, mcrctl starts without asyncio, pydantic or pyroute2,
the pure modules import nothing that does I/O, and the worker starts cheap
(no pydantic). Imports are checked in fresh interpreters, since this test
process has imported everything already."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mcrd

PACKAGE = Path(mcrd.__file__).parent
ROOT = PACKAGE.parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 500


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )


def loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after importing `module`."""
    code = (
        f"import json, sys, {module}\nprint(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))\n"
    )
    found = json.loads(run_python("-c", code).stdout)
    assert isinstance(found, list)
    return [str(m) for m in found]


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_package_is_found() -> None:
    assert len(MODULES) > 20
    assert PACKAGE / "supervisor" / "ports.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=name_of)
def test_every_module_has_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(), str(path)))
    assert docstring, f"{name_of(path)} has no module docstring"


@pytest.mark.parametrize("path", MODULES, ids=name_of)
def test_no_module_is_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name_of(path)} has {lines} lines: split it by what each part owns"


def test_mcrctl_imports_no_asyncio_pydantic_or_pyroute2() -> None:
    stderr = run_python("-X", "importtime", "-c", "import mcrd.ctl").stderr
    imported = {
        line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")
    }
    assert "mcrd.ctl" in imported  # the report was read right
    heavy = sorted(m for m in imported if m.split(".")[0] in {"asyncio", "pydantic", "pyroute2"})
    assert heavy == []


PURE = [
    "mcrd.rules",
    "mcrd.plan",
    "mcrd.counters",
    "mcrd.supervisor.ports",
    "mcrd.bpf_classic",
    "mcrd.offload.plan",
    "mcrd.control.protocol",
]
# mcrd.supervisor.ports holds its lanes' asyncio.Event and Task (and importing
# it imports the mcrd.supervisor package, whose core runs the loop): it may
# import asyncio, though still not pyroute2.
MAY_IMPORT_ASYNCIO = {"mcrd.supervisor.ports"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_nothing_that_does_io(module: str) -> None:
    watched = ("pyroute2",) if module in MAY_IMPORT_ASYNCIO else ("asyncio", "pyroute2")
    assert loaded_after_import(module, watched) == []


def test_the_check_sees_what_a_module_imports() -> None:
    assert loaded_after_import("mcrd.supervisor.ports", ("asyncio",)) == ["asyncio"]
    assert loaded_after_import("mcrd.rules", ("pydantic", "asyncio")) == ["pydantic"]


def test_the_worker_starts_without_pydantic() -> None:
    assert loaded_after_import("mcrd.worker", ("pydantic", "asyncio", "pyroute2")) == []
