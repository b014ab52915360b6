"""A watcher process that withdraws a node's mDNS advert when the node's process dies without closing it.

Why: vLLM stops its worker processes with SIGKILL (on Ctrl-C of `vllm serve`, for one), and a SIGKILLed
process runs no exit handler, so its advert would stay in every browser's view until its records expire
(60 s). The watcher is a small child process (`python -m swarm.goodbye`) started by `Advertiser.start()`
when asked (`Advertiser(..., watch_exit=True)`, which `Node` does). It holds the advert's records and
waits on two things at once: its stdin pipe from the parent, and a pidfd of the parent (Linux >= 5.3).
When the parent dies, however it dies, the pidfd becomes readable; the watcher then sends the goodbye
records (TTL 0) on the advert's interfaces, so browsers drop the member within about a second, and exits.
When the parent closes the advert itself, it says `close` on the pipe and the watcher exits at once, with
no goodbye of its own.

The watcher runs in its own session (setsid), so a signal to the parent's process group (Ctrl-C, a test
harness killing a group) does not kill it before it can say goodbye; it never outlives its parent by more
than the goodbye (bounded by `timeout`), and the parent waits for it (bounded) when it closes normally.

Limits: Linux only (pidfd); elsewhere `start` returns None and the advert expires with its TTL. Costs one
Python process per advertised node (13 MB RSS while it waits, measured here). A SIGKILL of the watcher
itself (and of its parent) leaves the old behaviour: the records expire with their TTL.

Wire (parent -> watcher, one JSON object per line): first the advert `{"bind": [...], "info": {...},
"timeout": s}`, then `{"info": {...}}` on each update, then `"close"`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

#: How long `Watcher.close` waits for the watcher to exit before killing it.
_CLOSE_WAIT_S = 5.0


class Watcher:
    """The parent's handle on a watcher process (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    def start(cls, bind: list[str] | None, info: Mapping[str, Any], timeout: float) -> Watcher | None:
        if not hasattr(os, "pidfd_open") or not sys.platform.startswith("linux"):
            return None
        env = dict(os.environ)
        # the watcher imports this very package, wherever it was imported from
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.goodbye", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        watcher = cls(proc)
        watcher._send({"bind": bind, "info": dict(info), "timeout": timeout})
        return watcher

    def update(self, info: Mapping[str, Any]) -> None:
        self._send({"info": dict(info)})

    def close(self) -> None:
        """The parent withdrew the advert itself: end the watcher without a goodbye (bounded)."""
        self._send("close")
        with self._lock:
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
        try:
            self._proc.wait(_CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(_CLOSE_WAIT_S)

    def _send(self, msg: object) -> None:
        with self._lock:
            stdin = self._proc.stdin
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(json.dumps(msg).encode() + b"\n")
                stdin.flush()
            except OSError:  # the watcher is gone: nothing to tell it
                pass


class _Lines:
    """JSON lines from a raw fd (no buffering that select() would not see), at most 64 KiB a line."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, b"", False

    def read(self) -> list[Any]:
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > 1 << 16:
            self.buf = b""
        return [json.loads(line) for line in lines if line.strip()]


def _goodbye(bind: list[str] | None, info: Mapping[str, Any], timeout: float) -> None:
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    from swarm.discovery import _run_on_loop, _withdraw, service_info

    zc = Zeroconf(
        interfaces=bind if bind else InterfaceChoice.All, ip_version=IPVersion.V4Only, use_asyncio=False
    )
    try:
        _run_on_loop(zc, _withdraw(zc, service_info(dict(info))), timeout, "mDNS goodbye")
    finally:
        zc.close()


def main(argv: list[str]) -> int:
    # Signals to the parent's group must not stop the goodbye: only the parent's death or "close" do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = int(argv[1])
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:  # the parent is already gone; its advert has not been told to us yet
        return 0
    lines = _Lines(sys.stdin.fileno())
    bind: list[str] | None = None
    info: dict[str, Any] | None = None
    timeout = 5.0
    while True:
        fds = [pidfd] if lines.eof else [pidfd, lines.fd]
        ready, _, _ = select.select(fds, [], [])
        if lines.fd in ready:  # before the pidfd: a "close" sent just before the parent's exit wins
            for msg in lines.read():
                if msg == "close":
                    return 0
                if isinstance(msg, dict) and isinstance(msg.get("info"), dict):
                    info = msg["info"]
                    if "bind" in msg:
                        bind, timeout = msg["bind"], float(msg.get("timeout", timeout))
            # a closed pipe without "close" (the parent is exiting): wait for its exit on the pidfd
            continue
        if pidfd in ready:
            if info is not None:
                _goodbye(bind, info, timeout)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
