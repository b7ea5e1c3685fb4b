"""Packet identity on Debian 12's 6.1 kernel when the payload is in page fragments (the
scenarios of tests/kernel/paged_support.py): TCP segments keep the tc hooks' pkt_id at every
kind of kernel hook (tp_btf, raw_tp, classic tracepoint, fentry, kprobe) and in the copy to the
application; paged UDP datagrams are flagged pkt_id_partial at the kernel hooks instead of
getting an id from whatever lies past the skb's linear part."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
import paged_support as paged  # noqa: E402

RECEIVE = ["tp_btf", "raw_tp", "tracepoint"]


@pytest.fixture(scope="module")
def pair(guest_modules):
    with paged.offloaded_pair(subnet=97, net="10.198", warm_timeout=10) as p:
        yield p


@pytest.mark.parametrize("receive,xmit", [("tp_btf", "fentry"), ("raw_tp", "kprobe"), ("tracepoint", "fentry")])
def test_tcp_segments_keep_their_pkt_id_at_every_hook_kind(pair, receive, xmit):
    """netif_receive_skb at `receive`, veth_xmit (the sender's skb, before it crosses) at `xmit`,
    the socket's receive (tcp:tcp_probe at `receive`; its classic tracepoint has no skbaddr
    field, so the loader's own choice there) and the socket copy (its own choice too)."""
    probes = [("net:netif_receive_skb", receive), ("veth:xmit", xmit),
              ("sock:tcp_receive", None if receive == "tracepoint" else receive), ("sock:datagram_copy", None)]
    events = paged.tcp_messages(pair, paged.plans(pair, probes), timeout=30)
    paged.check_tcp(pair, events, [p for p, _ in probes])


@pytest.mark.parametrize("receive", RECEIVE)
def test_paged_udp_is_flagged_at_kernel_hooks(pair, receive):
    probes = [("net:netif_receive_skb", receive), ("sock:datagram_copy", None)]
    events = paged.udp_datagrams(pair, paged.plans(pair, probes, egress=False), timeout=20)
    paged.check_udp(pair, events)


def test_tc_events_and_pkt_ids_on_6_1_are_the_hosts():
    """The tc oracle (tests/kernel/test_tc_event_oracle.py: 57 crafted frames, 17 loads, every
    field of every event, pkt_id included, recorded on the host's kernel) gives the same on 6.1:
    pkt_id is compared across kernels and hosts, and the parser's fast paths (direct reads, the
    short payload's shifted words) must not depend on the kernel."""
    import test_tc_event_oracle as oracle

    oracle.test_tc_events_and_filters_are_as_recorded()
