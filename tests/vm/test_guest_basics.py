"""On Debian 12's 6.1 kernel (booted by tools/vm/run_in_guest.py): the committed
CO-RE objects load unchanged, fentry and kprobe work, and the function probes of
veth and Open vSwitch resolve and see real packets."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest

from vm_support import ROOT, collect, load_plan, ours, veth_pair

PORT = 7311
BUILD = ROOT / "bpf" / "build"


def test_guest_is_the_6_1_kernel_with_btf():
    assert platform.release().startswith("6.1."), platform.release()
    assert os.path.exists("/sys/kernel/btf/vmlinux")
    assert os.path.isdir(f"/lib/modules/{platform.release()}")


def test_modules_load_and_bring_their_btf(guest_modules):
    for m in ("veth", "tun", "bridge", "openvswitch"):
        assert os.path.isdir(f"/sys/module/{m}")
        assert os.path.exists(f"/sys/kernel/btf/{m}"), f"{m}.ko has no BTF"


# -- (a) CO-RE portability: the committed bytes load on 6.1 ---------------------------------------------
LOAD_CASES = [("skb_trace", "tp_btf", "net:netif_receive_skb", "tp_btf"),
              ("skb_trace", "raw_tp", "net:netif_receive_skb", "raw_tp"),
              ("skb_trace", "tracepoint", "net:netif_receive_skb", "tracepoint"),
              ("skb_trace", "fentry", "veth:xmit", "fentry"),
              ("skb_trace", "kprobe", "veth:xmit", "kprobe"),
              ("drop", "tp_btf", "drop:kfree_skb", "tp_btf"),
              ("drop", "raw_tp", "drop:kfree_skb", "raw_tp"),
              ("sched", "tp_btf", "sched:runq", "tp_btf"),
              ("sched", "raw_tp", "sched:runq", "raw_tp")]


def test_every_committed_object_is_covered_by_a_load_test():
    committed = {p.name.removesuffix(".bpf.o") for p in BUILD.glob("*.bpf.o")}
    assert committed == {c[0] for c in LOAD_CASES} | {"tc_trace"}


def test_objects_are_the_checkout_bytes():
    """The guest loads bpf/build of the shared checkout itself (whether it matches
    bpf/src is `make check-bpf`'s job, on the host)."""
    from vnet.objects import object_path

    for p in BUILD.glob("*.bpf.o"):
        assert object_path(p.name.removesuffix(".bpf.o")) == p  # no packaged or rebuilt copy in between


@pytest.mark.parametrize("obj,kind,probe,force", LOAD_CASES, ids=[f"{c[0]}-{c[1]}" for c in LOAD_CASES])
def test_object_loads_on_6_1(obj, kind, probe, force, guest_modules):
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    res = resolver.resolve(catalog.BY_NAME[probe], force)
    assert res.available, f"{probe}@{force}: {res.why_not}"
    plan = resolver.plan(res)
    assert plan.obj == obj
    o = load_plan(plan)
    try:
        for name in plan.programs:
            assert o.programs[name].fd >= 0
    finally:
        o.close()


def test_tc_trace_loads_on_6_1():
    """Both TC programs with the default config (what every device probe loads)."""
    from vnet.binding import BpfObject
    from vnet.objects import object_path

    o = BpfObject(object_path("tc_trace"))
    try:
        o.load()
        assert all(p.fd >= 0 for p in o.programs.values())
    finally:
        o.close()


# -- (b) feature probing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fentry", "kprobe", "tp_btf", "raw_tp", "ringbuf", "btf"])
def test_feature_is_supported_in_the_guest(name):
    from vnet.probes import features

    f = features.check(name)
    assert f.ok, f"{name}: {f.support.value}: {f.detail}"


def test_vnet_doctor_reports_fentry_and_kprobe_ok():
    out = subprocess.run([sys.executable, "-m", "vnet", "doctor"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    lines = out.stdout + out.stderr
    for name in ("fentry", "kprobe"):
        assert re.search(rf"^ok\s+{name}\s", lines, re.M), lines


# -- (c) function probes, both backends, real packets -----------------------------------------------------
@pytest.mark.parametrize("force", ["fentry", "kprobe", None], ids=["fentry", "kprobe", "auto"])
def test_veth_xmit_resolves(force, guest_modules):
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    res = resolver.resolve(catalog.BY_NAME["veth:xmit"], force)
    assert res.available, res.why_not
    assert res.hook.kind == (force or "fentry")


def _veth_xmit_trace(force: str, subnet: int, reference):
    """veth:xmit forced to `force` plus a reference probe, 20 datagrams ns1 -> ns2."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver
    from vnet.topology import send_udp, udp_sink
    from vnet.trace import Trace

    count = 20
    with veth_pair(subnet) as net:
        ref_plan, ref_probe = reference(net)
        plans = [resolver.plan(resolver.resolve(catalog.BY_NAME["veth:xmit"], force)), ref_plan]
        with Trace(plans) as t, udp_sink(net.ns2, PORT) as sink:
            assert {h.probe: h.kind for h in t.hooks}["veth:xmit"] == force
            send_udp(net.ns1, net.ip2, PORT, count=count)
            assert sink.received(expect=count, timeout=10) == count
            events = collect(t, lambda ev: len(ours(ev, "veth:xmit", PORT)) >= count
                             and len(ours(ev, ref_probe, PORT)) >= count)
    xmit, ref = ours(events, "veth:xmit", PORT), ours(events, ref_probe, PORT)
    assert len(xmit) == count, f"{len(xmit)} veth:xmit events for {count} datagrams"
    assert {e["hook"] for e in xmit} == {force}
    assert {(e["ifname"], e["netns"]) for e in xmit} == {(net.if1, net.ns1)}
    assert len({e["pkt_id"] for e in xmit}) == count
    assert {e["pkt_id"] for e in xmit} == {e["pkt_id"] for e in ref}


@pytest.mark.parametrize("force", ["fentry", "kprobe"])
def test_veth_xmit_matches_the_tc_egress_hook(force, guest_modules):
    from vnet.probes.device import resolve as resolve_device
    from vnet.trace.session import device_plan

    def tc(net):
        return device_plan(resolve_device(net.spec1), ("egress",)), f"dev:{net.spec1}:egress"

    _veth_xmit_trace(force, 31 if force == "fentry" else 32, tc)


@pytest.mark.parametrize("force", ["fentry", "kprobe"])
def test_veth_xmit_matches_the_receive_tracepoint(force, guest_modules):
    """Same check against tp_btf netif_receive_skb on the peer (independent of TC)."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    def rx(net):
        return resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"])), "net:netif_receive_skb"

    _veth_xmit_trace(force, 33 if force == "fentry" else 34, rx)


# -- (d) Open vSwitch, bridge, Xen netback ----------------------------------------------------------------
def _group(prefix: str):
    from vnet.probes import catalog

    return [p for p in catalog.CATALOG if p.name.startswith(prefix)]


@pytest.mark.parametrize("force", ["fentry", "kprobe", None], ids=["fentry", "kprobe", "auto"])
@pytest.mark.parametrize("group", ["ovs:", "bridge:", "tun:", "vhost:"])
def test_module_function_probes_resolve(group, force, guest_modules):
    from vnet.probes import resolve as resolver

    specs = _group(group)
    assert specs
    for spec in specs:
        res = resolver.resolve(spec, force)
        assert res.available, f"{spec.name}: {res.why_not}"
        assert res.hook.kind == (force or "fentry")


def test_ovs_function_probes_load_and_attach_with_both_backends(guest_modules):
    """Attach (no traffic yet: no OVS bridge in this first step) every ovs:* probe
    with each backend in one trace."""
    from vnet.probes import resolve as resolver
    from vnet.trace import Trace

    for force in ("fentry", "kprobe"):
        plans = [resolver.plan(resolver.resolve(spec, force)) for spec in _group("ovs:")]
        with Trace(plans) as t:
            assert sorted(h.probe for h in t.hooks) == sorted(s.name for s in _group("ovs:"))
            assert {h.kind for h in t.hooks} == {force}


def test_xen_netback_probes_are_unavailable_with_a_reason(guest_modules):
    from vnet.probes import resolve as resolver

    for spec in _group("xen:"):
        res = resolver.resolve(spec)
        assert not res.available
        assert "xen_netback" in res.reason and "not in this kernel" in res.reason
