"""Strict mode (MCRD_TEST_STRICT=1, set by CI): a skipped test is a failed one.

A test skips when it cannot run here (not root, a tool missing); in CI that
means the suite did not test what it claims, so the run must not pass. Loaded
as a plugin by tests/conftest.py, and by the test that proves it works.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

VARIABLE = "MCRD_TEST_STRICT"


def strict() -> bool:
    return os.environ.get(VARIABLE, "") not in ("", "0")


def _fail(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped, and {VARIABLE} is set, so a skip fails: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if strict() and report.skipped:  # pytest.skip(allow_module_level=True)
        _fail(report)


def pytest_report_header() -> str | None:
    return f"strict mode ({VARIABLE}): every skip fails" if strict() else None
