"""Loss and delay without netem: a seed's control and data ports behind user-space relays that delay
every segment 20 ms and stall 2% of them by a retransmission timeout (tests/faults/relay.py says what
this models and what not). The fetch completes, byte-identical, every piece verified."""

from __future__ import annotations

import pytest

from tests.faults import relay as R
from tests.faults.harness import WatchedTcp, closing, leecher_node, seed_node, wrong_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def lossy_fetch(loss: float = 0.02, delay_s: float = 0.02, seed: int = 1) -> tuple[float, int, int, int]:
    """One fetch through the relays: (seconds, bytes verified, wrong bytes, segments stalled)."""
    from tests.faults.harness import FetchRun, peers_of

    transport = R.RelayedTcp(loss=loss, delay_s=delay_s, seed=seed)
    with closing(seed_node(transport=transport)) as (s,):
        ctl = R.LossyRelay(s.control_port, loss=loss, delay_s=delay_s, seed=seed + 1)
        try:
            with closing(leecher_node(transport=WatchedTcp(), peers=peers_of(ctl.port))) as (n,):
                run = FetchRun(n).start().wait(90)
                assert run.error is None, run.error
                w = n.transport
                assert isinstance(w, WatchedTcp)
                wrong = w.wrong_loaded + wrong_bytes(dict(n.tensors))
                stalls = ctl.stalls + (transport.relay.stalls if transport.relay else 0)
                return run.seconds, w.verified, wrong, stalls
        finally:
            ctl.close()


def test_loss_2pct_and_delay_20ms_in_user_space() -> None:
    seconds, verified, wrong, stalls = lossy_fetch()
    print(f"\nloss 2% + delay 20 ms: {seconds:.2f} s, {verified} bytes verified, {stalls} segments stalled")
    assert wrong == 0 and verified > 0
    assert stalls > 0  # the loss really happened
