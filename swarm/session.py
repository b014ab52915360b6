"""The peer session: links, handshake, acceptance and path choice of a node's peers, without IO.

`Members` is a sans-IO state machine. It consumes what arrives on a node's control links (raw frames,
with the time) and returns `Action`s: frames to put on a link, links to close, and events for the node
(a peer accepted, checksums adopted, a message for the scheduler). It never touches a socket, a thread, a
clock, the scheduler or a transport; swarm/node.py owns those and carries the actions out in order. So
the whole life of a peer can be run through an in-memory pair of `Members` (tests/unit/test_session.py).
The one thing called out of it is the path policy, `choose` (the node passes its transport's, which
remembers the choice for the pair; tests pass `paths.choose_path`, a pure function).

Entities:

- A `Link` is one control connection: one this node dialed (`dialer`), or one a peer opened to this
  node's ROUTER (keyed by its ZeroMQ identity). Each runs a `protocol.Session` (nonces, Ed25519 keys,
  sequence numbers, with a token MACs): a frame that fails it is answered `Error("protocol")` on a
  listened link (whose identity is then cut off after `MAX_PROTOCOL_ERRORS`) and ends a dialed one.
- A `Peer` is one member that sent a valid Hello over a link whose handshake proved its id. It may hold
  several links (both ends may dial); frames to it leave on its first dialed link, else its first
  listened one.

Rules (everything that decides whether a peer is used lives here):

1. Nothing but the handshake and an unauthenticated `Error` (which only ends our dial) is read before a
   link's session is up; then a Hello under another id than the session's is refused.
2. Until its Hello, a link gets answers only to `StatusQuery` and `Ping`; `Error("busy")` and a refusal
   (`wrong_key`, `wrong_transport`) end our dial (busy: for a while; a refusal: for good).
3. A Hello is refused for: our own id (a loop back to ourselves), another swarm key, no data path in
   common (`choose`, per pair, swarm/transport/paths.py), or a full node (`max_peers`, or a peer shunned
   for a while). A listened link is answered with an `Error` (`wrong_key`, `wrong_transport`, `busy`);
   a dialed one is closed (our own id: for good; busy: for a while), except that no common path is
   answered on it too, so both ends note why.
4. A peer is CHECKING until its manifest digest and (when both know it) content digest match ours. A
   different manifest is fetched (`ManifestQuery`) only to report a readable difference, then refused.
   A `ManifestReply` is read only as the answer to our own query and compared in wire form.
5. Checksums: a member without them takes them, with a token, from the first peer whose content digest
   matches; in an open swarm (no token) only those of the content digest a strict majority of the
   members met announce, once two agree or after `quorum_s` (`decide`).
6. What a peer's messages do depends on its state: the table `ON_MESSAGE`. Before acceptance, haves are
   buffered (and handed over with `Accepted`), transport set-up messages pass through; afterwards every
   piece message goes to the node (`Deliver`). A REFUSED peer is kept (so its Hello is not checked
   again) but nothing it sends is used; refusing an accepted peer tells the node to let it go.
7. A peer's state changes only through `TRANSITIONS`; any other change is a bug (`SwarmError`).

Bounds, before authentication: listened links without a peer (handshakes in progress, `swarm status`
clients) at most `MAX_LOOSE_LINKS` (oldest forgotten); identities cut off at most `MAX_BAD_IDENTS`;
remembered refusal reasons `MAX_MISMATCHES`; open-swarm votes `MAX_VOTES` and distinct checksum lists
`MAX_OFFERED`. Limits: the session keeps no clock of its own; liveness (pings, timeouts) is the node's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from swarm import protocol as P
from swarm.errors import AuthError, ManifestError, ManifestMismatchError, ProtocolError, SwarmError
from swarm.identity import Identity
from swarm.manifest import Manifest, SwarmKey, content_digest
from swarm.transport.paths import Offer, choose_path

log = logging.getLogger("swarm.session")

#: Error codes by which a member of another swarm (or layout) refuses our Hello.
REFUSAL_CODES = ("wrong_key", "wrong_transport")
MAX_PROTOCOL_ERRORS = 20
MAX_BAD_IDENTS = 4096
MAX_LOOSE_LINKS = 1024
MAX_MISMATCHES = 256
MAX_VOTES = 1024
MAX_OFFERED = 16
MAX_PEX = 32


class PeerState(Enum):
    CHECKING = "checking"  # Hello taken; manifest and checksums being compared
    ACCEPTED = "accepted"  # known to the scheduler: pieces flow
    REFUSED = "refused"  # kept so that its Hello is not checked again; never used
    GONE = "gone"  # dropped by the node (goodbye, silence, broken channel, room for others)


S = PeerState
#: (state, event) -> next state. Events: accept (checks passed), refuse (a check failed, or the peer
#: refused us), recheck (this node's checksums changed: it became a seed), leave (dropped).
TRANSITIONS: Mapping[tuple[PeerState, str], PeerState] = {
    (S.CHECKING, "accept"): S.ACCEPTED,
    (S.CHECKING, "refuse"): S.REFUSED,
    (S.CHECKING, "recheck"): S.CHECKING,
    (S.ACCEPTED, "refuse"): S.REFUSED,
    (S.ACCEPTED, "recheck"): S.CHECKING,
    (S.REFUSED, "refuse"): S.REFUSED,
    (S.CHECKING, "leave"): S.GONE,
    (S.ACCEPTED, "leave"): S.GONE,
    (S.REFUSED, "leave"): S.GONE,
}

_ANY_STATE = {
    P.Ping: "pong",
    P.ManifestQuery: "manifest",
    P.ManifestReply: "compare",
    P.Error: "error",
}
_PIECES = (P.Batch, P.Bitfield, P.Have, P.HandedOut, P.Request, P.Cancel, P.Reject, P.Channel, P.Sent)
#: What a message from a peer does, by the peer's state (absent: ignored). pong: answer a Ping on a
#: listened link; manifest: answer with ours; compare: read the answer to our ManifestQuery; error: log,
#: and refuse on a refusal code; early: buffer its haves (and pass a Batch's completions to the
#: transport); transport: to the transport (its channel is set up during the checks); deliver: to the
#: node (scheduler, transport); leave: the peer said goodbye.
ON_MESSAGE: Mapping[PeerState, Mapping[type[P.Message], str]] = {
    S.CHECKING: {
        **_ANY_STATE,
        P.Bitfield: "early",
        P.Have: "early",
        P.Batch: "early",
        P.Channel: "transport",
        P.Sent: "transport",
    },
    S.ACCEPTED: {**_ANY_STATE, **dict.fromkeys(_PIECES, "deliver"), P.Goodbye: "leave"},
    S.REFUSED: _ANY_STATE,
    S.GONE: {},
}


# --- links and peers ----------------------------------------------------------------------------


@dataclass(eq=False)
class Link:
    """One control connection and its protocol session. `handle` is the node's (the dialed socket, or
    the ROUTER identity); `host`/`port` the dialed address ("" / 0 for a listened link)."""

    session: P.Session
    handle: Hashable
    host: str = ""
    port: int = 0
    started: float = 0.0
    peer: str | None = None
    closed: bool = False

    @property
    def dialer(self) -> bool:
        return self.session.dialer

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(eq=False)
class Peer:
    id: str
    hello: P.Hello
    state: PeerState = PeerState.CHECKING
    links: list[Link] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    #: the data path chosen for this pair (swarm/transport/paths.py)
    path: str = ""
    refused: str = ""
    last_seen: float = 0.0
    last_sent: float = 0.0
    # the node's accounting of this peer
    data_connected: bool = False
    bytes_from: int = 0
    bytes_to: int = 0
    failures: int = 0
    #: pieces announced before the peer was accepted (a Bitfield can overtake our manifest check)
    early_have: set[int] = field(default_factory=set)
    #: a ManifestQuery to this peer awaits its answer: the only state in which a ManifestReply is read
    manifest_asked: bool = False

    @property
    def accepted(self) -> bool:
        return self.state is PeerState.ACCEPTED

    @property
    def dials(self) -> list[Link]:
        return [link for link in self.links if link.dialer]

    @property
    def name(self) -> str:
        return f"{self.id}@{self.hosts[0] if self.hosts else '?'}"

    def fire(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise SwarmError(f"peer {self.id}: no transition from {self.state.value} on {event!r}") from None


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Put a frame on `link`: `data` is a whole frame (`framed`: the handshake's), or a payload sealed by
    the link's session only when it leaves (`frame()`), so sequence numbers follow the order of sending.
    `what`: the message type, for logs."""

    link: Link
    data: bytes
    what: str
    framed: bool = False

    def frame(self) -> bytes:
        return self.data if self.framed else self.link.session.seal(self.data)


