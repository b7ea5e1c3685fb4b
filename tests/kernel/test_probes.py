"""Catalog probes on this host's kernel, with real traffic: every probe the
kernel can run produces the events it promises; the others are reported
unavailable with a reason that came from probing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_support import ROOT, veth_pair
from vnet.probes import catalog
from vnet.probes import resolve as resolver
from vnet.probes.device import resolve as resolve_device
from vnet.topology import send_udp, tcp_exchange, udp_sink
from vnet.trace import Trace
from vnet.trace.session import device_plan

pytestmark = pytest.mark.kernel
PORT = 7123


def plans_for(*names):
    out = []
    for name in names:
        res = resolver.resolve(catalog.BY_NAME[name])
        assert res.available, f"{name}: {res.reason}"
        out.append(resolver.plan(res))
    return out


def collect(t: Trace, until, timeout: float = 10.0) -> list[dict]:
    return t.poll_until(until, timeout)


def trace_cli(args: list[str], traffic) -> tuple[int, str, str]:
    """Run `vnet trace ARGS`, send `traffic()` once it says it is tracing, and
    return (exit code, stdout, stderr). Bounded: the trace must stop by itself."""
    proc = subprocess.Popen([sys.executable, "-m", "vnet", "trace", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        head = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            head.append(line)
            if not line or line.startswith("vnet: tracing"):
                break
        traffic()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, out, "".join(head) + err


def ours(events, probe, dport=PORT):
    return [e for e in events if e["probe"] == probe and e["proto"] == "udp" and e["dport"] == dport]


def test_host_stack_tracepoints_follow_a_datagram_across_a_veth_pair():
    """net_dev_queue / net_dev_start_xmit / net_dev_xmit on the sender's device,
    netif_rx / netif_receive_skb on the receiver's: every one of 50 datagrams
    with the same pkt_id at every point and as seen at the tc hooks."""
    names = ("net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit", "net:netif_rx",
             "net:netif_receive_skb")
    with veth_pair(81) as net:
        plans = plans_for(*names) + [device_plan(resolve_device(net.spec1), ("egress",))]
        with Trace(plans) as t, udp_sink(net.ns2, PORT) as sink:
            kinds = {h.probe: h.kind for h in t.hooks}
            assert kinds["net:netif_receive_skb"] == "tp_btf"  # the preferred hook, where it exists
            send_udp(net.ns1, net.ip2, PORT, count=50)
            assert sink.received(expect=50) == 50
            events = collect(t, lambda ev: len(ours(ev, "net:netif_receive_skb")) >= 50)
    ids = {name: {e["pkt_id"] for e in ours(events, name)} for name in names}
    tc_ids = {e["pkt_id"] for e in ours(events, f"dev:{net.spec1}:egress")}
    assert len(tc_ids) == 50
    for name in names:
        assert ids[name] == tc_ids, name
    rx = ours(events, "net:netif_receive_skb")
    assert {(e["ifname"], e["netns"]) for e in rx} == {(net.if2, net.ns2)}  # named from (netns cookie, ifindex)
    tx = ours(events, "net:net_dev_xmit")
    assert {(e["ifname"], e["netns"]) for e in tx} == {(net.if1, net.ns1)}
    assert all(e["skb"] for e in rx)  # function/tracepoint probes know the skb


def test_drop_to_a_closed_port_carries_the_reason_by_name():
    with veth_pair(82) as net:
        with Trace(plans_for("drop:kfree_skb")) as t:
            send_udp(net.ns1, net.ip2, PORT + 1, count=3)  # nobody listens there
            events = collect(t, lambda ev: len(ours(ev, "drop:kfree_skb", PORT + 1)) >= 3)
    drops = ours(events, "drop:kfree_skb", PORT + 1)
    assert len(drops) == 3
    assert {e["reason"] for e in drops} == {"NO_SOCKET"}  # the name comes from this kernel's BTF enum
    # the task the drop happened in: this process (the softirq ran as it sent), or a kernel thread
    assert all(e["comm"] for e in drops)
    assert {e["comm"] for e in drops if e["pid"] == os.getpid()} <= thread_names()


def thread_names() -> set[str]:
    """comm of every thread of this process (what a probe reports for them)."""
    return {Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n") for tid in os.listdir("/proc/self/task")}


def test_socket_delivery_fires_when_the_receiver_reads():
    """TCP data copied to the reading application: the segments that carried it,
    with the reader's pid and comm (the reader is a thread of this process)."""
    with veth_pair(83) as net:
        with Trace(plans_for("sock:datagram_copy")) as t:
            assert tcp_exchange(net.ns1, net.ns2, net.ip2, PORT, 20000) == 20000
            events = collect(t, lambda ev: sum(e["len"] for e in ev if e["dport"] == PORT) >= 20000)
    reads = [e for e in events if e["probe"] == "sock:datagram_copy" and e["proto"] == "tcp" and e["dport"] == PORT]
    assert reads and sum(e["len"] for e in reads) >= 20000  # every payload byte was copied out
    assert {e["pid"] for e in reads} == {os.getpid()} and {e["comm"] for e in reads} <= thread_names()
    assert {e["ifindex"] for e in reads} == {0}  # TCP has let go of skb->dev by the time data is read


