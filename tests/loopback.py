"""Loopback ports and polling, for tests and benches that run swarm members on this machine.

Limits: a port from `free_port` is free when it is returned, not reserved; a process that binds it a
moment later can lose a race with another process on the machine (rare on a test machine).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> float:
    """Poll until `predicate()` is true; returns when (monotonic). Fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(step)