@dataclass(frozen=True, slots=True)
class Close:
    """End a dialed link; `retry`: "soon" (the dial back-off), "busy" (the busy back-off) or "never"."""

    link: Link
    retry: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame on `link` failed the protocol's checks (nothing of it was used)."""

    link: Link
    error: ProtocolError


@dataclass(frozen=True, slots=True)
class StatusAsked:
    """Answer `link` with this node's status (a `StatusReply`; only the node knows it)."""

    link: Link


@dataclass(frozen=True, slots=True)
class Met:
    """`peer`'s Hello was taken on `link`: the node learns its address and the peers it lists."""

    peer: Peer
    link: Link


@dataclass(frozen=True, slots=True)
class BitfieldWanted:
    """Send our bitfield on `link` (an accepted peer opened another link)."""

    link: Link


@dataclass(frozen=True, slots=True)
class Accepted:
    """The peer passed every check: join it to the scheduler with the haves it announced meanwhile,
    set its data channel up and send it our bitfield."""

    peer: Peer
    early_have: frozenset[int]


@dataclass(frozen=True, slots=True)
class Refused:
    """The peer is no longer used; `was_accepted`: the scheduler knew it (the node lets it go)."""

    peer: Peer
    why: str
    was_accepted: bool


@dataclass(frozen=True, slots=True)
class Adopted:
    """These piece checksums are now the truth (the transport verifies against them)."""

    checksums: list[str]


