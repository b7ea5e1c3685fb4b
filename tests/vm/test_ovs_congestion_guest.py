"""`vnet demo ovs-congestion` on the Open vSwitch KERNEL datapath (issue 9, case A),
in the 6.1 guest (the host kernel has no openvswitch module): the same scenario
as tests/kernel/test_demo_ovs.py with datapath_type=system and ovs-vswitchd in
the scenario's own "host" namespace (the kernel datapath is per namespace: a
private ovs-system datapath there), plus the ovs:vport_receive/vport_send
function probes inside the switch. The guest is emulated (no KVM): fewer, slower
requests, no plots nor pcapng, and bounds that only check direction and rough size."""

from __future__ import annotations

import json
import os
import time

import pytest

QUEUE = "host/p2:egress -> net:net_dev_start_xmit host/p2"


def test_ovs_kernel_datapath_congestion_names_the_rate_limited_queue(guest_modules, tmp_path):
    from vnet.collector.tracefile import TraceFileReader
    from vnet.demo import DemoContext
    from vnet.demo import ovs_congestion as demo
    from vnet.ovs import ovs_available, running_daemons

    assert ovs_available() is None, f"Open vSwitch missing in the guest: {ovs_available()} (tools/vm/setup.sh)"
    # 2 Mbit/s (the emulated CPUs keep up with that bulk flow) and a 16 KiB queue (up to ~65 ms:
    # well above the emulation's own hiccups); no packet bytes, no plots (the host test has them)
    cfg = demo.Settings(requests=100, rate=40.0, tbf_rate="2mbit", tbf_limit="16kb", datapath_type="system",
                        plots=False, snaplen=0, ovs_timeout=60.0, fill_timeout=15.0,
                        extra_probes=("ovs:vport_receive", "ovs:vport_send"))
    started = time.monotonic()

    def progress(step: str, fraction: float) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {step}", flush=True)

    r = demo.run_with(DemoContext(out_dir=tmp_path, quick=True, progress=progress), cfg)
    took = time.monotonic() - started
    print(f"{took:.0f} s:", r.verdict)
    n = r.numbers
    d = json.loads((tmp_path / "details.json").read_text())
    assert r.ok, f"{r.why}\n{r.verdict}"
    assert n["segment"] == QUEUE == n["expected_segment"]
    assert d["ovs"]["datapath_type"] == "system" and d["settings"]["bulk"] == "udp"
    base, cong = d["baseline"], d["congested"]
    # the kernel datapath is on the path: the packets crossed ovs_vport_receive and ovs_vport_send
    # (named by the skb's device when the function is entered: vport_send still sees p1's)
    kinds = [h.split(" ")[0] for h in base["path"]]
    assert "ovs:vport_receive" in kinds and "ovs:vport_send" in kinds, base["path"]
    assert kinds.index("host/p1:ingress") < kinds.index("ovs:vport_send") < kinds.index("host/p2:egress")
    assert base["packets"] == cfg.requests, base
    q_base, q_cong = n["baseline"]["segment"], n["congested"]["segment"]
    assert q_cong["p99_ns"] >= 5 * q_base["p99_ns"], (q_base, q_cong)
    bulk = cong.get("bulk_mbit_s")
    if q_cong["p50_ns"] < 1_000_000 and bulk is not None and bulk < 0.9 * 2.0:
        # the queue is only full while the sender keeps above the rate: an emulated guest on a
        # host busy with other work falls behind (seen with a loaded host: p50 10 us, p99 83 ms)
        pytest.skip(f"the emulated guest's bulk sender was starved: {bulk} of 2 Mbit/s reached vm2, so p2's "
                    f"queue was not kept full (queue p50 {q_cong['p50_ns']} ns, p99 {q_cong['p99_ns']} ns, "
                    f"qdisc {cong.get('qdisc')}); the machine was too busy")
    assert q_cong["p50_ns"] >= 1_000_000, (q_cong, bulk, cong.get("qdisc"))
    e2e_b, e2e_c = n["baseline"]["end_to_end"], n["congested"]["end_to_end"]
    assert e2e_c["p50_ns"] > 2 * e2e_b["p50_ns"], (e2e_b, e2e_c)
    for name, seg in cong["segments"].items():
        if name != QUEUE:
            assert seg["p50_ns"] * 5 <= q_cong["p50_ns"], (name, seg, q_cong)
    assert cong["trace"]["filtered"] > 0 and n["filter"]["lost"] == 0, cong["trace"]
    # only the probe flow in the traces
    for name in ("baseline.vnt", "congested.vnt"):
        events = list(TraceFileReader(tmp_path / name).events())
        odd = [e for e in events if not (e.get("proto") == "udp" and demo.PORT in (e.get("sport"), e.get("dport")))]
        assert events and odd == [], odd[:3]
    # nothing left behind
    assert not any(os.path.exists(f"/proc/{pid}") for pid in d["ovs"]["pids"].values())
    assert running_daemons() == set()
    assert not any(ns.startswith(d["topology"]["prefix"]) for ns in os.listdir("/run/netns"))
