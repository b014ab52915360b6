"""swarm.transport.command_loop: the engine thread both GPU transports share, run without CUDA (a loop
started without a device does no CUDA work)."""

from __future__ import annotations

import logging
import threading

import pytest

from swarm.transport.command_loop import CommandLoop

log = logging.getLogger("test.command_loop")


class Recorder:
    def __init__(self, busy: bool = False) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, object]] = []
        self.steps = threading.Semaphore(0)
        self.busy = busy

    def note(self, what: str, value: object = None) -> None:
        with self.lock:
            self.seen.append((what, value))

    def step(self, now: float) -> bool:
        self.note("step", threading.current_thread().name)
        self.steps.release()
        return self.busy


def test_commands_run_in_order_on_the_loop_thread_then_a_step() -> None:
    rec = Recorder()
    loop = CommandLoop("test-loop", "test transport", log)
    gate = threading.Event()
    loop.post(gate.wait)  # hold the first round until every command below is queued
    for i in range(5):
        loop.post(lambda i=i: rec.note("cmd", (i, threading.current_thread().name)))
    loop.start(None, rec.step)
    loop.start(None, rec.step)  # once: a second start is ignored
    gate.set()
    assert rec.steps.acquire(timeout=10)
    loop.stop()
    cmds = [v for k, v in rec.seen if k == "cmd"]
    assert cmds == [(i, "test-loop") for i in range(5)]
    first_step = next(i for i, (k, _) in enumerate(rec.seen) if k == "step")
    assert first_step == 5 and rec.seen[first_step][1] == "test-loop"
    assert sum(1 for t in threading.enumerate() if t.name == "test-loop") == 0


def test_a_failing_command_or_step_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    calls = {"n": 0}

    def step(now: float) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("step broke")
        return rec.step(now)

    def broken() -> None:
        raise ValueError("command broke")

    loop = CommandLoop("test-loop-2", "test transport", log)
    loop.start(None, step)
    loop.post(broken)
    loop.post(lambda: rec.note("after"))
    assert rec.steps.acquire(timeout=10)
    deadline = threading.Event()
    while ("after", None) not in rec.seen and not deadline.wait(0.01):
        pass
    loop.stop()
    assert ("after", None) in rec.seen
    text = caplog.text
    assert "test transport command failed" in text and "test transport engine step failed" in text


def test_stop_runs_last_after_the_queued_commands_and_ends_the_thread() -> None:
    rec = Recorder(busy=True)
    loop = CommandLoop("test-loop-3", "test transport", log)
    loop.start(None, rec.step)
    loop.post(lambda: rec.note("queued"))

    def last() -> None:
        rec.note("last", threading.current_thread().name)
        raise RuntimeError("last broke")  # the thread ends anyway

    loop.stop(last, timeout=10)
    order = [k for k, _ in rec.seen if k != "step"]
    assert order == ["queued", "last"]
    assert ("last", "test-loop-3") in rec.seen
    assert not any(t.name == "test-loop-3" for t in threading.enumerate())
    loop.stop()  # stopping again, or a loop never started, is a no-op
    CommandLoop("never", "test transport", log).stop()
