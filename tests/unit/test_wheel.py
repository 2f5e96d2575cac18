"""What the installed package holds: mcrd's modules, and none of the test,
demo or benchmark harness (lab/, tests/, bench/). The .deb is built by
pybuild from the same pyproject, so it follows.

Builds a wheel from a copy of the source tree (a stale build/ directory in the
checkout could otherwise leak old files into it): a few seconds, no network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).parent.parent.parent
LEFT_OUT = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def test_the_wheel_holds_mcrd_and_no_harness(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("mcrd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"mcrd"}, names
    modules = {name for name in names if name.startswith("mcrd/")}
    assert {"mcrd/daemon.py", "mcrd/ctl.py", "mcrd/worker.py", "mcrd/packet.py"} <= modules
    assert not {"mcrd/lab.py", "mcrd/demo.py"} & modules  # where the harness used to live
    assert {Path(n).stem for n in names if n.startswith("mcrd/") and n.endswith(".py")} >= {
        p.stem for p in (REPO / "mcrd").glob("*.py")
    }
