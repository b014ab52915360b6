"""Fault tests: members on loopback (and on a namespaced LAN for link faults); see harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Members


@pytest.fixture
def members(tmp_path: Path) -> Iterator[Members]:
    m = Members(tmp_path)
    try:
        yield m
    finally:
        m.close()
