"""`dns:NAME:PORT` and `dns-srv:NAME` peers against a real DNS server: a dnsmasq that the test starts on
loopback on a free port, serving several A/AAAA records for one name (as a headless Kubernetes Service
does) and SRV records. scripts/setup.sh installs dnsmasq (Debian's dnsmasq-base) where it can."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarm import cli, dnspeers
from swarm.node import Node, NodeConfig
from swarm.synthetic import synthetic_key, synthetic_tensors
from tests.loopback import free_port, wait_until

DNSMASQ = shutil.which("dnsmasq") or (os.path.exists("/usr/sbin/dnsmasq") and "/usr/sbin/dnsmasq") or None
pytestmark = pytest.mark.skipif(
    not DNSMASQ, reason="dnsmasq is not installed (scripts/setup.sh installs dnsmasq-base when run as root)"
)
SIZE = 1_500_000
PIECE = 65536


class Dnsmasq:
    """A dnsmasq on 127.0.0.1:port answering only from its own hosts file and SRV records."""

    def __init__(self, tmp: Path, hosts: list[str], srv: list[str]) -> None:
        self.hosts_file = tmp / "hosts"
        self.hosts_file.write_text("\n".join(hosts) + "\n")
        self.port = free_port()
        self.server = f"127.0.0.1:{self.port}"
        args = [
            str(DNSMASQ), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--addn-hosts={self.hosts_file}", "--listen-address=127.0.0.1", "--bind-interfaces",
            f"--port={self.port}", "--pid-file=", "--user=root", "--local-ttl=1", "--log-facility=-",
            "--local=/test/",  # authoritative for *.test: NODATA/NXDOMAIN rather than REFUSED
            *(f"--srv-host={s}" for s in srv),
        ]  # fmt: skip
        self.log = open(tmp / "dnsmasq.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def set_hosts(self, hosts: list[str]) -> None:
        self.hosts_file.write_text("\n".join(hosts) + "\n")
        self.proc.send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path,
        hosts=[
            "127.0.0.1 swarm.test",
            "127.0.0.2 swarm.test",
            "::1 swarm.test",
            "127.0.0.3 a.test",
            "127.0.0.4 b.test",
        ],
        srv=["_swarm._tcp.swarm.test,a.test,5001", "_swarm._tcp.swarm.test,b.test,5002"],
    )
    try:
        name = dnspeers.DnsName("swarm.test", 1, False)
        wait_until(lambda: _answers(name, server.server), 10, "dnsmasq to answer")
        yield server
    finally:
        server.close()


def _answers(name: dnspeers.DnsName, server: str) -> bool:
    try:
        return bool(dnspeers.resolve(name, server=server, timeout_s=0.5))
    except Exception:
        return False


def test_every_a_and_aaaa_record_and_srv_records(dns: Dnsmasq) -> None:
    (entry,) = dnspeers.parse_dns_peers("dns:swarm.test:47000")
    assert sorted(dnspeers.resolve(entry, server=dns.server)) == [
        ("127.0.0.1", 47000),
        ("127.0.0.2", 47000),
        ("::1", 47000),
    ]
    (srv,) = dnspeers.parse_dns_peers("dns-srv:_swarm._tcp.swarm.test")
    assert sorted(dnspeers.resolve(srv, server=dns.server)) == [("127.0.0.3", 5001), ("127.0.0.4", 5002)]
    # no port: the default control port
    (default,) = dnspeers.parse_dns_peers("dns:swarm.test")
    assert default.port == 47100
    # a name without records: nothing, not an error
    (absent,) = dnspeers.parse_dns_peers("dns:nothing.test:1")
    assert dnspeers.resolve(absent, server=dns.server) == []


def test_re_resolves_periodically(dns: Dnsmasq) -> None:
    updates: list[list[tuple[str, int]]] = []
    got = threading.Event()

    def on_update(found: list[tuple[str, int]]) -> None:
        updates.append(sorted(found))
        got.set()

    (entry,) = dnspeers.parse_dns_peers("dns:b.test:7000")
    watcher = dnspeers.DnsPeers([entry], on_update, interval_s=0.2, server=dns.server).start()
    try:
        wait_until(lambda: updates, 10, "the first answer")
        assert updates[-1] == [("127.0.0.4", 7000)]
        dns.set_hosts(["127.0.0.4 b.test", "127.0.0.5 b.test"])  # a pod joins the Service
        wait_until(lambda: len(updates) >= 2, 10, "the new answer")
        assert updates[-1] == [("127.0.0.4", 7000), ("127.0.0.5", 7000)]
    finally:
        watcher.close()
    assert not watcher._thread.is_alive()


def test_a_leecher_finds_every_seed_of_a_headless_service(dns: Dnsmasq) -> None:
    port = free_port()
    seeds = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):  # two pods behind one name, same control port
            cfg = NodeConfig(host=host, control_port=port, mdns=False, piece_size=PIECE)
            seeds.append(Node(synthetic_key(SIZE), synthetic_tensors(SIZE), cfg, complete=True).start())
        cfg = NodeConfig(
            host="127.0.0.1", control_port=0, mdns=False, piece_size=PIECE, dns_server=dns.server,
            peers=f"dns:swarm.test:{port}", dns_interval_s=1.0,
        )  # fmt: skip
        tensors = synthetic_tensors(SIZE, fill=False)
        with Node(synthetic_key(SIZE), tensors, cfg, complete=False) as leecher:
            report = leecher.fetch()
            assert report.total_bytes == leecher.manifest.total_bytes
            expected = synthetic_tensors(SIZE)
            assert all(
                torch.equal(expected[k].view(torch.int16), t.view(torch.int16)) for k, t in tensors.items()
            )
            # both seeds were found through DNS (the leecher pulls from every seed it is connected to)
            wait_until(lambda: leecher.status()["peers"] == 2, 10, "both seeds accepted")
        # `swarm status` resolves the same name
        rows = cli.collect_status(
            peers=f"dns:swarm.test:{port}", interface=None, mdns=False, browse_s=0.5, token=None,
            dns_server=dns.server,
        )  # fmt: skip
        assert sorted(r["instance"] for r in rows) == sorted(s.id for s in seeds)
    finally:
        for s in seeds:
            s.close()
