"""The swarm nodes of this process: kept alive (serving) until the process exits, then closed.

One registry per process. vLLM loads each worker rank in its own process, so a process usually holds one
node; a process that loads several models (or reloads one) holds several. `LAST_LOAD` records what the
last load of this process did (source, bytes, peers, reason): the tests and the logs read it.

Exit: `atexit` closes every node (withdraws its mDNS record with a goodbye, says goodbye to its peers).
vLLM's worker processes may be forked multiprocessing children, which leave through `os._exit` without
running atexit handlers; multiprocessing's own exit hook runs there, so a `Finalize` runs the same close.
Neither runs when the process is SIGKILLed (what vLLM does to its workers on Ctrl-C); for that case the
node's advert has a watcher process that sends the goodbye when its parent dies (swarm.discovery).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import threading
from typing import Any

log = logging.getLogger("vllm.swarm")

#: Nodes of this process, kept alive (serving) until exit.
NODES: list[Any] = []
_LOCK = threading.Lock()
#: What the last load_model in this process did (for tests and logs): source, bytes, peers, reason.
LAST_LOAD: dict[str, Any] = {}


def add(node: Any) -> None:
    with _LOCK:
        NODES.append(node)


def remove(node: Any) -> None:
    """Forget `node` and close it (its pieces are no longer served)."""
    with _LOCK:
        if node in NODES:
            NODES.remove(node)
    node.close()


def close_all() -> None:
    with _LOCK:
        nodes = list(NODES)
        NODES.clear()
    if nodes:
        log.info("swarm: process exit: closing %d node(s), withdrawing their mDNS records", len(nodes))
    for node in nodes:
        try:
            node.close()
        except Exception:  # exit path: report and go on closing the others
            log.exception("swarm: closing a node failed")


def status() -> list[dict[str, Any]]:
    """The status of every swarm node of this process."""
    with _LOCK:
        return [n.status() for n in NODES]


atexit.register(close_all)
multiprocessing.util.Finalize(None, close_all, exitpriority=100)
