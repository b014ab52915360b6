"""LAN benchmark: the swarm against the naive one-seed fan-out, side by side in one run.

Setup (tests/lan/netns.py; needs root and iproute2): a bridge and 1 + N hosts, each in its own network
namespace, every host's link shaped with tbf to the same rate B in both directions. Host h0 runs the
seed of a synthetic model of M bytes (swarm.synthetic); hosts h1..hN run N leechers that start together.

Two phases on the same LAN, one after the other (`--repeat` runs the pair several times):

* swarm: the product as it ships. Every node finds the others by multicast mDNS (no static list), the
  scheduler (swarm.scheduler, default config) decides which piece moves from whom, and every leecher
  serves what it holds at once.
* naive: the fan-out of today's remote-instance loaders, run by the same code. Each leecher is given
  only the seed: `NodeConfig(mdns=False, peers="<seed>:<port>", pex=False)`. With neither mDNS nor peer
  exchange a leecher never learns that another leecher exists, so it pulls the whole model from the
  seed and from nobody else (the bench checks: `from_leechers_fraction` is 0), and the seed serves
  everyone who asks, as in the swarm phase.

Timing. Each member is its own process (this file with `--agent`) in its host's namespace. A leecher
starts Python, imports torch and swarm, allocates and touches its tensors, then says "ready"; the clock
starts when the bench then tells every leecher "go" at once. Each leecher then creates and starts its
Node (bind, mDNS advertise and browse, dial, handshake) and fetches. A phase's time is from "go" to the
last leecher's completion (the monotonic clock is shared by all namespaces of one kernel). Discovery
and connection set-up are included; process start-up is not (it is the same for both strategies, is
paid by vLLM anyway, and takes 6-10 s here when 8 processes import torch at once on 2 cores): it is
measured separately and reported as `startup_s`.

Integrity: every piece is checked against the seed's blake3 checksum on arrival; at the end every
member also hashes its whole tensors (blake3) and the bench fails unless all digests equal the seed's.

Ideal: M/B, the time one link needs to carry the model once: every leecher must receive M bytes through
a link of rate B, so no strategy can beat it. tbf counts Ethernet frames, so TCP payload moves at about
1448/1514 of B; `goodput_ideal_s` is that bound. Diagnostics per phase: `seed_copies` (bytes the seed
sent / M: the seed's link is the scarce one, so a swarm's time is about seed_copies x M/B), CPU use of
the machine (`cpu`: the bench's processes, softirq, and everything else on the machine).

Run (root), from the repository root:
    PYTHONPATH=. python bench/lan.py                   # B = 200 Mbit/s, M = 100 MiB, 7 leechers
    PYTHONPATH=. python bench/lan.py --json --repeat 3 # one JSON object; medians and every run
    PYTHONPATH=. python bench/lan.py --phases swarm --sched '{"min_pipeline": 1}'
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TCP_PAYLOAD_FRACTION = 1448 / 1514  # MSS (with TCP timestamps) / Ethernet frame, 1500-byte MTU


# ------------------------------------------------------------------------------------------ the agent


def _emit(**obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _digest(tensors: Any) -> str:
    import blake3
    import torch

    h = blake3.blake3()
    for t in tensors.values():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return str(h.hexdigest())


def _sample(node: Any, samples: list[Any], period: float = 0.1) -> None:
    """--debug: every `period` s, record the node's byte counters, pieces held and requests in flight."""
    import threading

    def run() -> None:
        while not node._stop.is_set():
            try:
                inflight = sum(len(v) for v in node.scheduler.in_flight().values())
            except RuntimeError:  # changed under our feet (the node's thread owns it): debug only
                inflight = -1
            sent = int(getattr(node.scheduler, "_sent_mask", 0)).bit_count()  # distinct pieces uploaded
            samples.append(
                (time.monotonic(), node.bytes_in, node.bytes_out, node.scheduler.held_count, inflight, sent)
            )
            time.sleep(period)

    threading.Thread(target=run, daemon=True).start()


