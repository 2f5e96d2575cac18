"""Shared fixtures: throwaway namespace networks, and the mcrd processes a
test starts (stopped after it). Helpers to import are in tests/helpers/;
strict mode (a skip fails) is tests/helpers/strict.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.net import Lab
from tests.helpers.daemon import Daemon, Net

pytest_plugins = ["tests.helpers.strict"]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab("mcrt") as built:
        yield built


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture
def net(lab: Lab) -> Net:
    src, relay, dst1, dst2 = (lab.netns(r) for r in ("src", "relay", "dst1", "dst2"))
    lab.link(src, "eth0", relay, "in0", "192.0.2.10/24", "192.0.2.1/24")
    lab.link(relay, "out0", dst1, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    lab.link(relay, "out1", dst2, "eth0", "203.0.113.1/25", "203.0.113.2/25")
    return Net(lab, src, relay, dst1, dst2)
