"""The engine thread of a GPU transport: one thread that runs the commands the node's calls enqueue, then
one step of the transport's own work, again and again.

Both GPU transports (swarm.transport.nccl_engine, swarm.transport.ipc) own their CUDA streams, events and
communicators from this one thread, so none of them needs a lock; the node's calls only `post` a
command. While the last step said work is under way (set-up, queued or in-flight pieces) the thread
polls every `BUSY_POLL_S`; otherwise it sleeps until a command arrives, at most `IDLE_WAIT_S`.

Limits: a command or step that raises is logged and the loop goes on (a transport reports its own
failures through its events); `stop` ends the thread within its timeout unless a command or step
blocks longer, which is then logged and the thread left behind (it is a daemon).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from swarm import capture

#: How often the thread looks for finished work while any is under way (0.2 ms: a GPU copy of a 64 MiB
#: piece takes about that long on an H200).
BUSY_POLL_S = 0.0002
#: The longest the thread sleeps with nothing under way (a command wakes it at once).
IDLE_WAIT_S = 0.05


class CommandLoop:
    """One engine thread: `post` commands from any thread; `start` runs them and `step` on the thread."""

    def __init__(self, name: str, what: str, log: logging.Logger) -> None:
        """`name`: the thread's name; `what`: the transport, for log lines; `log`: its logger."""
        self.name = name
        self.what = what
        self.log = log
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def post(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)

    def start(self, device: torch.device | None, step: Callable[[float], bool]) -> None:
        """Start the thread (once) on CUDA device `device` (None: a thread that does no CUDA work).
        `step(now)` runs after each round of commands and returns whether work is under way."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(device, step), name=self.name, daemon=True
            )
            self._thread.start()

    def stop(self, last: Callable[[], None] | None = None, timeout: float = 10.0) -> None:
        """Run `last` on the thread after the commands already posted, then end the thread; wait for it
        at most `timeout` seconds. A loop that was never started, or was stopped, is left as it is."""
        thread = self._thread
        if thread is not None:

            def finish() -> None:
                try:
                    if last is not None:
                        last()
                finally:
                    self._stop.set()

            self.post(finish)
            thread.join(timeout=timeout)
            if thread.is_alive():
                self.log.warning("%s engine did not stop within %.0f s", self.what, timeout)
        self._thread = None

    def _run(self, device: torch.device | None, step: Callable[[float], bool]) -> None:
        if device is not None:
            capture.relax(device)  # never disturb a CUDA graph capture of the process we serve from
        busy = False
        while not self._stop.is_set():
            try:
                cmd: Callable[[], None] | None = self._commands.get(
                    timeout=BUSY_POLL_S if busy else IDLE_WAIT_S
                )
            except queue.Empty:
                cmd = None
            try:
                while cmd is not None:
                    cmd()
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                pass
            except Exception:
                self.log.exception("%s command failed", self.what)
            try:
                busy = step(time.monotonic())
            except Exception:
                self.log.exception("%s engine step failed", self.what)
                busy = True
