"""Discrete-event simulation of the swarm: one `swarm.scheduler.Scheduler` per node, a modelled network.

Model (and why it is good enough):

- Transfers move whole pieces, as fluid flows. Each node's uplink is shared among its running uploads
  and its downlink among its running downloads, max-min fair *locally*: when a flow starts or ends
  between a and b, a's uplink is re-shared among a's uploads (equal shares, except that a flow whose
  receiver has less downlink left gets only that, and the rest goes to the others), then b's downlink
  likewise among b's downloads (capped by each sender's spare uplink). No link is ever over its
  capacity. Rates elsewhere are left as they are until an event touches their nodes, which happens
  at least once per piece; so the allocation approximates global max-min fairness (what TCP or NCCL
  streams sharing links tend to) at O(flows at two nodes) per event, bounded by the scheduler
  (``max_uploads``; request pipelines).
- Every message (request, cancel, refusal, have, handed-out hint, bitfield, the end of a piece) arrives
  one ``latency`` after it is sent; a piece's bytes occupy both links from the Serve until the flow
  ends, and the receiver learns of the last byte one latency later.
- Peer sets are bounded (``degree``, default 16): the nodes form a random ``degree``-regular graph
  (configuration model, drawn once from the seed), and a node that arrives connects to its graph
  neighbours that are present. If fewer than ``degree / 2`` are (early arrivals in a staggered
  scenario), or its peer set later drops below that (its peers failed), it also connects to random
  present nodes with fewer than ``2 * degree`` peers (as a tracker or discovery would hand out). For
  N <= degree everyone meets everyone. Balanced degrees matter: a node with half the peers of the
  others downloads from half the sources and finishes last.
  This keeps a have's fan-out, the cost that dominates a large run, at O(degree).
- A failed node vanishes: its flows stop, messages to and from it are lost, and each of its peers
  calls `peer_left` one latency later (a broken connection is noticed). Request timeouts remain for
  silent failures; `Scheduler.next_timeout` tells the engine when to tick a node.
- Receivers stay after they finish and serve as seeds.

The engine calls only the public Scheduler API, in the order the real node does: events in, decisions
out, decisions carried out.
"""

from __future__ import annotations

import gc
import heapq
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from sim.scenario import Scenario
from swarm.scheduler import Cancel, Decision, HandedOut, Request, Scheduler, SchedulerConfig, Serve

# event kinds
_ARRIVE, _FLOW, _REQ, _CANCEL, _REFUSE, _RECV, _HAVE, _LEFT, _TICK, _FAIL, _BITFIELD, _HANDED = range(12)


class _Flow:
    __slots__ = ("done", "dst", "eta", "piece", "rate", "remaining", "size", "src", "t_last")

    def __init__(self, src: _Node, dst: _Node, piece: int, size: int, now: float) -> None:
        self.src = src
        self.dst = dst
        self.piece = piece
        self.size = size
        self.remaining = float(size)
        self.rate = 0.0
        self.t_last = now
        self.eta = float("inf")  # time of the earliest pending _FLOW event for it
        self.done = False


class _Node:
    __slots__ = (
        "alive",
        "arrive",
        "done_at",
        "down",
        "down_sum",
        "downs",
        "fail_at",
        "graph",
        "idx",
        "name",
        "next_tick",
        "peers",
        "present",
        "sched",
        "up",
        "up_sum",
        "ups",
    )

    def __init__(self, idx: int, sched: Scheduler, up: float, down: float, arrive: float) -> None:
        self.idx = idx
        self.name = str(idx)
        self.sched = sched
        self.up = up
        self.down = down
        self.arrive = arrive
        self.fail_at: float | None = None
        self.graph: list[_Node] = []  # its neighbours in the random peer graph
        self.alive = True
        self.present = False
        self.peers: dict[str, _Node] = {}
        self.ups: dict[tuple[str, int], _Flow] = {}  # (dst, piece) -> flow
        self.downs: list[_Flow] = []
        self.up_sum = 0.0  # sum of the rates of its uploads
        self.down_sum = 0.0
        self.done_at: float | None = None
        self.next_tick = float("inf")