def run_agent(args: argparse.Namespace) -> int:
    """One member, driven over stdin/stdout (JSON lines out; 'go', 'digest', 'quit' in)."""
    t_spawn = float(args.spawned_at)
    if args.debug:
        import logging

        fmt = "%(relativeCreated)d %(threadName)s %(name)s: %(message)s"
        logging.basicConfig(level=logging.DEBUG, format=fmt)
    # What Node imports lazily (zeroconf: ~0.2 s) belongs to process start-up, not to the fetch.
    import swarm.discovery
    import swarm.transport.tcp  # noqa: F401
    from swarm.node import Node, NodeConfig
    from swarm.options import parse_size
    from swarm.scheduler import SchedulerConfig
    from swarm.synthetic import synthetic_key, synthetic_tensors

    size = parse_size(args.size)
    seed = args.agent == "seed"
    tensors = synthetic_tensors(size, fill=seed)
    if not seed:  # fault every page in now, not during the timed fetch
        for t in tensors.values():
            t.zero_()
    cfg = NodeConfig.from_env(
        scheduler=SchedulerConfig(**json.loads(args.sched)) if args.sched else None,
        piece_size=parse_size(args.piece_size),
        mdns=not args.naive,
        pex=not args.naive,
        peers=args.peers or None,
        control_port=args.port if seed else None,
        discovery_timeout_s=30.0,
        stall_timeout_s=60.0,
        model_name="bench-lan",
    )
    key = synthetic_key(size)
    node = None
    samples: list[Any] = []
    if seed:
        node = Node(key, tensors, cfg, complete=True).start()
        if args.debug:
            _sample(node, samples)
        _emit(event="ready", startup_s=time.monotonic() - t_spawn, port=node.control_port)
    else:
        _emit(event="ready", startup_s=time.monotonic() - t_spawn)
    timeline: list[tuple[float, int]] = []
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "go" and node is None:
            t_go = time.monotonic()
            cpu0 = _cpu_s()
            node = Node(key, tensors, cfg, complete=False).start()
            t_started = time.monotonic()
            if args.debug:
                _sample(node, samples)
            report = node.fetch(progress=lambda done, _total: timeline.append((time.monotonic(), done)))
            t_done = time.monotonic()
            sources = {
                report.peer_names.get(p, p).rsplit("@", 1)[-1]: b for p, b in report.bytes_by_peer.items()
            }
            _emit(
                event="done",
                t_go=t_go,
                t_started=t_started,
                t_first=next((t for t, done in timeline if done > 0), t_done),
                t_done=t_done,
                cpu_s=_cpu_s() - cpu0,
                bytes=report.total_bytes,
                sources=sources,
            )
        elif cmd == "digest" and node is not None:
            if args.debug:
                _emit(event="debug", samples=samples, timeline=timeline)
            _emit(event="digest", digest=_digest(tensors), status=node.status())
        elif cmd == "quit":
            break
    if node is not None:
        node.close()
    return 0


# ------------------------------------------------------------------------------------------ the bench


