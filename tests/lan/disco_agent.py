"""Discovery agent for the LAN and loopback tests: advertise one node, browse, report JSON lines.

Run as ``python -u disco_agent.py --id ID --key KEY [--interface IF] ...``. Prints one JSON object per
line on stdout: ``{"event": "started", "advert": {...}}``, then ``{"event": "peers", "peers": [...]}``
whenever the browser's view changes (its own advert included), ``{"event": "updated"|"withdrawn"}``
after commands, ``{"event": "closed"}`` at the end. Commands on stdin, one per line: ``role <role>``,
``withdraw`` (close the advertiser, keep browsing), ``quit`` (or end of input).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from typing import Any

from swarm.discovery import Advert, Advertiser, Browser

_lock = threading.Lock()


def emit(**msg: Any) -> None:
    with _lock:
        print(json.dumps(msg), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="test/model")
    parser.add_argument("--rank", default="tp0/1,pp0/1")
    parser.add_argument("--role", default="leecher")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--interface", default=None)
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--ttl", type=int, default=60)
    parser.add_argument("--watch-exit", action="store_true", help="a watcher process says goodbye on SIGKILL")
    args = parser.parse_args()

    advert = Advert(args.id, args.key, args.model, args.rank, args.role, args.port)
    stop = threading.Event()
    with Browser(key_digest=args.key, interface=args.interface) as browser:

        def watch() -> None:
            seen = -1
            while not stop.wait(0.05):
                generation = browser.generation
                if generation != seen:
                    seen = generation
                    emit(event="peers", peers=[dataclasses.asdict(a) for a in browser.peers()])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            with Advertiser(
                advert,
                interface=args.interface,
                probe=not args.no_probe,
                ttl=args.ttl,
                watch_exit=args.watch_exit,
            ) as adv:
                emit(event="started", advert=dataclasses.asdict(adv.advert))
                for line in sys.stdin:
                    words = line.split()
                    if not words:
                        continue
                    if words[0] == "role":
                        emit(event="updated", advert=dataclasses.asdict(adv.update(role=words[1])))
                    elif words[0] == "withdraw":
                        adv.close()
                        emit(event="withdrawn")
                    elif words[0] == "quit":
                        break
                    else:
                        emit(event="error", message=f"unknown command {line.strip()!r}")
        finally:
            stop.set()
            watcher.join(2)
    emit(event="closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