def test_kernel_function_probes_are_unavailable_here_with_probed_reasons():
    """This host refuses fentry and has no kprobes: function probes say so, with
    what the probe attempts observed (not a hard-coded host check)."""
    from vnet.probes import features

    fentry, kprobe = features.check("fentry"), features.check("kprobe")
    assert not fentry.ok and not kprobe.ok
    res = resolver.resolve(catalog.BY_NAME["veth:xmit"])
    assert not res.available
    assert res.why_not[0].startswith("fentry:") and fentry.detail in res.why_not[0]
    assert res.why_not[1].startswith("kprobe:") and kprobe.detail in res.why_not[1]
    ovs = resolver.resolve(catalog.BY_NAME["ovs:vport_receive"])
    assert not ovs.available and "openvswitch" in ovs.reason and "not in this kernel" in ovs.reason


def test_vnet_probes_lists_the_catalog_with_reasons():
    out = subprocess.run([sys.executable, "-m", "vnet", "probes", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["probe"]: r for r in json.loads(out.stdout)}
    assert set(catalog.BY_NAME) <= set(rows)
    assert rows["net:netif_receive_skb"]["available"] and rows["net:netif_receive_skb"]["hook"].startswith("tp_btf")
    assert not rows["veth:xmit"]["available"] and "fentry" in rows["veth:xmit"]["reason"]
    assert not rows["xen:start_xmit"]["available"] and "xen_netback" in rows["xen:start_xmit"]["reason"]


def test_trace_cli_with_probe_globs_skips_the_unavailable_and_strict_refuses():
    with veth_pair(84) as net:
        args = ["-p", "net:netif_receive_skb", "-p", "ovs:*", "-c", "3", "--json", "--duration", "10"]
        code, out, err = trace_cli(args, lambda: send_udp(net.ns1, net.ip2, PORT, count=5))
        assert code == 0, err
        assert len(out.splitlines()) == 3 and all(json.loads(ln)["probe"] == "net:netif_receive_skb"
                                                   for ln in out.splitlines())
        assert "skipping ovs:vport_receive" in err
        strict = subprocess.run([sys.executable, "-m", "vnet", "trace", *args, "--strict"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert strict.returncode == 5 and strict.stderr.count("\n") == 1 and "ovs:" in strict.stderr


def test_forcing_an_implementation():
    spec = catalog.BY_NAME["net:netif_receive_skb"]
    assert resolver.resolve(spec, "raw_tp").hook.kind == "raw_tp"
    with veth_pair(85) as net:
        with Trace([resolver.plan(resolver.resolve(spec, "raw_tp"))]) as t:
            assert [h.kind for h in t.hooks] == ["raw_tp"]
            send_udp(net.ns1, net.ip2, PORT, count=4)
            events = collect(t, lambda ev: len(ours(ev, "net:netif_receive_skb")) >= 4)
    assert len(ours(events, "net:netif_receive_skb")) == 4
    assert {e["hook"] for e in ours(events, "net:netif_receive_skb")} == {"raw_tp"}


def test_a_presumed_hook_that_fails_falls_back_to_the_next(monkeypatch):
    """`vnet trace` does not probe tp_btf before loading (resolve(presume=True)): when its own attach
    then fails and resolving with every check (the real probe says tp_btf does not work) picks
    raw_tp, it takes raw_tp. When that resolution picks the same hook, the error is the trace's own."""
    from vnet.binding.object import Program
    from vnet.errors import AttachError
    from vnet.probes import features

    spec = catalog.BY_NAME["net:netif_receive_skb"]
    monkeypatch.setattr(features, "_cache", {k: v for k, v in features._cache.items() if k != "tp_btf"})
    res = resolver.resolve(spec, presume=True)
    assert res.hook.kind == "tp_btf" and res.presumed
    refused = AttachError("attach trace", 95, "vnet_tp_btf_skb")
    monkeypatch.setattr(Program, "attach_trace", lambda self: (_ for _ in ()).throw(refused))
    # the real probe would now see the same refusal: tp_btf unsupported
    monkeypatch.setitem(features._PROBES, "tp_btf", lambda: features._failed("tp_btf", "attach", refused))
    with veth_pair(86) as net:
        with Trace([resolver.plan(res)]) as t:
            assert [h.kind for h in t.hooks] == ["raw_tp"]
            send_udp(net.ns1, net.ip2, PORT, count=2)
            events = collect(t, lambda ev: len(ours(ev, "net:netif_receive_skb")) >= 2)
    assert {e["hook"] for e in ours(events, "net:netif_receive_skb")} == {"raw_tp"}

    features._cache.pop("tp_btf", None)
    monkeypatch.setitem(features._PROBES, "tp_btf", lambda: features._feature("tp_btf", features.Support.SUPPORTED, ""))
    res = resolver.resolve(spec, presume=True)
    with pytest.raises(AttachError):
        with Trace([resolver.plan(res)]):
            pass


@pytest.mark.parametrize("kind", ["tp_btf", "raw_tp"])  # typed loads; bpf_probe_read_kernel
def test_sched_runq_measures_the_wait_of_watched_threads_only(kind):
    """A sleeper and a CPU hog pinned to one CPU: the sleeper's wakeups wait
    behind the hog, and only the watched process shows up. Its neighbours in the
    watch bitmap's word are watched too (other bits of the same word), the hog not."""
    named = "import ctypes, time\nctypes.CDLL(None).prctl(15, b'{}')\nprint(flush=True)\n"  # PR_SET_NAME
    hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c",
                            named.format("vnet-hog") + "t=time.time()+8\nwhile time.time()<t: pass"],
                           stdout=subprocess.PIPE)
    sleeper = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c",
                                named.format("vnet-sleeper") + "for _ in range(3000): time.sleep(0.001)"],
                               stdout=subprocess.PIPE)
    try:
        hog.stdout.readline(), sleeper.stdout.readline()  # both named before the trace starts
        res = resolver.resolve(catalog.BY_NAME["sched:runq"], kind)
        assert res.available and res.hook.kind == kind
        neighbours = {sleeper.pid ^ 1, sleeper.pid ^ 32} - {hog.pid}
        with Trace([resolver.plan(res, pids=(sleeper.pid, *neighbours))]) as t:
            events = collect(t, lambda ev: sum(e["tgid"] == sleeper.pid for e in ev) >= 50, timeout=6)
    finally:
        for p in (hog, sleeper):
            p.kill()
            p.wait()
    assert sum(e["tgid"] == sleeper.pid for e in events) >= 50
    assert {e["tgid"] for e in events} <= {sleeper.pid, *neighbours}  # never the hog, nor anyone else
    assert all(e["kind"] == "sched" and e["probe"] == "sched:runq" and e["comm"] for e in events)
    mine = [e for e in events if e["tgid"] == sleeper.pid]
    assert {(e["pid"], e["comm"]) for e in mine} == {(sleeper.pid, "vnet-sleeper")}  # one thread: tid = pid
    assert any(e["prev_pid"] == hog.pid and e["prev_comm"] == "vnet-hog" for e in mine)  # it waited behind the hog
    assert max(e["runq_ns"] for e in mine) > 0


