"""Fault figures of vllm-swarm: one table of scenario, runs, survived, bytes verified, wrong bytes loaded
(must be 0) and worst time to recover. `--json` prints the same records as a JSON list.

    PYTHONPATH=. python bench/faults.py [--runs N] [--fuzz N] [--soak N] [--json] [--no-lan] [--only TEXT]

Every scenario runs on loopback (127.0.0.1) with a synthetic 8 MB model in 256 KiB pieces; the link
scenarios run on a namespaced LAN (tests/lan/netns.py) when this host can build one, and are listed as
skipped otherwise. The resource-exhaustion attacks come from tests/faults/exhaust.py (their note gives the
victim's peak figures against the bounds); "loss 2% + delay 20 ms" runs through the user-space relay of
tests/faults/relay.py (no netem needed). Definitions (docs/reliability.md):

- survived: the run ended as specified: the fetch completed byte-identical where an honest holder
  remained, or raised StallError within its deadline where none did; for the seed-side scenarios, the
  seed freed everything tied to the lost peers and kept serving.
- bytes verified: bytes checked against their piece checksums and then against the true model by the
  test's own watcher, at the moment each piece was reported received.
- wrong bytes loaded: bytes that differed from the true model at that moment or at the end.
- worst recovery: from the fault to the moment the leecher stopped waiting on the failed peer (it was
  dropped and its pieces re-requested), or to StallError where no holder remained, or, on a seed, to
  the moment every resource of the killed leechers was freed. Worst over the runs.

Stops by itself: every wait is bounded, every process and namespace is removed on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.errors import FetchError, StallError
from tests.faults import harness as H
from tests.loopback import free_port, wait_until

RATE = 3e6


@dataclass
class Record:
    scenario: str
    runs: int = 0
    survived: int = 0
    bytes_verified: int = 0
    wrong_bytes: int = 0
    worst_recovery_s: float | None = None
    note: str = ""
    #: False where the bench counts no bytes itself (the attack rows: their tests check the bytes)
    counted: bool = True

    def recovered(self, seconds: float) -> None:
        self.worst_recovery_s = max(self.worst_recovery_s or 0.0, round(seconds, 3))


def _watch_totals(rec: Record, nodes: list[Any]) -> None:
    for n in nodes:
        w = n.transport
        rec.bytes_verified += getattr(w, "verified", 0)
        rec.wrong_bytes += getattr(w, "wrong_loaded", 0)
        if n.complete:
            rec.wrong_bytes += H.wrong_bytes(dict(n.tensors))


def _two_seeds_one_fails(rec: Record, runs: int, sig: signal.Signals) -> None:
    for _ in range(runs):
        rec.runs += 1
        members = H.Members(Path(tempfile.mkdtemp(prefix="faults-")))
        try:
            ports = [free_port(), free_port()]
            procs = [members.paced_seed(p, RATE, name=f"s{i}") for i, p in enumerate(ports)]
            for p, proc in zip(ports, procs, strict=True):
                H.wait_for_member(p, proc)
            victim = str((H.status_of(ports[0]) or {})["instance"])
            with H.closing() as nodes:
                leechers = [
                    H.leecher_node(transport=H.WatchedTcp(), peers=H.peers_of(*ports)) for _ in range(2)
                ]
                nodes.extend(leechers)
                fetches = [H.FetchRun(n).start() for n in leechers]
                wait_until(lambda: all(n.status()["from"].get(victim, 0) for n in leechers), 30, "pulling")  # noqa: B023
                os.kill(procs[0].pid, sig)
                t0 = time.monotonic()
                dropped = max(
                    wait_until(lambda n=n, v=victim: v not in n._peers, 20, "drop", step=0.01)
                    for n in leechers
                )
                rec.recovered(dropped - t0)
                for f in fetches:
                    f.wait(60)
                ok = all(f.error is None for f in fetches)
                _watch_totals(rec, leechers)
                rec.survived += ok and all(H.wrong_bytes(dict(n.tensors)) == 0 for n in leechers)
        finally:
            members.close()


def _last_holder_fails(rec: Record, runs: int, sig: signal.Signals) -> None:
    cfg = {"peer_timeout_s": 2.0, "discovery_timeout_s": 2.0}
    for _ in range(runs):
        rec.runs += 1
        members = H.Members(Path(tempfile.mkdtemp(prefix="faults-")))
        try:
            port = free_port()
            proc = members.paced_seed(port, RATE)
            H.wait_for_member(port, proc)
            with H.closing(H.leecher_node(transport=H.WatchedTcp(), peers=H.peers_of(port), **cfg)) as (n,):
                run = H.FetchRun(n).start()
                wait_until(lambda: H.progress(n) > 0.1, 30, "progress")
                os.kill(proc.pid, sig)
                t0 = time.monotonic()
                run.wait(60)
                assert run.ended is not None
                rec.recovered(run.ended - t0)
                _watch_totals(rec, [n])
                budget = (
                    cfg["discovery_timeout_s"] + (cfg["peer_timeout_s"] if sig == signal.SIGSTOP else 0) + 2
                )
                rec.survived += isinstance(run.error, StallError) and run.ended - t0 < budget
        finally:
            members.close()


def frozen_data_plane(rec: Record, runs: int) -> None:
    for _ in range(runs):
        rec.runs += 1
        frozen = H.PacedTcp(RATE)
        with H.closing() as nodes:
            a, b = H.seed_node(transport=frozen), H.seed_node(transport=H.PacedTcp(RATE))
            nodes += [a, b]
            n = H.leecher_node(
                transport=H.WatchedTcp(io_timeout_s=2.0), peers=H.peers_of(a, b), io_timeout_s=2.0
            )
            nodes.append(n)
            try:
                run = H.FetchRun(n).start()
                wait_until(lambda: n.status()["from"].get(a.id, 0) > 0, 30, "pulling")  # noqa: B023
                frozen.frozen.set()
                t0 = time.monotonic()
                wait_until(lambda: a.id not in n._peers, 20, "drop")  # noqa: B023
                rec.recovered(time.monotonic() - t0)
                run.wait(60)
            finally:
                frozen.released.set()
            _watch_totals(rec, [n])
            rec.survived += run.error is None and H.wrong_bytes(dict(n.tensors)) == 0


def corrupt_peer(rec: Record, runs: int) -> None:
    for _ in range(runs):
        rec.runs += 1
        bad_t = H.CorruptTcp(lambda piece: piece % 2 == 0)
        with H.closing() as nodes:
            good, bad = H.seed_node(rate_cap=8e6), H.seed_node(transport=bad_t)
            nodes += [good, bad]
            n = H.leecher_node(transport=H.WatchedTcp(), peers=H.peers_of(good, bad))
            nodes.append(n)
            run = H.FetchRun(n).start().wait(60)
            _watch_totals(rec, [n])
            excluded = n.scheduler.peer_stats(bad.id).excluded or bad_t.corrupted <= 3
            rec.survived += run.error is None and excluded and H.wrong_bytes(dict(n.tensors)) == 0
            rec.note = f"{bad_t.corrupted} corrupt pieces served in the last run, all caught"


def leechers_killed(rec: Record, rounds: int) -> None:
    members = H.Members(Path(tempfile.mkdtemp(prefix="faults-")))
    try:
        with H.closing(H.seed_node(rate_cap=2e6, peer_timeout_s=2.0)) as (seed,):
            threads = H.swarm_threads()
            for r in range(rounds):
                procs = [
                    members.start(
                        "fetch", *H.member_args(), "--peers", H.peers_of(seed), "--quiet", name=f"l{r}{i}"
                    )
                    for i in range(2)
                ]
                wait_until(lambda: len(seed.status()["to"]) >= 2 and seed.scheduler._serving, 60, "pulling")
                for p in procs:
                    os.kill(p.pid, signal.SIGKILL)
                t0 = time.monotonic()
                rec.runs += len(procs)
                t = H.tcp_of(seed)

                def freed() -> bool:
                    return not seed._peers and not t._senders and H.swarm_threads() == threads  # noqa: B023

                try:
                    rec.recovered(wait_until(freed, 10, "freed") - t0)
                    rec.survived += len(procs)
                except AssertionError:
                    pass
            with H.closing(H.leecher_node(transport=H.WatchedTcp(), peers=H.peers_of(seed))) as (n,):
                run = H.FetchRun(n).start().wait(60)
                _watch_totals(rec, [n])
                if run.error is not None:
                    rec.survived = 0
    finally:
        members.close()


def hostile(rec_fuzz: Record, rec_flood: Record, examples: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from swarm import protocol as P
    from swarm.transport.tcp import TcpTransport
    from tests.faults import hostile as F
    from tests.faults.attack import sealed_elsewhere
    from tests.faults.test_hostile import TOKEN

    cfg = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    with H.closing() as nodes:
        seed = H.seed_node(token=TOKEN, transport=TcpTransport(token=TOKEN, connect_timeout_s=1.0))
        leecher = H.leecher_node(token=TOKEN, peer_timeout_s=1.0)
        nodes += [seed, leecher]
        drivers = [F.Driver(seed, TOKEN), F.Driver(leecher, TOKEN), F.Driver(seed, TOKEN)]
        t0 = time.monotonic()
        failures: list[str] = []

        def make_insider(d: F.Driver) -> Callable[[], None]:
            @cfg
            @given(data=st.data())
            def insider(data: st.DataObject) -> None:
                items = data.draw(F.insider_messages(d.target()))
                session = d.session()
                d.run([f for f in (F.encode_any(session, x) for x in d.as_member(items)) if f is not None])

            return insider  # type: ignore[no-any-return]

        for i, d in enumerate(drivers[:2]):
            try:
                make_insider(d)()
            except Exception as e:  # a finding: reported in the table, the bench goes on
                failures.append(f"insider {i}: {e}"[:300])
        stranger_ok = True
        d = drivers[2]
        other = sealed_elsewhere(TOKEN)  # frames of another member's session: a recording
        valid = [other.encode(m) for m in (P.StatusQuery(), P.Request(0), seed._hello())]

        @cfg
        @given(data=st.data())
        def stranger(data: st.DataObject) -> None:
            nonlocal stranger_ok
            frames = data.draw(F.stranger_frames(TOKEN, valid))
            d.session()
            replies = [m for m in d.run(frames, stranger=True) if not isinstance(m, P.StatusReply)]
            stranger_ok = stranger_ok and all(isinstance(m, P.Error) for m in replies)

        try:
            stranger()
        except Exception as e:
            failures.append(f"stranger: {e}"[:300])
        rec_fuzz.runs = sum(x.sent for x in drivers)
        alive = H.alive(seed, TOKEN) and H.alive(leecher, TOKEN)
        with H.closing(
            H.leecher_node(transport=H.WatchedTcp(token=TOKEN), token=TOKEN, peers=H.peers_of(seed))
        ) as (n,):
            run = H.FetchRun(n).start().wait(60)
            _watch_totals(rec_fuzz, [n])
        ok = alive and stranger_ok and not failures and run.error is None
        rec_fuzz.survived = rec_fuzz.runs if ok else 0
        rec_fuzz.note = f"{sum(x.examples for x in drivers)} examples in {time.monotonic() - t0:.0f} s; " + (
            "; ".join(failures) or "node alive, strangers got only errors, honest fetch after"
        )
        for x in drivers:
            x.close()

        times = []
        for flood in (False, True):
            with F.flooding(seed.control_port if flood else None) as sent:
                with H.closing(
                    H.leecher_node(transport=H.WatchedTcp(token=TOKEN), token=TOKEN, peers=H.peers_of(seed))
                ) as (n,):
                    run = H.FetchRun(n).start().wait(60)
                    _watch_totals(rec_flood, [n])
                    times.append(run.seconds if run.error is None else float("inf"))
            if flood:
                rec_flood.runs = sent[0]
        rec_flood.survived = (
            rec_flood.runs if times[1] < max(4 * times[0], 2.0) and H.alive(seed, TOKEN) else 0
        )
        rec_flood.note = f"honest fetch {times[0]:.2f} s alone, {times[1]:.2f} s under the flood"


def soak(rec: Record, rounds: int) -> None:
    from tests.faults.test_soak import BOUND, within_bound
    from tests.faults.test_soak import soak as run_soak

    members = H.Members(Path(tempfile.mkdtemp(prefix="faults-")))
    try:
        result = run_soak(members, rounds)
    finally:
        members.close()
    rec.runs = rounds
    rec.survived = int(result["completed"]) if within_bound(result) else 0  # type: ignore[call-overload]
    rec.bytes_verified = rounds * H.expected_total()
    rec.note = (
        f"seed after warm-up {result['baseline']}, peak {result['peak']}, end {result['end']}; "
        f"bound +{BOUND['fds']} fds, +{BOUND['threads']} threads, +{BOUND['rss_mb']:.0f} MB; "
        f"{result['killed']} leechers SIGKILLed, {result['left_mid_fetch']} left mid-fetch"
    )


def lan(records: list[Record], runs: int) -> None:
    from tests.faults import test_link_faults as L

    names = {
        "link down, one of 2 seeds": (3, 2, "reroute"),
        "link down 2 s, only seed": (2, 1, "resume"),
        "link down, only seed": (2, 1, "stall"),
    }
    if L.netns is None or L.netns.unavailable_reason():
        why = "no harness" if L.netns is None else L.netns.unavailable_reason()
        records += [Record(name, note=f"skipped: {why}") for name in names]
        return
    for name, (hosts, n_seeds, kind) in names.items():
        rec = Record(name)
        records.append(rec)
        for _ in range(runs):
            rec.runs += 1
            with L.netns.Lan(hosts, rate_mbit=L.RATE_MBIT) as lan_:
                seeds, leecher, _ = L._start(lan_, n_seeds)
                seeds[0].link_down()
                if kind == "resume":
                    time.sleep(2.0)
                    seeds[0].link_up()
                code, seconds = L._finished(leecher, 90)
                out = "\n".join(leecher.lines)
                verified = "verified: identical" in out
                if verified:
                    rec.bytes_verified += L.SIZE
                if kind == "stall":
                    rec.survived += code == 1 and "missing" in leecher.stderr
                    rec.recovered(seconds)
                else:
                    rec.survived += code == 0 and verified
                    if kind == "reroute":
                        rec.recovered(seconds)
        if kind == "reroute":
            rec.note = "recovery: cut to verified completion (includes the rest of the transfer)"


def exhaustion(rec: Record, attack: Callable[[], Any]) -> None:
    """One resource-exhaustion attack (tests/faults/exhaust.py): survived when the honest fetch completed
    byte-identical and the victim's figures stayed within their bounds (both in the note)."""
    out = attack()
    rec.runs = 1
    rec.survived = int(out.survived)
    rec.bytes_verified = out.verified
    rec.wrong_bytes = out.wrong
    rec.note = out.describe()