def _machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds by kind since boot (/proc/stat), all CPUs together."""
    hz = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    return {n: int(v) / hz for n, v in zip(names, fields, strict=False)}


def _proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / hz
    return total


def _cpu_report(m0: dict[str, float], m1: dict[str, float], own_s: float, seconds: float) -> dict[str, float]:
    d = {k: m1[k] - m0[k] for k in m0}
    total = sum(d.values()) or 1e-9
    idle = d["idle"] + d["iowait"]
    return {
        "seconds": round(seconds, 2),
        "machine_busy_fraction": round(1 - idle / total, 3),
        "bench_processes_s": round(own_s, 2),
        "softirq_s": round(d["softirq"], 2),
        "others_s": round(max(total - idle - d["softirq"] - own_s, 0.0), 2),
    }


def _agent(host: Any, role: str, args: argparse.Namespace, *, naive: bool, peers: str = "") -> Any:
    argv = [
        str(Path(__file__).resolve()),
        "--agent",
        role,
        "--size",
        args.size,
        "--piece-size",
        args.piece_size,
    ]
    argv += ["--spawned-at", repr(time.monotonic()), "--port", str(args.port)]
    if naive:
        argv.append("--naive")
    if peers:
        argv += ["--peers", peers]
    if args.sched:
        argv += ["--sched", args.sched]
    if args.debug:
        argv += ["--debug", args.debug]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return host.python(*argv, env=env, pythonpath=[REPO_ROOT])


def _event(name: str) -> Any:
    return lambda m: m.get("event") == name


def run_phase(lan: Any, args: argparse.Namespace, phase: str, model_bytes: int, log: Any) -> dict[str, Any]:
    naive = phase == "naive"
    seed_host, *leecher_hosts = lan.hosts
    seed = _agent(seed_host, "seed", args, naive=naive)
    procs = [seed]
    try:
        port = seed.expect_json(_event("ready"), args.timeout)["port"]
        peers = f"{seed_host.ip}:{port}" if naive else ""
        leechers = [_agent(h, "leecher", args, naive=naive, peers=peers) for h in leecher_hosts]
        procs += leechers
        startup = [p.expect_json(_event("ready"), args.timeout)["startup_s"] for p in leechers]
        time.sleep(args.settle)  # let start-up stragglers (other threads, page cache) calm down
        pids = [p.pid for p in procs]
        m0, own0 = _machine_cpu(), _proc_cpu(pids)
        t_go = time.monotonic()
        for p in leechers:
            p.send("go")
        done = [p.expect_json(_event("done"), args.deadline) for p in leechers]
        elapsed = max(d["t_done"] for d in done) - t_go
        cpu = _cpu_report(m0, _machine_cpu(), _proc_cpu(pids) - own0, time.monotonic() - t_go)
        digests = []
        for i, p in enumerate(procs):
            p.send("digest")
            if args.debug:
                dbg = p.expect_json(_event("debug"), args.timeout)
                os.makedirs(args.debug, exist_ok=True)
                Path(args.debug, f"{phase}-h{i}.json").write_text(json.dumps(dbg))
            digests.append(p.expect_json(_event("digest"), args.timeout))
        if any(d["digest"] != digests[0]["digest"] for d in digests):
            raise SystemExit(
                f"{phase}: a leecher's tensors differ from the seed's: {[d['digest'] for d in digests]}"
            )
        if args.debug:
            for i, p in enumerate(procs):
                Path(args.debug, f"{phase}-h{i}.log").write_text("\n".join(p.lines) + "\n" + p.stderr)
        total_in = sum(d["bytes"] for d in done)
        from_leechers = sum(b for d in done for host, b in d["sources"].items() if host != seed_host.ip)
        seed_out = int(digests[0]["status"]["bytes_out"])
        result = {
            "seconds": round(elapsed, 3),
            "per_leecher_s": sorted(round(d["t_done"] - t_go, 3) for d in done),
            "first_piece_s": round(max(d["t_first"] - t_go for d in done), 3),
            "node_start_s": round(max(d["t_started"] - d["t_go"] for d in done), 3),
            "startup_s": round(max(startup), 2),
            "startup_plus_fetch_s": round(max(startup) + elapsed, 2),  # as if fetching right after start-up
            "seed_copies": round(seed_out / model_bytes, 3),
            "from_leechers_fraction": round(from_leechers / total_in, 3) if total_in else 0.0,
            "identical": True,
            "cpu": cpu,
        }
        print(
            f"  {phase}: {elapsed:6.2f} s  (leechers done {result['per_leecher_s'][0]:.2f}..{elapsed:.2f} s, "
            f"first piece by {result['first_piece_s']:.2f} s, seed sent {result['seed_copies']:.2f} x M, "
            f"{result['from_leechers_fraction']:.0%} of bytes from leechers; "
            f"CPU s: bench {cpu['bench_processes_s']}, softirq {cpu['softirq_s']}, others {cpu['others_s']}; "
            f"start-up {result['startup_s']:.1f} s, not timed)",
            file=log,
            flush=True,
        )
        for p in procs:
            p.send("quit")
        for p in procs:
            p.wait(args.timeout)
        return result
    finally:
        for p in procs:
            p.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="B: every link's rate, both ways")
    parser.add_argument(
        "--size", default="100MiB", help="M: synthetic model size (100MB = 10^8 bytes, 100MiB = 2^20 x 100)"
    )
    parser.add_argument("--piece-size", default="256KiB", help="piece size (default 256 KiB: ~10 ms at B)")
    parser.add_argument("--leechers", type=int, default=7)
    parser.add_argument("--phases", default="swarm,naive", help="comma-separated, in order: swarm, naive")
    parser.add_argument("--repeat", type=int, default=1, help="run the phases this many times (medians)")
    parser.add_argument("--queue-ms", type=float, default=100.0, help="tbf queue, in ms at the rate")
    parser.add_argument("--sched", default="", help='scheduler overrides as JSON, e.g. {"min_pipeline": 1}')
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--port", type=int, default=7600, help="the seed's control port")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between all-ready and go")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on start-up and teardown steps")
    parser.add_argument("--deadline", type=float, default=300.0, help="bound on one phase's fetch")
    parser.add_argument("--debug", default="", help="write every member's log and samples to this directory")
    parser.add_argument("--agent", choices=["seed", "leecher"], help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peers", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.agent:
        return run_agent(args)

    sys.path.insert(0, str(REPO_ROOT / "tests" / "lan"))
    import netns

    reason = netns.unavailable_reason()
    if reason:
        print(f"bench/lan.py: cannot build the namespaced LAN: {reason}", file=sys.stderr)
        return 2
    from swarm.manifest import Manifest
    from swarm.options import parse_size
    from swarm.synthetic import synthetic_tensors

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - {"swarm", "naive"}:
        parser.error(f"--phases: expected swarm and/or naive, got {args.phases!r}")
    log = sys.stderr if args.json else sys.stdout
    manifest = Manifest.from_tensors(
        synthetic_tensors(parse_size(args.size), fill=False), parse_size(args.piece_size)
    )
    model_bytes = manifest.total_bytes
    ideal = model_bytes / (args.rate_mbit * 1e6 / 8)
    print(
        f"LAN bench: 1 seed + {args.leechers} leechers, each link tbf {args.rate_mbit:g} Mbit/s both ways "
        f"(queue {args.queue_ms:g} ms), M = {model_bytes / 1e6:.1f} MB in {len(manifest.pieces)} pieces of "
        f"{args.piece_size}, ideal M/B = {ideal:.2f} s; {os.cpu_count()} CPUs"
        + (f"; scheduler overrides {args.sched}" if args.sched else ""),
        file=log,
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in phases}
    with netns.Lan(1 + args.leechers) as lan:
        for host in lan.hosts:
            host.set_link(rate_mbit=args.rate_mbit, queue_s=args.queue_ms / 1000)
        for _ in range(args.repeat):
            for phase in phases:
                runs[phase].append(run_phase(lan, args, phase, model_bytes, log))
    out: dict[str, Any] = {
        "ideal_s": round(ideal, 3),
        "goodput_ideal_s": round(ideal / TCP_PAYLOAD_FRACTION, 3),
        "rate_mbit": args.rate_mbit,
        "model_bytes": model_bytes,
        "piece_size": parse_size(args.piece_size),
        "pieces": len(manifest.pieces),
        "leechers": args.leechers,
        "cpus": os.cpu_count(),
        "scheduler_overrides": json.loads(args.sched) if args.sched else {},
        "startup_included": False,
    }
    for phase, results in runs.items():
        times = [r["seconds"] for r in results]
        out[f"{phase}_s"] = round(statistics.median(times), 3)
        out[f"{phase}_runs_s"] = times
        out[f"{phase}_x_ideal"] = round(out[f"{phase}_s"] / ideal, 3)
        out[phase] = results
    if "swarm" in runs and "naive" in runs:
        out["naive_over_swarm"] = round(out["naive_s"] / out["swarm_s"], 2)
    if args.json:
        print(json.dumps(out))
    else:
        spread = {p: f"runs {', '.join(f'{t:.2f}' for t in out[f'{p}_runs_s'])}" for p in runs}
        print(f"ideal M/B      {ideal:7.2f} s   (TCP goodput bound {out['goodput_ideal_s']:.2f} s)")
        for phase in runs:
            median = "median " if args.repeat > 1 else ""
            figure = f"{out[f'{phase}_s']:7.2f} s = {out[f'{phase}_x_ideal']:.2f} x M/B"
            print(f"{phase:<14} {figure}  ({median}{spread[phase]})")
        if "naive_over_swarm" in out:
            print(f"naive / swarm  {out['naive_over_swarm']:7.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
