"""`swarm`: the command line.

- `swarm status`: every swarm member on the LAN (mDNS, plus SWARM_PEERS / --peers), asked over the
  control plane for its status, shown as one table (`--json` for scripts, `--prometheus` in Prometheus
  text format, `--watch` for a live view). It reads the same SWARM_* variables as a member.
  Exits 1 when no member answers, saying what to check.
- `swarm seed --synthetic SIZE` / `swarm fetch --synthetic SIZE`: a standalone member without vLLM
  holding a synthetic model (swarm.synthetic) of SIZE bytes, for demos, tests and benchmarks. `fetch`
  shows a progress bar, verifies the result, and keeps seeding unless `--exit`.

Flags of node options come from the one schema (swarm.options): the same parsing, units and one-line
errors as the SWARM_* variables and the vLLM loader's options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import zmq

from swarm import options
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
    *,
    peers: str | None,
    interface: str | None,
    mdns: bool,
    browse_s: float,
    token: str | None,
    dns_server: str | None = None,
) -> list[dict[str, Any]]:
    from swarm import discovery

    found = discovery.discover(
        None, timeout=browse_s, interface=interface, static=peers, mdns=mdns, dns_server=dns_server
    )
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

    # The same options, environment and errors as a member's (SWARM_TOKEN, SWARM_INTERFACE, SWARM_MDNS...).
    config = _node_config(args, DISCOVERY_OPTIONS)
    browse_s = options.cli_value(options.Seconds(maximum=3600), args.timeout, "--timeout")
    interval = options.cli_value(options.Seconds(maximum=3600), args.interval, "--interval")
    # Not a terminal (a pipe, a log): a wide table rather than one folded to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)

    def fetch() -> list[dict[str, Any]]:
        return collect_status(
            peers=config.peers,
            interface=config.interface,
            mdns=config.mdns,
            browse_s=browse_s,
            token=config.token,
            dns_server=config.dns_server,
        )

    if args.watch:
        with Live(render_table([]), console=console, refresh_per_second=2) as live:
            try:
                while True:
                    live.update(render_table(fetch()))
                    time.sleep(interval)
            except KeyboardInterrupt:
                return 0
    rows = fetch()
    if args.prometheus:
        from swarm import metrics

        sys.stdout.write(metrics.status_exposition(rows))
    elif args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif rows:
        console.print(render_table(rows))
    if not rows:
        print(NOTHING_FOUND, file=sys.stderr)
        return 1
    return 0


#: Options that say how to reach the swarm: every command takes them.
DISCOVERY_OPTIONS = ("peers", "interface", "mdns", "token", "token_file", "dns_server")
#: The other options of a node: `swarm seed` and `swarm fetch` take every one as a flag.
MEMBER_OPTIONS = tuple(n for n in options.NODE_OPTIONS if n not in DISCOVERY_OPTIONS)


def _node_config(args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    """Flags over SWARM_* variables over defaults, through the one schema (swarm.options)."""
    from swarm.node import NodeConfig

    return NodeConfig.from_env(model_name="synthetic", **options.from_cli(args, names))


def _synthetic_size(args: argparse.Namespace) -> int:
    # A synthetic model lives in host memory (twice on a leecher that verifies): bounded by it.
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    kind = options.Size(minimum=1000, maximum=memory // 2)
    value: int = options.cli_value(kind, args.synthetic, "--synthetic")
    return value


def _wait_for_signal(node: Any, duration: float | None) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(duration)


def cmd_seed(args: argparse.Namespace) -> int:
    from swarm.node import Node
    from swarm.synthetic import synthetic_key, synthetic_tensors

    size = _synthetic_size(args)
    config = _node_config(args, MEMBER_OPTIONS + DISCOVERY_OPTIONS)
    duration = _duration(args)
    tensors = synthetic_tensors(size)
    with Node(synthetic_key(size), tensors, config, complete=True) as node:
        print(
            f"seeding synthetic model of {size / 1e6:.0f} MB as {node.id} on {node.host}:{node.control_port}",
            flush=True,
        )
        _wait_for_signal(node, duration)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    import torch
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from swarm.node import Node
    from swarm.synthetic import synthetic_key, synthetic_tensors

    size = _synthetic_size(args)
    config = _node_config(args, MEMBER_OPTIONS + DISCOVERY_OPTIONS)
    duration = _duration(args)
    tensors = synthetic_tensors(size, fill=False)
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
        from swarm import metrics

        model, rank = node.metrics.labels
        metrics.record_load(
            model=model, rank=rank, source="swarm", seconds=report.seconds, nbytes=report.total_bytes
        )
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
            _wait_for_signal(node, duration)
    return 0


def _member_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--synthetic", required=True, metavar="SIZE", help="synthetic model size, e.g. 512MB")
    options.add_arguments(p, MEMBER_OPTIONS)
    p.add_argument("--duration", default=None, metavar="SECONDS", help="serve this long, then exit")


def _duration(args: argparse.Namespace) -> float | None:
    if args.duration is None:
        return None
    value: float = options.cli_value(options.Seconds(maximum=1e9), args.duration, "--duration")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="vllm-swarm: BitTorrent-style weight distribution between inference instances.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the node does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    st = sub.add_parser("status", help="show every swarm member on the LAN")
    options.add_arguments(st, DISCOVERY_OPTIONS)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument(
        "--prometheus", action="store_true", help="print every member's status in Prometheus text format"
    )
    st.add_argument("--watch", action="store_true", help="refresh continuously")
    st.add_argument("--interval", default="2", metavar="SECONDS", help="seconds between refreshes (--watch)")
    st.add_argument("--timeout", default="2", metavar="SECONDS", help="seconds to browse mDNS (default 2)")
    st.set_defaults(func=cmd_status)

    seed = sub.add_parser("seed", help="serve a synthetic model (no vLLM needed)")
    _member_options(seed)
    options.add_arguments(seed, DISCOVERY_OPTIONS)
    seed.set_defaults(func=cmd_seed)

    fetch = sub.add_parser("fetch", help="fetch a synthetic model from the swarm, then seed it")
    _member_options(fetch)
    options.add_arguments(fetch, DISCOVERY_OPTIONS)
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