def lossy(rec: Record, runs: int) -> None:
    """Loss 2% + delay 20 ms in user space (tests/faults/relay.py), against the same fetch without."""
    from tests.faults.test_lossy import lossy_fetch

    clean = lossy_fetch(0.0, 0.0)[0]
    stalls = 0
    worst = 0.0
    for i in range(runs):
        rec.runs += 1
        seconds, verified, wrong, s = lossy_fetch(seed=i + 1)
        rec.bytes_verified += verified
        rec.wrong_bytes += wrong
        rec.survived += wrong == 0
        stalls += s
        worst = max(worst, seconds)
    rec.note = (
        f"user-space relay (no netem here): every segment delayed 20 ms, {stalls} segments stalled 200 ms "
        f"over the runs; slowest fetch {worst:.2f} s against {clean:.2f} s through the relays without loss "
        "or delay"
    )


def attack_test(rec: Record, name: str, **kwargs: Any) -> None:
    """One attack of tests/faults/test_attacks.py (replay, manifest replies and the deadline, open-swarm
    poisoning), run as it runs in the suite: survived when every check of the test held, among them the
    honest fetch ending byte-identical (or, in an open swarm without a majority, failing loudly rather
    than loading other bytes) and the victim answering afterwards. The test does its own byte checks, so
    this row counts no bytes."""
    from tests.faults import test_attacks as A

    fn = getattr(A, name)
    rec.counted = False
    rec.runs += 1
    try:
        fn(**kwargs)
    except AssertionError as e:
        rec.note = f"FAILED: {e}"[:300]
        return
    rec.survived += 1
    doc = (fn.__doc__ or "").strip().splitlines()
    rec.note = f"tests/faults/test_attacks.py::{name}{kwargs or ''}: {doc[0] if doc else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3, help="runs per kill/stop/corrupt scenario")
    ap.add_argument("--fuzz", type=int, default=1000, help="hypothesis examples per fuzzed client")
    ap.add_argument("--soak", type=int, default=50, help="soak rounds (more than the 5 of the warm-up)")
    ap.add_argument("--json", action="store_true", help="print JSON records instead of the table")
    ap.add_argument("--save", metavar="PATH", help="also write the JSON records to PATH")
    ap.add_argument("--no-lan", action="store_true", help="skip the namespaced-LAN link scenarios")
    ap.add_argument("--only", metavar="TEXT", help="run only the scenarios whose name contains TEXT")
    args = ap.parse_args(argv)
    from tests.faults.test_soak import WARMUP

    if args.soak <= WARMUP:
        ap.error(f"--soak needs more than {WARMUP} rounds: the first {WARMUP} are the warm-up (the baseline)")
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    records: list[Record] = []
    steps: list[tuple[str, Callable[[], None]]] = []

    def add(name: str, fn: Callable[[Record], None]) -> None:
        rec = Record(name)
        records.append(rec)
        steps.append((name, lambda: fn(rec)))

    add("seed SIGKILL, another seed left", lambda r: _two_seeds_one_fails(r, args.runs, signal.SIGKILL))
    add("seed SIGKILL, no holder left", lambda r: _last_holder_fails(r, args.runs, signal.SIGKILL))
    add("seed SIGSTOP mid-piece, another left", lambda r: _two_seeds_one_fails(r, args.runs, signal.SIGSTOP))
    add("seed SIGSTOP mid-piece, no holder left", lambda r: _last_holder_fails(r, args.runs, signal.SIGSTOP))
    add("data plane frozen mid-piece", lambda r: frozen_data_plane(r, args.runs))
    add("corrupt peer (every 2nd piece)", lambda r: corrupt_peer(r, args.runs))
    add("leechers SIGKILLed mid-transfer", lambda r: leechers_killed(r, args.runs))
    fuzz, flood = Record("hostile control traffic (frames)"), Record("flood of bad frames (frames)")
    records += [fuzz, flood]
    steps.append(("hostile", lambda: hostile(fuzz, flood, args.fuzz)))
    add(f"soak: {args.soak} rounds join/leave", lambda r: soak(r, args.soak))
    from tests.faults import exhaust as X

    members = H.Members(Path(tempfile.mkdtemp(prefix="faults-")))
    attacks: list[tuple[str, Callable[[], Any]]] = [
        ("16 MiB frames, bogus MAC, one connection", lambda: X.bogus_frames(members, 16 << 20)),
        ("256 KiB frames, bogus MAC, one connection", lambda: X.bogus_frames(members, 256 << 10)),
        ("40 partial 16 MiB frames held", lambda: X.partial_frames(members, 16 << 20)),
        ("seed (fd limit 128): idle connections on both ports", lambda: X.fd_exhaustion(members)),
        ("300 idle handshaked control connections", lambda: X.idle_control(members)),
        ("peer exchange: 32 Hellos x 32 made-up peers", X.pex_flood),
        ("80 insiders join a leecher", X.accepted_flood),
        ("100 data handshakes trickled", X.trickle),
    ]
    for name, attack in attacks:
        add(name, lambda r, a=attack: exhaustion(r, a))  # type: ignore[misc]
    add("loss 2% + delay 20 ms", lambda r: lossy(r, args.runs))
    from tests.faults.test_attacks import TOKEN

    for title, test, kw in [
        ("replayed status query", "test_recorded_status_query_is_worthless_replayed", {}),
        (
            "replayed Hello + Goodbye vs a fetching member",
            "test_recorded_hello_and_goodbye_cannot_knock_a_member_off",
            {},
        ),
        ("departed member's frames replayed", "test_departed_members_frames_replayed_get_nothing", {}),
        (
            "data channel taken under a member's id",
            "test_outsider_cannot_take_over_a_members_data_channel",
            {},
        ),
        (
            "recorded data credentials (token)",
            "test_recorded_data_credentials_are_worth_nothing",
            {"token": TOKEN},
        ),
        (
            "recorded data credentials (open)",
            "test_recorded_data_credentials_are_worth_nothing",
            {"token": None},
        ),
        (
            "manifest replies vs a leecher's deadline",
            "test_manifest_replies_cannot_hold_a_fetch_past_its_deadline",
            {},
        ),
        ("manifest replies vs a seed", "test_manifest_replies_do_not_freeze_a_seed", {}),
        (
            "stuck control loop vs the deadline",
            "test_fetch_returns_by_its_deadline_whatever_the_loop_does",
            {},
        ),
        (
            "open swarm: other bytes answer first",
            "test_open_swarm_member_with_other_bytes_cannot_poison_a_leecher_silently",
            {},
        ),
        (
            "open swarm: unsolicited checksums",
            "test_open_swarm_unsolicited_checksums_do_not_get_the_honest_seed_blamed",
            {},
        ),
        ("open swarm: 2 honest seeds, 1 of zeros", "test_open_swarm_majority_wins_and_is_never_blamed", {}),
    ]:
        add(f"attack: {title}", lambda r, t=test, k=kw: attack_test(r, t, **k))  # type: ignore[misc]
    if not args.no_lan:
        steps.append(("lan", lambda: lan(records, max(1, args.runs // 2))))
    if args.only:
        steps = [(n, st) for n, st in steps if args.only in n]
        records = [r for r in records if any(r.scenario == n for n, _ in steps)]
    for name, step in steps:
        t0 = time.monotonic()
        try:
            step()
        except (AssertionError, FetchError, OSError) as e:
            for rec in records:
                if rec.scenario == name:
                    rec.note = f"aborted: {type(e).__name__}: {e}"[:300]
        print(f"[{time.monotonic() - t0:5.1f} s] {name}", file=sys.stderr, flush=True)
    members.close()
    if args.save:
        Path(args.save).write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2))
    else:
        print(table(records))
    return 0 if all(r.wrong_bytes == 0 for r in records) else 1


def table(records: list[Record]) -> str:
    head = ["scenario", "runs", "survived", "bytes verified", "wrong bytes loaded", "worst recovery (s)"]
    rows = [
        [
            r.scenario,
            str(r.runs),
            str(r.survived),
            f"{r.bytes_verified / 1e6:.1f} MB" if r.counted else "-",
            str(r.wrong_bytes) if r.counted else "- (checked in the test)",
            "-" if r.worst_recovery_s is None else f"{r.worst_recovery_s:.2f}",
        ]
        for r in records
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [f"- {r.scenario}: {r.note}" for r in records if r.note]
    return "\n".join(lines + (["", *notes] if notes else []))


if __name__ == "__main__":
    sys.exit(main())