def test_napi_gro_receive_entry_on_a_veth_with_gro():
    """veth receives through NAPI once GRO is on: the NIC-layer probe sees it."""
    with veth_pair(86) as net:
        net.topo.run(net.ns2, ["ethtool", "-K", net.if2, "gro", "on"], check=True)
        with Trace(plans_for("net:napi_gro_receive_entry")) as t, udp_sink(net.ns2, PORT) as sink:
            send_udp(net.ns1, net.ip2, PORT, count=10)
            assert sink.received(expect=10) == 10
            events = collect(t, lambda ev: len(ours(ev, "net:napi_gro_receive_entry")) >= 10)
    got = ours(events, "net:napi_gro_receive_entry")
    assert len(got) == 10 and len({e["pkt_id"] for e in got}) == 10
    assert {(e["ifname"], e["netns"]) for e in got} == {(net.if2, net.ns2)}


@pytest.fixture
def tracefs():
    """tracefs mounted for the test (and unmounted after, if this test mounted it)."""
    from vnet.probes import features

    mounted_here = not os.path.isdir("/sys/kernel/tracing/events")
    if mounted_here:
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=True)
    features.clear_cache()
    try:
        yield
    finally:
        if mounted_here:
            subprocess.run(["umount", "/sys/kernel/tracing"], check=False)
        features.clear_cache()


