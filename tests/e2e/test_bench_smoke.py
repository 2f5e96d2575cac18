"""A short run of the benchmark harness, so that it cannot rot.

Not a speed test: it checks that every relay was measured and the table
printed. Speed is judged from full runs (docs/performance.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemon import needs_root

pytestmark = [needs_root, pytest.mark.netns]


def test_bench_quick_run_measures_every_relay() -> None:
    for tool in ("cc", "socat", "taskset", "nft", "ethtool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    bench = Path(__file__).parent.parent.parent / "bench" / "run.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("64 B x1"))
    medians = [float(m.replace(",", "")) for m in re.findall(r"([\d,]+) \(", row)]
    assert len(medians) == 4 and all(m > 0 for m in medians), row  # mcrd, mcrd offloaded, socat, kernel
    assert "under overload" in result.stdout and "mcrd-1000" in result.stdout


def test_bench_latency_mode_measures_every_relay() -> None:
    bench = Path(__file__).parent.parent.parent / "bench" / "run.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--latency", "--quick", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("1,000 ")]
    assert [r[1] for r in rows] == ["mcrd", "mcrd-bp", "mcrd-k", "socat", "kernel"], result.stdout
    for row in rows:
        p50, p99, through, sent = (
            float(row[2].replace(",", "")),
            float(row[3].replace(",", "")),
            row[5],
            row[7],
        )
        assert 0 < p50 <= p99, row
        assert through == sent == "500", row  # every datagram timed at both ends