@dataclass
class SwarmResult:
    time_s: float  # last receiver done (inf if some never finished)
    done_at: list[float | None]  # per receiver
    arrive: list[float]
    unfinished: int
    stalled_pieces: list[int]  # pieces some unfinished receiver reported unavailable
    events: int
    pieces_moved: int
    duplicates: int  # pieces received that were already held (endgame losers that still arrived)
    cancels: int
    refusals: int


class SwarmSim:
    def __init__(
        self,
        sc: Scenario,
        *,
        seed: int = 0,
        degree: int = 16,
        config: SchedulerConfig | None = None,
        max_time: float | None = None,
    ) -> None:
        self.sc = sc
        self.rng = random.Random(seed)
        self.degree = degree
        self.lat = sc.latency
        self.sizes = sc.piece_sizes
        k = len(self.sizes)
        self.nodes: list[_Node] = []
        for i, spec in enumerate(sc.nodes):
            s = Scheduler(self.sizes, range(k) if spec.seed else (), seed=seed * 1_000_003 + i, config=config)
            n = _Node(i, s, spec.up, spec.down, spec.arrive)
            n.fail_at = spec.fail_at
            self.nodes.append(n)
        self.by_name = {n.name: n for n in self.nodes}
        self.heap: list[tuple[float, int, int, Any, Any, Any]] = []
        self.msgs: deque[tuple[float, int, int, Any, Any, Any]] = deque()
        self.seq = 0
        self.present: list[_Node] = []
        self.events = 0
        self.moved = 0
        self.dups = 0
        self.cancels = 0
        self.refusals = 0
        self.receivers_left = sum(1 for s in sc.nodes if not s.seed)
        T = sc.model_bytes / sc.bandwidth
        last_arrival = max(s.arrive for s in sc.nodes)
        self.max_time = max_time if max_time is not None else last_arrival + 50 * T + 1.0

    # --- event plumbing ------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: object = None, b: object = None, c: object = None) -> None:
        """An event at any time (a flow's end, a tick, an arrival, a failure): into the heap."""
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b, c))

    def _send(self, t: float, kind: int, a: object = None, b: object = None, c: object = None) -> None:
        """A message, due at `t` = now + latency: into the FIFO. Every message takes the same latency,
        so messages fall due in the order they are sent, and a queue keeps them in (time, seq) order
        at O(1), where the heap paid O(log events) comparisons of tuples for each (about half of all
        events). `run` merges the two by (time, seq): the order of one heap, so the same decisions.
        Time can step back by a rounding error (a flow whose remaining bytes came out a hair below
        zero ends at an eta just before now); a message that would break the queue's order goes to
        the heap instead."""
        self.seq += 1
        msgs = self.msgs
        if msgs and t < msgs[-1][0]:
            heapq.heappush(self.heap, (t, self.seq, kind, a, b, c))
        else:
            msgs.append((t, self.seq, kind, a, b, c))

    def run(self) -> SwarmResult:
        # The loop allocates millions of short-lived container objects (events, flows, decisions) next
        # to a large live state, and the cyclic collector would walk that state again and again (4% of
        # a 1,000-node run); nothing the loop drops is part of a cycle (a flow leaves its nodes' maps
        # when it ends), so reference counting frees it all.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if enabled:
                gc.enable()

    def _run(self) -> SwarmResult:
        self._build_graph()
        for n in self.nodes:
            self._push(n.arrive, _ARRIVE, n)
            if n.fail_at is not None:
                self._push(n.fail_at, _FAIL, n)
        heap = self.heap
        msgs = self.msgs
        pop = heapq.heappop
        popleft = msgs.popleft
        max_time = self.max_time
        while self.receivers_left:
            if msgs and (not heap or msgs[0] < heap[0]):
                t, _, kind, a, b, c = popleft()
            elif heap:
                t, _, kind, a, b, c = pop(heap)
            else:
                break
            if t > max_time:
                break
            self.events += 1
            # direct calls, most frequent first (a table of bound methods costs a generic call each)
            if kind == _FLOW:
                if not a.done and t == a.eta:  # else superseded: a rate change pushed an earlier one
                    self._on_flow(t, a)
            elif kind == _REQ:
                self._on_req(t, a, b, c)
            elif kind == _RECV:
                self._on_recv(t, a, b, c)
            elif kind == _HAVE:
                self._on_have(t, a, b)
            elif kind == _REFUSE:
                self._on_refuse(t, a, b, c)
            elif kind == _TICK:
                self._on_tick(t, a)
            elif kind == _CANCEL:
                self._on_cancel(t, a, b, c)
            elif kind == _HANDED:
                self._on_handed(t, a, b)
            elif kind == _ARRIVE:
                self._on_arrive(t, a)
            elif kind == _BITFIELD:
                self._on_bitfield(t, a, b, c)
            elif kind == _LEFT:
                self._on_left(t, a, b)
            else:
                self._on_fail(t, a)
        recv = [n for n in self.nodes if not self.sc.nodes[n.idx].seed]
        done = [n.done_at for n in recv]
        stalled: set[int] = set()
        for n in recv:
            if n.done_at is None and n.alive:
                stalled.update(n.sched.unavailable())
        unfinished = sum(1 for d in done if d is None)
        return SwarmResult(
            time_s=max((d for d in done if d is not None), default=0.0) if not unfinished else float("inf"),
            done_at=done,
            arrive=[n.arrive for n in recv],
            unfinished=unfinished,
            stalled_pieces=sorted(stalled),
            events=self.events,
            pieces_moved=self.moved,
            duplicates=self.dups,
            cancels=self.cancels,
            refusals=self.refusals,
        )

    # --- decisions -----------------------------------------------------------------------------------

    def _apply(self, n: _Node, decisions: list[Decision], now: float) -> None:
        t = now + self.lat
        for d in decisions:
            if isinstance(d, Request):
                self._send(t, _REQ, self.by_name[d.peer], n, d.piece)
            elif isinstance(d, Serve):
                dst = self.by_name[d.peer]
                if dst.alive:
                    self._start_flow(n, dst, d.piece, now)
                else:  # raced with its failure; the peer_left on its way will clean up
                    self._apply(n, n.sched.upload_finished(d.peer, d.piece, now, False), now)
            elif isinstance(d, Cancel):
                self.cancels += 1
                self._send(t, _CANCEL, self.by_name[d.peer], n, d.piece)
            elif isinstance(d, HandedOut):
                self._send(t, _HANDED, n, d.piece)
            else:
                self.refusals += 1
                self._send(t, _REFUSE, self.by_name[d.peer], n, (d.piece, d.reason))

    def _tick(self, n: _Node, now: float) -> None:
        s = n.sched
        if s.wants_tick:
            self._apply(n, s.tick(now), now)
        nt = s.next_timeout()
        if nt is not None and nt < n.next_tick:
            n.next_tick = nt
            self._push(nt, _TICK, n)

    # --- flows ---------------------------------------------------------------------------------------

    def _start_flow(self, src: _Node, dst: _Node, piece: int, now: float) -> None:
        f = _Flow(src, dst, piece, self.sizes[piece], now)
        src.ups[(dst.name, piece)] = f
        dst.downs.append(f)
        self._fill_up(src, now)
        self._fill_down(dst, now)

    def _set_rate(self, f: _Flow, rate: float, now: float) -> None:
        old = f.rate
        if rate == old:
            return
        f.remaining -= old * (now - f.t_last)
        f.t_last = now
        f.rate = rate
        f.src.up_sum += rate - old
        f.dst.down_sum += rate - old
        if rate > 0:
            eta = now + f.remaining / rate
            if eta < f.eta:  # later etas are found when the earlier event fires
                f.eta = eta
                self._push(eta, _FLOW, f)

    def _fill_up(self, x: _Node, now: float) -> None:
        """Share x's uplink among its uploads, max-min fair, each capped by what its receiver has left."""
        ups = x.ups
        if len(ups) <= 1:
            if not ups:
                x.up_sum = 0.0
                return
            for f in ups.values():  # one flow: the loop below, unrolled (the same arithmetic)
                d = f.dst
                cap = d.down - d.down_sum + f.rate
                up = x.up
                self._set_rate(f, max(0.0, cap if cap < up else up), now)
            return
        flows = list(ups.values())
        order = sorted([(f.dst.down - f.dst.down_sum + f.rate, i) for i, f in enumerate(flows)])
        left = x.up
        n = len(flows)
        for _, i in order:
            f = flows[i]
            d = f.dst
            cap = d.down - d.down_sum + f.rate  # again: an earlier flow may have taken from d
            share = left / n
            r = max(0.0, cap if cap < share else share)
            self._set_rate(f, r, now)
            left -= r
            n -= 1

    def _fill_down(self, x: _Node, now: float) -> None:
        """Share x's downlink among its downloads, max-min fair, each capped by its sender's spare uplink."""
        flows = x.downs
        if len(flows) <= 1:
            if not flows:
                x.down_sum = 0.0
                return
            f = flows[0]  # one flow: the loop below, unrolled (the same arithmetic)
            s = f.src
            cap = s.up - s.up_sum + f.rate
            down = x.down
            self._set_rate(f, max(0.0, cap if cap < down else down), now)
            return
        order = sorted([(f.src.up - f.src.up_sum + f.rate, i) for i, f in enumerate(flows)])
        left = x.down
        n = len(flows)
        for _, i in order:
            f = flows[i]
            s = f.src
            cap = s.up - s.up_sum + f.rate
            share = left / n
            r = max(0.0, cap if cap < share else share)
            self._set_rate(f, r, now)
            left -= r
            n -= 1

    def _end_flow(self, f: _Flow, now: float) -> None:
        f.done = True
        src, dst = f.src, f.dst
        del src.ups[(dst.name, f.piece)]
        dst.downs.remove(f)
        src.up_sum -= f.rate
        dst.down_sum -= f.rate
        f.rate = 0.0
        self._fill_up(src, now)
        self._fill_down(dst, now)

    def _on_flow(self, now: float, f: _Flow) -> None:
        remaining = f.remaining - f.rate * (now - f.t_last)
        f.remaining = remaining
        f.t_last = now
        if remaining > 1e-9 * f.size + 1e-6:
            if f.rate > 0:
                f.eta = now + remaining / f.rate
                self._push(f.eta, _FLOW, f)
            else:
                f.eta = float("inf")
            return
        src, dst = f.src, f.dst
        self._end_flow(f, now)
        self.moved += 1
        self._apply(src, src.sched.upload_finished(dst.name, f.piece, now, True), now)
        self._tick(src, now)
        self._send(now + self.lat, _RECV, dst, src, f.piece)

    # --- membership ----------------------------------------------------------------------------------

    def _connect(self, a: _Node, b: _Node, now: float) -> None:
        a.peers[b.name] = b
        b.peers[a.name] = a
        a.sched.peer_joined(b.name, now)
        b.sched.peer_joined(a.name, now)
        if b.sched.held_count:
            self._send(now + self.lat, _BITFIELD, a, b, b.sched.have_mask)
        if a.sched.held_count:
            self._send(now + self.lat, _BITFIELD, b, a, a.sched.have_mask)

    def _find_peers(self, n: _Node, now: float) -> None:
        want = max(1, self.degree // 2) - len(n.peers)
        cap = 2 * self.degree
        present = self.present
        tries = 0
        while want > 0 and tries < 4 * self.degree and len(present) > 1:
            tries += 1
            m = present[self.rng.randrange(len(present))]
            if m is n or m.name in n.peers or len(m.peers) >= cap:
                continue
            self._connect(n, m, now)
            want -= 1
        if want > 0 and len(present) <= cap:  # small swarm: take whoever is left
            for m in present:
                if want <= 0:
                    break
                if m is not n and m.name not in n.peers:
                    self._connect(n, m, now)
                    want -= 1

    def _build_graph(self) -> None:
        """A random `degree`-regular graph (configuration model; loops and repeats dropped)."""
        nodes = self.nodes
        if len(nodes) <= self.degree + 1:
            for n in nodes:
                n.graph = [m for m in nodes if m is not n]
            return
        stubs = [n.idx for n in nodes for _ in range(self.degree)]
        self.rng.shuffle(stubs)
        adj: list[set[int]] = [set() for _ in nodes]
        for i in range(0, len(stubs) - 1, 2):
            a, b = stubs[i], stubs[i + 1]
            if a != b:
                adj[a].add(b)
                adj[b].add(a)
        for n in nodes:
            n.graph = [nodes[j] for j in sorted(adj[n.idx])]

    def _on_arrive(self, now: float, n: _Node) -> None:
        if not n.alive:
            return
        n.present = True
        self.present.append(n)
        for m in n.graph:
            if m.present and m.alive and m.name not in n.peers:
                self._connect(n, m, now)
        if len(n.peers) < self.degree // 2:
            self._find_peers(n, now)
        self._tick(n, now)

    def _on_bitfield(self, now: float, n: _Node, frm: _Node, mask: int) -> None:
        if not n.alive or frm.name not in n.peers:
            return
        n.sched.peer_bitfield_mask(frm.name, mask, now)
        self._tick(n, now)

    def _on_fail(self, now: float, n: _Node) -> None:
        if not n.alive:
            return
        n.alive = False
        if n.present:
            self.present.remove(n)
        for f in list(n.ups.values()):
            f.done = True
            f.dst.downs.remove(f)
            f.dst.down_sum -= f.rate
            self._fill_down(f.dst, now)
        for f in list(n.downs):
            f.done = True
            del f.src.ups[(n.name, f.piece)]
            f.src.up_sum -= f.rate
            self._fill_up(f.src, now)
        n.ups.clear()
        n.downs.clear()
        for m in list(n.peers.values()):
            self._send(now + self.lat, _LEFT, m, n)
        if n.done_at is None and not self.sc.nodes[n.idx].seed:
            self.receivers_left -= 1  # a receiver that dies is not waited for

    def _on_left(self, now: float, n: _Node, gone: _Node) -> None:
        if not n.alive:
            return
        n.peers.pop(gone.name, None)
        self._apply(n, [d for d in n.sched.peer_left(gone.name, now) if not isinstance(d, Cancel)], now)
        if len(n.peers) < self.degree // 2 and n.present:
            self._find_peers(n, now)
        self._tick(n, now)

    # --- messages ------------------------------------------------------------------------------------

    def _on_req(self, now: float, up: _Node, frm: _Node, piece: int) -> None:
        if not up.alive or not frm.alive:
            return
        self._apply(up, up.sched.upload_requested(frm.name, piece, now), now)

    def _on_cancel(self, now: float, up: _Node, frm: _Node, piece: int) -> None:
        if not up.alive:
            return
        f = up.ups.get((frm.name, piece))
        if f is not None:
            self._end_flow(f, now)
            self._apply(up, up.sched.upload_finished(frm.name, piece, now, False), now)
        else:
            up.sched.upload_cancelled(frm.name, piece, now)
        self._tick(up, now)

    def _on_refuse(self, now: float, n: _Node, frm: _Node, info: tuple[int, str]) -> None:
        if not n.alive:
            return
        n.sched.piece_failed(frm.name, info[0], now, "refused")
        self._tick(n, now)

    def _on_recv(self, now: float, n: _Node, frm: _Node, piece: int) -> None:
        if not n.alive:
            return
        s = n.sched
        if s.has(piece):
            self.dups += 1
        decisions = s.piece_received(frm.name, piece, now)
        if decisions:
            self._apply(n, decisions, now)
        self._send(now + self.lat, _HAVE, n, piece)
        if n.done_at is None and s.complete:
            n.done_at = now
            if not self.sc.nodes[n.idx].seed:
                self.receivers_left -= 1
        self._tick(n, now)

    def _on_have(self, now: float, n: _Node, piece: int) -> None:
        if not n.alive:
            return
        name = n.name
        for m in n.peers.values():
            s = m.sched
            if s.peer_have(name, piece, now) and s.wants_tick:
                self._apply(m, s.tick(now), now)
                nt = s.next_timeout()
                if nt is not None and nt < m.next_tick:
                    m.next_tick = nt
                    self._push(nt, _TICK, m)

    def _on_handed(self, now: float, n: _Node, piece: int) -> None:
        if not n.alive:
            return
        for m in n.peers.values():
            m.sched.peer_handed_out(n.name, piece, now)

    def _on_tick(self, now: float, n: _Node) -> None:
        if not n.alive:
            return
        if now >= n.next_tick:
            n.next_tick = float("inf")
        self._apply(n, n.sched.tick(now), now)
        self._tick(n, now)


def run_swarm(
    sc: Scenario, *, seed: int = 0, degree: int = 16, config: SchedulerConfig | None = None
) -> SwarmResult:
    return SwarmSim(sc, seed=seed, degree=degree, config=config).run()