def test_classic_tracepoint_fallback_sees_the_same_packets(tracefs):
    """The last fallback (perf tracepoint, skb pointer at the offset tracefs
    gives) yields the same pkt_ids as the tc hook for the same datagrams."""
    spec = catalog.BY_NAME["net:netif_receive_skb"]
    res = resolver.resolve(spec, "tracepoint")
    assert res.available and res.tp_skb_off > 0
    with veth_pair(87) as net:
        plans = [resolver.plan(res), device_plan(resolve_device(net.spec2), ("ingress",))]
        with Trace(plans) as t:
            assert {h.kind for h in t.hooks} >= {"tracepoint"}
            send_udp(net.ns1, net.ip2, PORT, count=10)
            events = collect(t, lambda ev: len(ours(ev, "net:netif_receive_skb")) >= 10)
    tp = ours(events, "net:netif_receive_skb")
    assert len(tp) == 10 and {e["hook"] for e in tp} == {"tracepoint"}
    assert {e["pkt_id"] for e in tp} == {e["pkt_id"] for e in ours(events, f"dev:{net.spec2}:ingress")}


def test_trace_cli_dev_globs_in_a_namespace():
    with veth_pair(88) as net:
        code, out, err = trace_cli(["--netns", net.ns1, "-p", "dev:if*:egress", "-c", "4", "--json", "--duration",
                                    "10"], lambda: send_udp(net.ns1, net.ip2, PORT, count=6))
    assert code == 0, err
    events = [json.loads(ln) for ln in out.splitlines()]
    assert len(events) == 4 and {e["probe"] for e in events} == {f"dev:{net.spec1}:egress"}


def test_follow_prints_one_path_per_packet():
    with veth_pair(89) as net:
        args = ["-p", f"dev:{net.spec1}:egress", "-p", f"dev:{net.spec2}:ingress", "-p", "net:netif_receive_skb",
                "--dport", str(PORT), "--follow", "--json", "-c", "5", "--duration", "10"]
        code, out, err = trace_cli(args, lambda: send_udp(net.ns1, net.ip2, PORT, count=8))
    assert code == 0, err
    paths = [json.loads(ln) for ln in out.splitlines()]
    assert len(paths) == 5
    for p in paths:
        # Causal order: the receive tracepoint fires in __netif_receive_skb_core before tc ingress runs.
        assert [h["probe"] for h in p["hops"]] == [f"dev:{net.spec1}:egress", "net:netif_receive_skb",
                                                   f"dev:{net.spec2}:ingress"]
        assert p["hops"][0]["delta_ns"] == 0 and all(h["delta_ns"] >= 0 for h in p["hops"])
        assert p["total_ns"] == sum(h["delta_ns"] for h in p["hops"]) and p["dport"] == PORT
