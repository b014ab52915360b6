"""Property tests: random joins, leaves and failures over a tiny in-memory network of Schedulers.

The network here is deliberately simple (everything is delivered at once, transfers finish in an order
that hypothesis picks), so that any interleaving is possible. Checked:

- no piece is ever requested from a peer that does not hold it;
- no upload is ever started for a piece the uploader does not hold;
- once the random phase is over and the network runs to quiescence, every live leecher is either
  complete, or its missing pieces are exactly the ones it reports as unavailable, which are exactly
  the pieces that no live peer it may still ask holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.scheduler import Cancel, Decision, HandedOut, Refuse, Request, Scheduler, SchedulerConfig, Serve


@dataclass
class Net:
    k: int
    cfg: SchedulerConfig
    nodes: dict[str, Scheduler] = field(default_factory=dict)
    transfers: list[tuple[str, str, int]] = field(default_factory=list)  # (uploader, downloader, piece)
    now: float = 0.0
    violations: list[str] = field(default_factory=list)
    handed: set[tuple[str, int]] = field(default_factory=set)  # (seed, piece) announced (rule 12)

    def add(self, name: str, have: range | tuple[int, ...], seed: int) -> None:
        s = Scheduler([1000 + i for i in range(self.k)], have, seed=seed, config=self.cfg)
        self.nodes[name] = s
        for other, o in self.nodes.items():
            if other == name:
                continue
            s.peer_joined(other, self.now)
            o.peer_joined(name, self.now)
            s.peer_bitfield_mask(other, o.have_mask, self.now)
            o.peer_bitfield(name, s.have, self.now)
        self.settle(name)

    def leave(self, name: str) -> None:
        del self.nodes[name]
        for up, down, piece in list(self.transfers):
            if name in (up, down):
                self.transfers.remove((up, down, piece))
        for other, o in list(self.nodes.items()):
            self.apply(other, o.peer_left(name, self.now))

    def apply(self, name: str, decisions: list[Decision]) -> None:
        me = self.nodes[name]
        for d in decisions:
            if isinstance(d, HandedOut):
                if not me.complete:
                    self.violations.append(f"{name} handed out {d.piece} but is not a full seed")
                if (name, d.piece) in self.handed:
                    self.violations.append(f"{name} announced {d.piece} as handed out twice")
                self.handed.add((name, d.piece))
                for other, o in self.nodes.items():
                    if other != name:
                        o.peer_handed_out(name, d.piece, self.now)
                continue
            peer = self.nodes.get(d.peer)
            if isinstance(d, Request):
                if peer is None:
                    continue
                if not peer.has(d.piece):
                    self.violations.append(f"{name} asked {d.peer} for {d.piece}, which it lacks")
                self.apply(d.peer, peer.upload_requested(name, d.piece, self.now))
            elif isinstance(d, Serve):
                if not me.has(d.piece):
                    self.violations.append(f"{name} serves {d.piece}, which it lacks")
                if peer is None:
                    self.apply(name, me.upload_finished(d.peer, d.piece, self.now, False))
                else:
                    self.transfers.append((name, d.peer, d.piece))
            elif isinstance(d, Refuse):
                if peer is not None:
                    peer.piece_failed(name, d.piece, self.now, "refused")
            elif isinstance(d, Cancel):
                if peer is None:
                    continue
                if (d.peer, name, d.piece) in self.transfers:
                    self.transfers.remove((d.peer, name, d.piece))
                    self.apply(d.peer, peer.upload_finished(name, d.piece, self.now, False))
                else:
                    peer.upload_cancelled(name, d.piece, self.now)

    def settle(self, *names: str) -> None:
        for name in names or tuple(self.nodes):
            if name in self.nodes:
                self.apply(name, self.nodes[name].tick(self.now))

    def finish(self, i: int, ok: bool) -> None:
        up, down, piece = self.transfers.pop(i % len(self.transfers))
        self.now += 0.001
        self.apply(up, self.nodes[up].upload_finished(down, piece, self.now, ok))
        d = self.nodes[down]
        if ok:
            self.apply(down, d.piece_received(up, piece, self.now))
            for other, o in self.nodes.items():
                if other != down:
                    o.peer_have(down, piece, self.now)
        else:
            d.piece_failed(up, piece, self.now, "bad_checksum")
        self.settle()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 3)),
        st.tuples(st.just("leave"), st.integers(0, 100)),
        st.tuples(st.just("finish"), st.integers(0, 1000)),
        st.tuples(st.just("fail"), st.integers(0, 1000)),
        st.tuples(st.just("time"), st.floats(0.0, 30.0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(1, 10),
    seeds=st.integers(0, 2),
    partial=st.lists(st.sets(st.integers(0, 9), max_size=6), max_size=3),
    program=ops,
    max_failures=st.integers(0, 3),
    endgame=st.booleans(),
)
def test_random_swarms_complete_or_name_the_missing_pieces(
    k: int,
    seeds: int,
    partial: list[set[int]],
    program: list[tuple[str, float]],
    max_failures: int,
    endgame: bool,
) -> None:
    cfg = SchedulerConfig(
        max_uploads=2,
        seed_max_uploads=2,
        max_upload_queue=3,
        max_failures_per_peer=max_failures,
        endgame=endgame,
        request_timeout_s=10.0,
        refuse_backoff_s=0.5,
    )
    net = Net(k, cfg)
    n = 0
    for _ in range(seeds):
        net.add(f"s{n}", range(k), n)
        n += 1
    for pieces in partial:
        net.add(f"p{n}", tuple(p for p in pieces if p < k), n)
        n += 1
    for op, arg in program:
        if op == "join":
            net.add(f"l{n}", (), n)
            n += 1
        elif op == "leave" and net.nodes:
            net.leave(sorted(net.nodes)[int(arg) % len(net.nodes)])
        elif op in ("finish", "fail") and net.transfers:
            net.finish(int(arg), ok=op == "finish")
        elif op == "time":
            net.now += arg  # lets requests time out, and backoffs expire
            net.settle()
    # quiescence: no more failures; let time pass so that backoffs expire and stuck requests time out
    for _ in range(10_000):
        if net.transfers:
            net.finish(0, ok=True)
            continue
        net.now += 11.0
        before = {name: s.held_count for name, s in net.nodes.items()}
        net.settle()
        if not net.transfers and before == {name: s.held_count for name, s in net.nodes.items()}:
            break
    assert net.violations == []
    for name, s in net.nodes.items():
        if s.complete:
            continue
        assert s.missing() == s.unavailable(), name
        # ... and those are exactly the pieces that no live peer it may still ask holds
        askable = 0
        for other, o in net.nodes.items():
            if other == name:
                continue
            st_ = s.peer_stats(other)
            if not st_.excluded:
                askable |= o.have_mask & ~s._peers[other].bad
        assert not any((askable >> p) & 1 for p in s.missing()), name


def test_the_checker_catches_a_scheduler_that_asks_the_wrong_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break rule 2 (believe a peer holds every piece) and see the check fail."""
    orig = Scheduler.peer_bitfield_mask

    def liar(self: Scheduler, peer: str, mask: int, now: float) -> None:
        orig(self, peer, (1 << self.num_pieces) - 1, now)

    monkeypatch.setattr(Scheduler, "peer_bitfield_mask", liar)
    net = Net(4, SchedulerConfig(min_pipeline=4))
    net.add("s", range(2), 0)
    net.add("l", (), 1)
    assert net.violations, "the broken rule went unnoticed"