@dataclass(frozen=True, slots=True)
class Disagreement:
    """Open swarm: our content has no majority among the members met; a running fetch fails with it."""

    error: ManifestMismatchError


@dataclass(frozen=True, slots=True)
class ToTransport:
    """A data-plane set-up message from a peer still being checked."""

    peer: Peer
    msg: P.Message


@dataclass(frozen=True, slots=True)
class Deliver:
    """A piece message from an accepted peer, for the scheduler and the transport."""

    peer: Peer
    msg: P.Message


@dataclass(frozen=True, slots=True)
class Left:
    """The peer said goodbye: drop it."""

    peer: Peer
    why: str


Action = (
    Send
    | Close
    | Rejected
    | StatusAsked
    | Met
    | BitfieldWanted
    | Accepted
    | Refused
    | Adopted
    | Disagreement
    | ToTransport
    | Deliver
    | Left
)


# --- the machine --------------------------------------------------------------------------------


Choose = Callable[[str, Offer], "str | None"]


class Members:
    """Every link and peer of one node, and the checks that decide which peers are used."""

    def __init__(
        self,
        *,
        identity: Identity,
        codec: P.Codec,
        key: SwarmKey,
        manifest: Manifest,
        checksums: list[str] | None,
        offer: Offer | None = None,
        transport: str = "tcp",
        choose: Choose | None = None,
        max_peers: int = 64,
        quorum_s: float = 1.0,
    ) -> None:
        """`choose(peer, offer)`: the path of a pair (default: `paths.choose_path` with our `offer`);
        `quorum_s`: how long an open swarm waits for a second member to agree on the checksums."""
        self.identity = identity
        self.id = identity.id
        self.codec = codec
        self.key = key
        self.manifest = manifest
        self.checksums = checksums
        #: what this member offers (swarm/transport/paths.py); the node sets it once its transport is bound
        self.offer = offer or Offer()
        self.transport = transport
        self.choose: Choose = choose or (lambda _peer, theirs: choose_path(self.offer, theirs))
        self.max_peers = max_peers
        self.quorum_s = quorum_s
        self.role = "seed" if checksums is not None else "leecher"
        #: the data-plane part of our Hello (transport parameters, addresses, control port)
        self.data: dict[str, Any] = {}
        self.peers: dict[str, Peer] = {}
        self.mismatches: dict[str, str] = {}
        #: open swarm: the content digest each member announced, the checksums offered per digest
        self.votes: dict[str, str] = {}
        self.offered: dict[str, list[str]] = {}
        self.first_vote: float | None = None
        self._listened: OrderedDict[Hashable, Link] = OrderedDict()
        self._bad: dict[Hashable, int] = {}
        self._shunned: dict[str, float] = {}
        self._pieces = len(manifest.pieces)

    # -- links

    def dial(self, handle: Hashable, host: str, port: int, now: float) -> tuple[Link, list[Action]]:
        """A new dialed link and its first frame (the Hello follows once the session is up)."""
        link = Link(P.Session(self.codec, self.identity, dialer=True), handle, host, port, now)
        return link, [Send(link, link.session.open(), "open", framed=True)]

    def listened(self, handle: Hashable) -> Link | None:
        """The link of a ROUTER identity (new ones are created, the oldest loose ones forgotten); None
        when it sent too many bad frames."""
        if self._bad.get(handle, 0) >= MAX_PROTOCOL_ERRORS:
            return None
        link = self._listened.get(handle)
        if link is None:
            link = Link(P.Session(self.codec, self.identity, dialer=False), handle)
            self._listened[handle] = link
            loose = [h for h, x in self._listened.items() if x.peer is None]
            for old in loose[: max(0, len(loose) - MAX_LOOSE_LINKS)]:
                del self._listened[old]
        return link

    def is_member(self, handle: Hashable) -> bool:
        """A ROUTER identity that belongs to a peer this node keeps."""
        link = self._listened.get(handle)
        return link is not None and link.peer is not None

    def unlink(self, link: Link) -> None:
        """The node closed this link (or will now)."""
        link.closed = True
        peer = self.peers.get(link.peer) if link.peer else None
        if peer is not None and link in peer.links:
            peer.links.remove(link)

    def receive(self, link: Link, frame: bytes, now: float) -> list[Action]:
        """Everything one frame on `link` leads to."""
        session = link.session
        try:
            msg, answer = session.receive(frame, self._pieces)
        except ProtocolError as e:
            return self._rejected(link, e)
        out: list[Action] = []
        if answer is not None:
            out.append(Send(link, answer, "handshake", framed=True))
            if link.dialer:  # our handshake is done: say who we are
                out.append(Send(link, P.pack(self.hello()), P.Hello.TYPE))
        if msg is None:
            return out
        if not session.established:  # an unauthenticated refusal of our handshake (rule 1)
            why = getattr(msg, "message", "")
            log.warning("%s:%d refused the session: %s", link.host, link.port, why)
            self._note_mismatch(f"{link.host}:{link.port}", f"refused the session: {why}")
            return [*out, self._close(link, "soon")]
        return out + self._handle(link, msg, now)

    def _rejected(self, link: Link, e: ProtocolError) -> list[Action]:
        if link.dialer:
            log.warning("dropping link to %s:%d: %s", link.host, link.port, e)
            if isinstance(e, AuthError):
                self._note_mismatch(f"{link.host}:{link.port}", str(e))
            return [Rejected(link, e), self._close(link, "soon")]
        if len(self._bad) >= MAX_BAD_IDENTS:
            self._bad.clear()  # bounded; a client cut off long ago may talk again
        self._bad[link.handle] = self._bad.get(link.handle, 0) + 1
        return [Rejected(link, e), *self.reply(link, P.Error("protocol", str(e)[:500]))]

    def _close(self, link: Link, retry: str) -> Close:
        self.unlink(link)
        return Close(link, retry)

    # -- sending

    def reply(self, link: Link, msg: P.Message) -> list[Action]:
        if link.closed:
            return []
        return [Send(link, P.pack(msg), msg.TYPE)]

    def send(self, peer: Peer, msg: P.Message, now: float, payload: bytes | None = None) -> list[Action]:
        """`msg` to a peer on its first live link, sealed by that link's session (`payload`: `msg` packed
        already, when one message goes to many peers)."""
        peer.last_sent = now
        link = next((x for x in peer.links if x.dialer and not x.closed), None)
        if link is None:
            link = next((x for x in peer.links if x.session.established and not x.closed), None)
        if link is None:
            return []
        return [Send(link, P.pack(msg) if payload is None else payload, msg.TYPE)]

    def hello(self) -> P.Hello:
        data = dict(self.data)
        data["paths"] = self.offer.to_wire()
        data["peers"] = [
            [p.id, p.hosts[0], int(p.hello.data.get("ctl", 0))]
            for p in list(self.peers.values())[:MAX_PEX]
            if p.accepted and p.hosts and isinstance(p.hello.data.get("ctl"), int)
        ]
        return P.Hello(
            peer_id=self.id,
            key=self.key.to_wire(),
            key_digest=self.key.digest,
            manifest_digest=self.manifest.digest,
            content_digest=content_digest(self.checksums) if self.checksums is not None else "",
            role=self.role,
            transport=self.transport,
            data=data,
        )

    # -- handling one message

    def _handle(self, link: Link, msg: P.Message, now: float) -> list[Action]:
        if isinstance(msg, P.StatusQuery):
            return [StatusAsked(link)]
        if isinstance(msg, P.Hello):
            if msg.peer_id != link.session.peer_id:  # rule 1: nobody speaks for another member
                return self.reply(
                    link, P.Error("protocol", "Hello's peer id is not the one of the session's key")
                )
            return self._on_hello(link, msg, now)
        peer = self.peers.get(link.peer) if link.peer else None
        if peer is None:
            return self._before_hello(link, msg)
        peer.last_seen = now
        what = ON_MESSAGE[peer.state].get(type(msg), "")
        if what == "pong":
            return self.reply(link, P.Ping()) if not link.dialer else []
        if what == "manifest":
            if self.checksums is None:
                return self.send(peer, P.Error("no_manifest", "this node has no checksums yet"), now)
            return self.send(peer, P.ManifestReply(self.manifest.to_wire(), self.checksums), now)
        if what == "compare":
            assert isinstance(msg, P.ManifestReply)
            if not peer.manifest_asked:  # unsolicited or repeated: not worth a look
                log.debug("ignoring a manifest from %s that was not asked for", peer.name)
                return []
            peer.manifest_asked = False
            return self._on_manifest(peer, msg, now)
        if what == "error":
            assert isinstance(msg, P.Error)
            log.warning("peer %s answered %s: %s", peer.name, msg.code, msg.message)
            if msg.code in ("wrong_key", "wrong_transport", "auth"):
                return self._refuse(peer, msg.message)
            return []
        if what == "early":
            if isinstance(msg, P.Bitfield):
                peer.early_have = set(msg.pieces())
            elif isinstance(msg, P.Have):
                peer.early_have.add(msg.piece)
            elif isinstance(msg, P.Batch):
                peer.early_have.update(msg.have)
                return [ToTransport(peer, P.Sent(piece, True)) for piece in msg.sent]
            return []
        if what == "transport":
            return [ToTransport(peer, msg)]
        if what == "deliver":
            return [Deliver(peer, msg)]
        if what == "leave":
            assert isinstance(msg, P.Goodbye)
            return [Left(peer, f"said goodbye ({msg.reason})")]
        return []

    def _before_hello(self, link: Link, msg: P.Message) -> list[Action]:
        """Rule 2."""
        if isinstance(msg, P.Ping):
            return self.reply(link, P.Ping())
        if isinstance(msg, P.Error) and link.dialer and msg.code == "busy":
            return [self._close(link, "busy")]
        if isinstance(msg, P.Error) and link.dialer and msg.code in REFUSAL_CODES:
            # A member of another swarm answered our Hello: remember why, for the fetch's error.
            self._note_mismatch(f"{link.host}:{link.port}", msg.message)
            log.warning("not using %s:%d: %s", link.host, link.port, msg.message)
            return [self._close(link, "never")]
        if not isinstance(msg, (P.Error, P.Goodbye)):
            return self.reply(link, P.Error("hello_first", "send Hello before anything else"))
        return []

    def _on_hello(self, link: Link, msg: P.Hello, now: float) -> list[Action]:
        """Rule 3, then the checks of rule 4."""
        if msg.peer_id == self.id:
            return [self._close(link, "never")] if link.dialer else []
        if msg.key_digest != self.key.digest:
            try:
                theirs = SwarmKey.from_wire(msg.key).describe()
            except ManifestError:
                theirs = msg.key_digest
            self._note_mismatch(msg.peer_id, f"other swarm key: {theirs}")
            if link.dialer:
                return [self._close(link, "soon")]
            return self.reply(link, P.Error("wrong_key", f"other swarm key: {self.key.describe()}"))
        theirs_offer = Offer.from_wire(msg.data.get("paths"), fallback=msg.transport)
        path = self.choose(msg.peer_id, theirs_offer)
        if path is None:
            mine = ", ".join(sorted(self.offer.transports))
            offered = ", ".join(sorted(theirs_offer.transports)) or "none"
            self._note_mismatch(msg.peer_id, f"no data path in common: it offers {offered}, this node {mine}")
            return self.reply(
                link, P.Error("wrong_transport", f"no data path in common: this node offers {mine}")
            )
        peer = self.peers.get(msg.peer_id)
        if peer is None and (len(self.peers) >= self.max_peers or self._shunned.get(msg.peer_id, 0.0) > now):
            if link.dialer:
                return [self._close(link, "busy")]
            return self.reply(link, P.Error("busy", f"this node has {self.max_peers} peers; try others"))
        if peer is None:
            peer = self.peers[msg.peer_id] = Peer(msg.peer_id, msg, last_seen=now)
        peer.hello = msg
        peer.path = path
        peer.last_seen = now
        hosts = [h for h in list_field(msg.data, "addrs") if isinstance(h, str)]
        link.peer = msg.peer_id
        if link not in peer.links:
            peer.links.append(link)
        out: list[Action] = []
        if link.dialer:
            hosts = [link.host, *[h for h in hosts if h != link.host]]
        else:
            out += self.reply(link, self.hello())
        if hosts:
            peer.hosts = hosts
        out.append(Met(peer, link))
        if peer.state is PeerState.CHECKING:
            out += self._check(peer, now)
        elif peer.accepted and not link.dialer:
            out.append(BitfieldWanted(link))
        return out

    # -- acceptance (rules 4 and 5)

    def _check(self, peer: Peer, now: float) -> list[Action]:
        """Accept the peer once its manifest (and, for a leecher, the checksums) are known to match."""
        h = peer.hello
        if h.manifest_digest != self.manifest.digest:
            return self._ask_manifest(peer, now)  # only to report a readable difference
        out: list[Action] = []
        if h.content_digest and not self.codec.authenticated:
            out += self._vote(peer.id, h.content_digest, now)
        if (
            h.content_digest
            and self.checksums is not None
            and h.content_digest != content_digest(self.checksums)
        ):
            return out + self._refuse(
                peer, "holds different bytes for the same manifest (another checkpoint?)"
            )
        if self.checksums is None:
            if h.content_digest:
                out += self._ask_manifest(peer, now)
            return out  # a leecher without checksums: wait for one that has them
        return out + self._accept(peer)

    def _ask_manifest(self, peer: Peer, now: float) -> list[Action]:
        if peer.manifest_asked:
            return []
        peer.manifest_asked = True
        return self.send(peer, P.ManifestQuery(), now)

    def _on_manifest(self, peer: Peer, msg: P.ManifestReply, now: float) -> list[Action]:
        try:
            # Compared in wire form: a peer's manifest is never cut into pieces here, so an answer costs
            # at most the size of our own manifest, whatever piece count it claims.
            difference = self.manifest.diff_wire(msg.manifest)
        except ManifestError as e:
            return self._refuse(peer, f"sent a malformed manifest: {e}")
        if difference is not None:
            self._note_mismatch(peer.id, difference)
            return self._refuse(peer, f"holds a different manifest: {difference}")
        digest = peer.hello.content_digest
        if len(msg.checksums) != self._pieces or (digest and content_digest(msg.checksums) != digest):
            return self._refuse(peer, "sent checksums that do not match its content digest")
        if self.checksums is None:
            if self.codec.authenticated:
                return self.adopt(list(msg.checksums), now)  # a token holder is trusted with the checksums
            if digest and (digest in self.offered or len(self.offered) < MAX_OFFERED):
                self.offered.setdefault(digest, list(msg.checksums))
                return self.decide(now)
            return []
        if msg.checksums != self.checksums:
            return self._refuse(peer, "holds different bytes for the same manifest (another checkpoint?)")
        if peer.state is PeerState.CHECKING:
            return self._accept(peer)
        return []

    def adopt(self, checksums: list[str], now: float) -> list[Action]:
        """Take these piece checksums as the truth, then accept (or refuse) every peer waiting for them."""
        self.checksums = checksums
        out: list[Action] = [Adopted(checksums)]
        for other in list(self.peers.values()):
            if other.state is PeerState.CHECKING:
                out += self._check(other, now)
        # Leechers that met this node before it had checksums are waiting for a peer that has them:
        # a new Hello (with the content digest, and this node's peers, the seed among them) lets
        # them take the checksums from here and dial the seed even if they missed its mDNS answer
        # (a responder multicasts a record at most once a second, RFC 6762 section 6).
        hello = self.hello()
        for other in list(self.peers.values()):
            if other.state is not PeerState.REFUSED and not other.hello.content_digest:
                out += self.send(other, hello, now)
        return out

    def become_seed(self, checksums: list[str], now: float) -> list[Action]:
        """The node now holds the whole model (loaded elsewhere): check every peer again and tell it."""
        self.checksums = checksums
        self.role = "seed"
        out: list[Action] = []
        for peer in list(self.peers.values()):
            if peer.state is PeerState.REFUSED:
                continue
            peer.fire("recheck")
            out += self._check(peer, now)
            out += self.send(peer, self.hello(), now)
        return out

    def _accept(self, peer: Peer) -> list[Action]:
        peer.fire("accept")
        early, peer.early_have = frozenset(peer.early_have), set()
        log.debug("accepted peer %s (%s)", peer.name, peer.hello.role)
        return [Accepted(peer, early)]

    def refuse(self, peer: Peer, why: str) -> list[Action]:
        """Stop using `peer` for good (its dialed links are closed, never dialed again)."""
        return self._refuse(peer, why)

    def _refuse(self, peer: Peer, why: str) -> list[Action]:
        was_accepted = peer.accepted
        peer.fire("refuse")
        peer.refused = why
        if peer.id not in self.mismatches:
            self._note_mismatch(peer.id, why)
        return [Refused(peer, why, was_accepted), *(self._close(link, "never") for link in peer.dials)]

    def forget(self, peer: Peer) -> list[Action]:
        """The node drops `peer`: its listened links are forgotten, its dialed links closed."""
        peer.fire("leave")
        self.peers.pop(peer.id, None)
        for link in list(peer.links):
            if not link.dialer:
                self._listened.pop(link.handle, None)
        return [self._close(link, "soon") for link in peer.dials]

    def shun(self, peer_id: str, until: float, now: float) -> None:
        """Answer `peer_id`'s Hello "busy" until `until` (it was dropped to make room)."""
        if len(self._shunned) > 4 * self.max_peers:
            self._shunned = {k: t for k, t in self._shunned.items() if t > now}
        self._shunned[peer_id] = until

    def _note_mismatch(self, who: str, why: str) -> None:
        """Remember why a member is unusable (for the fetch's error); bounded against floods."""
        if who in self.mismatches or len(self.mismatches) < MAX_MISMATCHES:
            self.mismatches[who] = why

    # -- open swarm: which checksums to believe (rule 5)

    def _vote(self, peer_id: str, digest: str, now: float) -> list[Action]:
        if peer_id not in self.votes and len(self.votes) >= MAX_VOTES:
            return []
        self.votes[peer_id] = digest
        if self.first_vote is None:
            self.first_vote = now
        if (
            self.checksums is not None
            and self.role == "leecher"
            and not self.majority(content_digest(self.checksums))
        ):
            return [Disagreement(self.disagreement())]
        return []

    def majority(self, digest: str) -> bool:
        held = sum(1 for d in self.votes.values() if d == digest)
        return held > len(self.votes) - held

    def decide(self, now: float) -> list[Action]:
        """Open swarm, no checksums yet: take those of the digest a strict majority of the members met
        announce, once two of them agree or after `quorum_s` (see docs/reliability.md)."""
        if self.checksums is not None or self.codec.authenticated or self.first_vote is None:
            return []
        for digest, checksums in self.offered.items():
            agree = sum(1 for d in self.votes.values() if d == digest)
            if self.majority(digest) and (agree >= 2 or now - self.first_vote >= self.quorum_s):
                log.warning(
                    "open swarm (no SWARM_TOKEN): using the checksums %d of the %d members met agree on",
                    agree,
                    len(self.votes),
                )
                return self.adopt(checksums, now)
        return []

    def disagreement(self) -> ManifestMismatchError:
        counts: dict[str, int] = {}
        for d in self.votes.values():
            counts[d] = counts.get(d, 0) + 1
        shown = ", ".join(f"{n} member(s) hold content {d[:12]}" for d, n in sorted(counts.items()))
        return ManifestMismatchError(
            f"the members of {self.key.describe()} disagree on its bytes, and no content has a majority",
            difference=shown,
            hint="this swarm is open (no SWARM_TOKEN), so anyone on the LAN can join it; set SWARM_TOKEN "
            "(or SWARM_TOKEN_FILE) on every instance; the loader falls back to disk",
        )


def list_field(data: Mapping[str, Any], name: str) -> list[Any]:
    """A list field of a peer's Hello.data; [] when missing or not a list (the protocol only checks that
    `data` is a bounded plain map, so its fields are as the peer sent them)."""
    value = data.get(name)
    return value if isinstance(value, list) else []
