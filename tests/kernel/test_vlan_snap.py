"""VLAN-tagged traffic, for real, on the host kernel: `vnet trace --snaplen` captures
802.1Q frames with their tag (VLAN id, priority) where the kernel keeps it in the skb
and where it is in the bytes, `vnet export --to pcapng` writes them so that tshark
reads the tag and the datagram behind it, and tcpdump expressions with `vlan` select
exactly the captures libpcap's pcap_offline_filter accepts.

The topology and the checks are in vlan_support.py (shared with the 6.1 guest's
tests/vm/test_vlan_guest.py): two veth pairs, transmit VLAN offload on one and off
the other, datagrams at three priorities plus frames sent with the tag in their
bytes. Tagging: real 802.1Q devices where the kernel has them ("vlan-dev"); this
CI host's kernel has none (CONFIG_VLAN_8021Q unset), so there a tcx program pushes
the tag into the skb metadata at the sender's veth egress, as a VLAN device's
transmit does ("tc-push").
"""

from __future__ import annotations

import os
import shutil

import pytest

import vlan_support as vs
from kernel_support import new_orphans, vnet_snapshot

pytestmark = pytest.mark.kernel

SNAP = 128
FULL = 256  # every frame here is shorter: libpcap sees whole frames
PROBES = ("net:netif_receive_skb", "net:net_dev_queue", "net:net_dev_start_xmit", "drop:kfree_skb")


@pytest.fixture(scope="module", params=["tc-push", "vlan-dev"])
def net(request):
    if os.geteuid() != 0:
        pytest.skip("kernel test needs root (network namespaces, eBPF); run: sudo make test-kernel")
    mode = request.param
    if mode == "vlan-dev" and not vs.has_vlan_devices():
        pytest.skip("this kernel makes no 802.1Q devices (CONFIG_VLAN_8021Q); the tc-push variant tags instead")
    before = vnet_snapshot()
    with vs.build(mode) as n:
        yield n
    left = new_orphans(before)
    assert not left.progs and not left.links, f"vnet programs/links left attached: {left}"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (make sysdeps)")
def test_snaplen_captures_the_tag_and_pcapng_shows_it(net, tmp_path):
    got = vs.cli_capture(net, tmp_path, PROBES, SNAP)
    # pair 1 and 2: 7 datagrams each, 2 in-band frames; 5..8 tagged hooks each
    assert got["tagged"] >= 16 * 5, got


@pytest.fixture(scope="module")
def calibration(net):
    """Every datagram traced once at every hook without an expression, whole frames."""
    dgrams = vs.datagrams(net)
    with vs.receiver(net) as wait:
        events = vs.run_trace(net.trace_plans(PROBES), net, dgrams, wait, None,
                              FULL, vs.wait_for_all(net, dgrams), timeout=5, quiet=0.3)
    return dgrams, vs.calibrate(net, dgrams, events, FULL)


@pytest.mark.parametrize("text", vs.EXPRESSIONS, ids=vs.EXPRESSIONS)
def test_vlan_expression_matches_libpcap(net, calibration, text):
    dgrams, calib = calibration
    want = vs.wanted(calib, text)
    if text == f"vlan {vs.OTHER_VID}":
        assert not want
    else:
        assert 0 < len(want) < len(calib), (len(want), len(calib))
    with vs.receiver(net) as wait:
        events = vs.run_trace(net.trace_plans(PROBES), net, dgrams, wait, text,
                              FULL, lambda evs: want <= set(vs.expression_events(net, dgrams, evs)),
                              timeout=5, quiet=0.5)
    vs.check_expression(net, dgrams, calib, text, events)
    if text == f"vlan {vs.OTHER_VID}":
        assert [e for e in events if e.get("packet")] == []  # nothing at all, not even noise
