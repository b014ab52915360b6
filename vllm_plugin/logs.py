"""The swarm engine's own log lines (loggers `swarm.*`) inside vLLM: through vLLM's handlers (its format
and stream), at VLLM_LOGGING_LEVEL, each line starting with `swarm: ` like the loader's own lines, so an
operator can grep one prefix. The engine itself knows nothing of vLLM; this is the adapter's side.

Limits: vLLM's handlers are used as they are when `route_swarm_logs` runs (the loader calls it when it
starts loading, after vLLM configured its logging); the records are copied, never changed in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

PREFIX = "swarm: "


class _Prefixed(logging.Handler):
    """Hands a `swarm: `-prefixed copy of each record to one of vLLM's handlers."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and not record.msg.startswith(PREFIX):
            record = logging.makeLogRecord({**record.__dict__, "msg": PREFIX + record.msg})
        self.target.handle(record)


def route_swarm_logs(
    handlers: Sequence[logging.Handler] | None = None, level: str | int | None = None
) -> list[logging.Handler]:
    """Send the `swarm` loggers' records to `handlers` (default: the `vllm` logger's) with the `swarm: `
    prefix, at `level` (default: the `vllm` logger's, which vLLM sets from VLLM_LOGGING_LEVEL).
    Idempotent; returns what it installed."""
    swarm_log = logging.getLogger("swarm")
    if any(isinstance(h, _Prefixed) for h in swarm_log.handlers):
        return []
    if handlers is None:
        handlers = logging.getLogger("vllm").handlers
    if level is None:
        # vLLM sets its logger's level from VLLM_LOGGING_LEVEL (or the user's logging config): follow it.
        level = logging.getLogger("vllm").getEffectiveLevel()
    installed: list[logging.Handler] = [_Prefixed(h) for h in handlers]
    for h in installed:
        swarm_log.addHandler(h)
    if installed:
        swarm_log.setLevel(level.upper() if isinstance(level, str) else level)
        swarm_log.propagate = False
    return installed
