"""VLAN-tagged traffic, for real, on Debian 12's 6.1 kernel: real 802.1Q devices
(`ip link add link vA1 name vlA1 type vlan id 100 egress-qos-map 3:3 5:5`) over two
veth pairs, transmit VLAN offload on one and off the other. `vnet trace --snaplen`
captures every datagram with its tag (VLAN id, priority) at the veth hooks, TC and
kernel sk_buff hooks (tracepoints, veth:xmit by fentry, drop:kfree_skb) alike, and
without one on the VLAN devices and after the kernel took it away; `vnet export
--to pcapng` and tshark agree; tcpdump expressions with `vlan` select exactly what
libpcap's pcap_offline_filter accepts.

Linux 6.1 marks a tag in the skb with the bit vlan_present and, when the tag is
pushed into the bytes (a device without transmit VLAN offload) or taken by the VLAN
device, clears only that bit: vlan_proto and vlan_tci keep their values. These
tests are what showed vnet reading a stale tag there. The topology, traffic and
checks are tests/kernel/vlan_support.py, shared with test_vlan_snap.py (host)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))
import vlan_support as vs  # noqa: E402

from vm_support import modprobe  # noqa: E402

SNAP = 128
FULL = 256
PROBES = ("net:netif_receive_skb", "net:net_dev_queue", "net:net_dev_start_xmit", "drop:kfree_skb", "veth:xmit")
EXTRA_TX = ("veth:xmit",)  # on A's veth, with the tag in metadata (txvlan on) or in the bytes (off)


@pytest.fixture(scope="module")
def net(guest_modules):
    modprobe("8021q")
    with vs.build("vlan-dev", warm_timeout=10) as n:
        yield n


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (make sysdeps)")
@pytest.mark.skipif(not os.environ.get("VNET_VM_FULL"), reason="~2 min in the guest (Python and tshark start "
                    "slowly there); the captures are checked by the calibration below, the CLI and tshark on "
                    "the host (test_vlan_snap.py); VNET_VM_FULL=1 runs it")
def test_snaplen_captures_the_tag_and_pcapng_shows_it(net, tmp_path):
    got = vs.cli_capture(net, tmp_path, PROBES, SNAP, EXTRA_TX, start_timeout=180, settle=3.0)
    assert got["tagged"] >= 16 * 6, got


@pytest.fixture(scope="module")
def calibration(net):
    dgrams = vs.datagrams(net)
    with vs.receiver(net) as wait:
        events = vs.run_trace(net.trace_plans(PROBES), net, dgrams, wait, None,
                              FULL, vs.wait_for_all(net, dgrams, EXTRA_TX), timeout=30, quiet=1.0)
    return dgrams, vs.calibrate(net, dgrams, events, FULL, EXTRA_TX)


# Each expression is a trace of its own, seconds of load and attach under emulation: the
# guest runs those that read the tag differently (present, absent, PCP and TCI bytes,
# lengths, criteria tested before the expression on the inner packet of real 802.1Q devices);
# the host runs all of them (test_vlan_snap.py). VNET_VM_FULL=1: all here too.
GUEST_EXPRESSIONS = vs.EXPRESSIONS if os.environ.get("VNET_VM_FULL") else [
    e for e in vs.EXPRESSIONS if e.startswith((f"vlan {vs.VID} and udp", f"vlan {vs.OTHER_VID}", "udp and not vlan",
                                               "ether[12:2]", "vlan and udp and greater", "udp dst port"))]


@pytest.mark.parametrize("text", GUEST_EXPRESSIONS, ids=GUEST_EXPRESSIONS)
def test_vlan_expression_matches_libpcap(net, calibration, text):
    dgrams, calib = calibration
    want = vs.wanted(calib, text)
    assert (not want) if text == f"vlan {vs.OTHER_VID}" else 0 < len(want) < len(calib), (len(want), len(calib))
    with vs.receiver(net) as wait:
        events = vs.run_trace(net.trace_plans(PROBES), net, dgrams, wait, text,
                              FULL, lambda evs: want <= set(vs.expression_events(net, dgrams, evs)),
                              timeout=30, quiet=2.0)
    vs.check_expression(net, dgrams, calib, text, events)
    if text == f"vlan {vs.OTHER_VID}":
        assert [e for e in events if e.get("packet")] == []
