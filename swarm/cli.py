"""`swarm`: the command line.

- `swarm status`: every swarm member on the LAN (mDNS, plus SWARM_PEERS / --peers), asked over the
  control plane for its status, shown as one table (`--json` for scripts, `--watch` for a live view).
  Exits 1 when no member answers, saying what to check.
- `swarm seed --synthetic SIZE` / `swarm fetch --synthetic SIZE`: a standalone member without vLLM
  holding a synthetic model (swarm.synthetic) of SIZE bytes, for demos, tests and benchmarks. `fetch`
  shows a progress bar, verifies the result, and keeps seeding unless `--exit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import zmq

from swarm import protocol as P
from swarm.errors import SwarmError

STATUS_COLUMNS = [
    ("instance", "instance"),
    ("host", "host"),
    ("model", "model"),
    ("rank", "rank/layout"),
    ("role", "role"),
    ("progress", "progress"),
    ("pieces", "pieces"),
    ("up_Bps", "up"),
    ("down_Bps", "down"),
    ("peers", "peers"),
    ("paths", "paths (peer: data path)"),
    ("uptime_s", "uptime"),
]


def query_status(host: str, port: int, *, token: str | None, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """Ask one node for its status over the control plane; None if it does not answer in time."""
    from swarm.identity import Identity

    session = P.Session(P.Codec(token), Identity(), dialer=True)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME + 1024)
    try:
        addr = f"[{host}]" if ":" in host else host
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(f"tcp://{addr}:{port}")
        sock.send(session.open())
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000)):
                break
            try:
                msg, answer = session.receive(sock.recv())
            except SwarmError:
                return None
            if answer is not None:  # the session is up: ask
                sock.send(answer)
                sock.send(session.encode(P.StatusQuery()))
            elif isinstance(msg, P.StatusReply):
                return msg.status
            elif isinstance(msg, P.Error):
                return None
        return None
    finally:
        sock.close(0)


def collect_status(
    *, peers: str | None, interface: str | None, mdns: bool, browse_s: float, token: str | None
) -> list[dict[str, Any]]:
    from swarm import discovery

    found = discovery.discover(None, timeout=browse_s, interface=interface, static=peers, mdns=mdns)
    rows: dict[str, dict[str, Any]] = {}
    threads = []
    lock = threading.Lock()

    def ask(ad: Any) -> None:
        host = ad.host or discovery.pick_host(list(ad.addresses))
        st = query_status(host, ad.control_port, token=token)
        if st is not None:
            st.setdefault("host", host)
            with lock:
                rows[str(st.get("instance", f"{host}:{ad.control_port}"))] = st

    for ad in found:
        t = threading.Thread(target=ask, args=(ad,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(5.0)
    return sorted(
        rows.values(), key=lambda r: (str(r.get("model")), str(r.get("rank")), str(r.get("instance")))
    )


def _fmt(key: str, value: Any) -> str:
    if key == "progress":
        return f"{float(value) * 100:.0f}%"
    if key.endswith("_Bps"):
        return _rate(float(value))
    if key == "pieces" and isinstance(value, int):
        return str(value)
    if key == "paths" and isinstance(value, dict):
        return ", ".join(f"{str(peer)[:6]}: {path}" for peer, path in sorted(value.items())) or "-"
    if key == "uptime_s":
        s = int(value)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    return str(value)


def _rate(bps: float) -> str:
    for unit, div in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.1f} {unit}"
    return f"{bps:.0f} B/s"


def render_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"vllm-swarm: {len(rows)} member(s)")
    for _, title in STATUS_COLUMNS:
        table.add_column(title)
    for r in rows:
        cells = []
        for key, _ in STATUS_COLUMNS:
            if key == "pieces":
                cells.append(f"{r.get('pieces', '?')}/{r.get('pieces_total', '?')}")
            elif key == "host":
                cells.append(f"{r.get('host', '?')}:{r.get('port', '?')}")
            else:
                cells.append(_fmt(key, r.get(key, "")))
        table.add_row(*cells)
    return table


NOTHING_FOUND = (
    "no swarm member answered. Check that: instances run with --load-format swarm (or `swarm seed`); "
    "multicast (mDNS, UDP 5353) reaches this host, or pass --peers host:port (SWARM_PEERS); "
    "--interface (SWARM_INTERFACE) names the interface the swarm uses; SWARM_TOKEN matches the swarm's."
)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    # Not a terminal (a pipe, a log): a wide table rather than one folded to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)

    def fetch() -> list[dict[str, Any]]:
        return collect_status(
            peers=args.peers,
            interface=args.interface,
            mdns=not args.no_mdns,
            browse_s=args.timeout,
            token=args.token,
        )

    if args.watch:
        with Live(render_table([]), console=console, refresh_per_second=2) as live:
            try:
                while True:
                    live.update(render_table(fetch()))
                    time.sleep(args.interval)
            except KeyboardInterrupt:
                return 0
    rows = fetch()
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif rows:
        console.print(render_table(rows))
    if not rows:
        print(NOTHING_FOUND, file=sys.stderr)
        return 1
    return 0


def _node_config(args: argparse.Namespace) -> Any:
    from swarm.node import NodeConfig, parse_size

    return NodeConfig.from_env(
        token=args.token,
        peers=args.peers,
        interface=args.interface,
        host=args.host,
        control_port=args.port,
        mdns=False if args.no_mdns else None,
        piece_size=parse_size(args.piece_size) if args.piece_size else None,
        discovery_timeout_s=args.discovery_timeout,
        stall_timeout_s=args.stall_timeout,
        rate_cap=parse_size(args.rate_cap) if args.rate_cap else None,
        model_name="synthetic",
    )


def _wait_for_signal(node: Any, duration: float | None) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(duration)


def cmd_seed(args: argparse.Namespace) -> int:
    from swarm.node import Node, parse_size
    from swarm.synthetic import synthetic_key, synthetic_tensors

    size = parse_size(args.synthetic)
    tensors = synthetic_tensors(size)
    with Node(synthetic_key(size), tensors, _node_config(args), complete=True) as node:
        print(
            f"seeding synthetic model of {size / 1e6:.0f} MB as {node.id} on {node.host}:{node.control_port}",
            flush=True,
        )
        _wait_for_signal(node, args.duration)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from swarm.node import Node, parse_size
    from swarm.synthetic import synthetic_key, synthetic_tensors

    size = parse_size(args.synthetic)
    tensors = synthetic_tensors(size, fill=False)
    config = _node_config(args)
    with Node(synthetic_key(size), tensors, config, complete=False) as node:
        with Progress(
            TextColumn(f"[bold]{node.id}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            disable=args.quiet,
        ) as bar:
            task = bar.add_task("fetch", total=node.manifest.total_bytes)
            try:
                report = node.fetch(progress=lambda done, total: bar.update(task, completed=done))
            except SwarmError as e:
                print(f"fetch failed: {e}", file=sys.stderr)
                return 1
        print(f"{node.id}: {report.describe()}", flush=True)
        if args.verify:
            expected = synthetic_tensors(size)
            same = all(
                torch.equal(expected[k].view(torch.int16), t.view(torch.int16)) for k, t in tensors.items()
            )
            print(
                f"{node.id}: verified: {'identical to the synthetic model' if same else 'MISMATCH'}",
                flush=True,
            )
            if not same:
                return 1
        if not args.exit:
            _wait_for_signal(node, args.duration)
    return 0


def _member_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthetic", required=True, metavar="SIZE", help="synthetic model size, e.g. 512MB")
    p.add_argument("--piece-size", default=None, help="piece size (default 64MiB or SWARM_PIECE_SIZE)")
    p.add_argument("--host", default=None, help="address to bind (default all; SWARM_HOST)")
    p.add_argument("--port", type=int, default=None, help="control port (default random; SWARM_PORT)")
    p.add_argument("--discovery-timeout", type=float, default=None, help="seconds to find a seed")
    p.add_argument(
        "--stall-timeout", type=float, default=None, help="seconds without progress before failing"
    )
    p.add_argument("--rate-cap", default=None, help="cap on upload rate, e.g. 100MB (per second)")
    p.add_argument("--duration", type=float, default=None, help="serve this many seconds, then exit")


def _discovery_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", default=None, help="static peers host:port,... (SWARM_PEERS)")
    p.add_argument("--interface", default=None, help="network interface or address (SWARM_INTERFACE)")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS (static peers only)")
    p.add_argument("--token", default=None, help="cluster token (default SWARM_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="vllm-swarm: BitTorrent-style weight distribution between inference instances.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    st = sub.add_parser("status", help="show every swarm member on the LAN")
    _discovery_options(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--watch", action="store_true", help="refresh continuously")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    st.add_argument("--timeout", type=float, default=2.0, help="seconds to browse mDNS")
    st.set_defaults(func=cmd_status)

    seed = sub.add_parser("seed", help="serve a synthetic model (no vLLM needed)")
    _member_options(seed)
    _discovery_options(seed)
    seed.set_defaults(func=cmd_seed)

    fetch = sub.add_parser("fetch", help="fetch a synthetic model from the swarm, then seed it")
    _member_options(fetch)
    _discovery_options(fetch)
    fetch.add_argument("--exit", action="store_true", help="exit once fetched instead of seeding")
    fetch.add_argument("--no-verify", dest="verify", action="store_false", help="skip the final comparison")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except SwarmError as e:
        print(f"swarm: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
