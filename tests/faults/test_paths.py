"""The data path of each pair, chosen from the offers in the Hellos, between real nodes on loopback (CPU).

A member forced to TCP and a member on "auto" form one swarm over TCP, and each reports the path of the
pair; a member that offers no path in common is refused with `wrong_transport`, saying what each side
offers, and never becomes a peer.
"""

from __future__ import annotations

import time

from swarm import protocol as P
from swarm.cli import _fmt
from swarm.manifest import content_digest
from swarm.transport.tcp import TcpTransport
from tests.faults.attack import Member
from tests.faults.harness import closing, leecher_node, peers_of, seed_node, wrong_bytes


def test_forced_tcp_and_auto_members_form_one_swarm() -> None:
    with closing(seed_node(transport=TcpTransport())) as (seed,):
        with closing(leecher_node(peers=peers_of(seed))) as (leecher,):
            assert leecher.transport.name == "auto"
            report = leecher.fetch()
            assert wrong_bytes(dict(leecher.tensors)) == 0
            assert report.total_bytes == leecher.manifest.total_bytes
            assert leecher.status()["paths"] == {seed.id: "tcp"}
            assert seed.status()["paths"] == {leecher.id: "tcp"}
            assert _fmt("paths", seed.status()["paths"]) == f"{leecher.id[:6]}: tcp"


def test_member_without_a_common_path_is_refused() -> None:
    with closing(seed_node()) as (seed,):
        client = Member(seed.control_port, None)
        try:
            # A GPU member of another host that runs NCCL only: nothing in common with a CPU member.
            hello = P.Hello(
                peer_id=client.id,
                key=seed.key.to_wire(),
                key_digest=seed.key.digest,
                manifest_digest=seed.manifest.digest,
                content_digest=content_digest(seed.checksums or []),
                role="leecher",
                transport="auto",
                data={
                    "paths": {
                        "host": "boot/elsewhere",
                        "gpu": "GPU-1",
                        "peer_gpus": [],
                        "transports": ["nccl"],
                    }
                },
            )
            client.send(hello)
            replies = client.received(wait_s=2.0)
            assert replies and isinstance(replies[0], P.Error), replies
            assert replies[0].code == "wrong_transport"
            assert "no data path in common" in replies[0].message and "tcp" in replies[0].message
            time.sleep(0.2)
            assert seed.status()["peers"] == 0
        finally:
            client.close()
