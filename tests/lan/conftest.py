"""Fixtures for tests on a namespaced LAN (see netns.py). Tests here get the ``lan`` marker."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import netns  # noqa: E402

REPO_ROOT = _HERE.parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.lan)


@pytest.fixture
def make_lan() -> Iterator[Callable[..., netns.Lan]]:
    """Factory of namespaced LANs (``make_lan(3, rate_mbit=100)``); all removed after the test.

    Skips the test, with the reason, where namespaces cannot be created (not root, no iproute2, ...).
    """
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"namespaced LAN unavailable: {reason}")
    lans: list[netns.Lan] = []

    def factory(n_hosts: int, **kwargs: Any) -> netns.Lan:
        lan = netns.Lan(n_hosts, **kwargs)
        lans.append(lan)
        return lan

    try:
        yield factory
    finally:
        for lan in reversed(lans):
            lan.close()


@pytest.fixture
def lan3(make_lan: Callable[..., netns.Lan]) -> netns.Lan:
    """Three hosts on one bridge, unshaped."""
    return make_lan(3)
