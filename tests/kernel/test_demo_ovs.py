"""`vnet demo ovs-congestion` (issue 9, case A), quick mode, for real: a private
Open vSwitch (userspace datapath) between three namespace VMs, a UDP probe flow
alone and then next to a bulk TCP flow that fills the rate-limited egress queue
of the port toward vm2, both runs traced on every hop with a tcpdump filter and
analysed with `vnet analyze`'s code.

Assertions are on the answer (which segment) and on the direction and rough
size of the effect, not on exact numbers: CI machines are small and noisy."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from kernel_support import new_orphans, vnet_snapshot
from vnet.collector.tracefile import TraceFileReader
from vnet.demo import DemoContext
from vnet.demo import ovs_congestion as demo
from vnet.ovs import running_daemons

pytestmark = pytest.mark.kernel
QUEUE = "host/p2:egress -> net:net_dev_start_xmit host/p2"  # p2's qdisc: TC egress runs before it


@pytest.fixture(autouse=True)
def _ovs(need_ovs):
    pass

def check_result(r, out_dir, datapath: str) -> dict:
    """What the scenario must have found; returns details.json (every number of both runs)."""
    n = r.numbers
    d = json.loads((out_dir / "details.json").read_text())
    assert r.ok, f"{r.why}\n{r.verdict}"
    assert n["segment"] == QUEUE == n["expected_segment"], n["segment"]
    assert "between host/p2:egress and net:net_dev_start_xmit host/p2" in r.verdict
    assert "That segment is the egress queue of the rate-limited port host/p2" in r.verdict
    base, cong = d["baseline"], d["congested"]
    q_base, q_cong = n["baseline"]["segment"], n["congested"]["segment"]
    assert q_base == base["segments"][QUEUE] and q_cong == cong["segments"][QUEUE]
    sent = d["settings"]["requests"]
    # every probe request was seen on its whole path, in both runs (a few may die in the full queue)
    assert base["packets"] == sent, base
    assert cong["packets"] + n["congested"]["requests_vanished"] >= sent * 0.9, cong
    # the queue: congested p99 far above the baseline (tbf 10 Mbit/s, 30 KiB queue: up to ~25 ms)
    assert q_cong["p99_ns"] >= 5 * q_base["p99_ns"], (q_base, q_cong)
    assert q_cong["p50_ns"] >= 1_000_000, q_cong
    assert q_base["p99_ns"] < 1_000_000, q_base  # an empty tbf passes packets on at once
    # ... and it is where the end-to-end time went
    e2e_b, e2e_c = n["baseline"]["end_to_end"], n["congested"]["end_to_end"]
    assert e2e_c["p50_ns"] >= 5 * e2e_b["p50_ns"], (e2e_b, e2e_c)
    assert e2e_c["p50_ns"] <= 2 * q_cong["p50_ns"], (e2e_c, q_cong)
    assert n["share_of_time"] >= 0.5
    # the other segments stay small next to it
    for name, seg in cong["segments"].items():
        if name != QUEUE:
            assert seg["p50_ns"] * 10 <= q_cong["p50_ns"], (name, seg, q_cong)
    # the client saw it too
    assert n["congested"]["client_rtt"]["p50_ns"] > n["baseline"]["client_rtt"]["p50_ns"], n
    # the kernel filter worked: the bulk flow was seen (and left out) at the traced hooks
    assert cong["trace"]["filtered"] > 10 * sent and n["filter"]["lost"] == 0, cong["trace"]
    assert d["ovs"]["datapath_type"] == datapath
    return d


def check_files(r, out_dir) -> None:
    names = {p.name for p in r.files}
    assert {"baseline.vnt", "congested.vnt", "baseline.analysis.json", "congested.analysis.json", "details.json",
            "congested.pcapng", "segment_cdf.png", "ovs-vswitchd.log"} <= names, names
    for p in r.files:
        assert p.exists() and p.stat().st_size > 0 and out_dir in p.parents, p
    report = json.loads((out_dir / "congested.analysis.json").read_text())
    assert report["segments"] and report["verdict"]
    # only the probe flow is in the traces: the tcpdump expression ran in the kernel at every hook
    for name in ("baseline.vnt", "congested.vnt"):
        events = list(TraceFileReader(out_dir / name).events())
        assert len(events) > 100
        odd = [e for e in events if not (e.get("proto") == "udp" and demo.PORT in (e.get("sport"), e.get("dport")))]
        assert odd == [], odd[:3]
        assert {e["probe"].split(":")[0] for e in events} == {"dev", "net"}


def test_ovs_congestion_names_the_rate_limited_queue(tmp_path):
    bpf_before = vnet_snapshot()
    ovs_before = running_daemons()
    steps: list[tuple[str, float]] = []
    started = time.monotonic()
    r = demo.run(DemoContext(out_dir=tmp_path, quick=True, progress=lambda s, f: steps.append((s, f))))
    took = time.monotonic() - started
    print(r.verdict, json.dumps({k: r.numbers.get(k) for k in ("p99_ratio", "seconds")}))
    assert r.name == demo.NAME == "ovs-congestion"
    details = check_result(r, tmp_path, "netdev")
    check_files(r, tmp_path)
    fractions = [f for _, f in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) >= 6
    assert took < 60, f"quick mode took {took:.0f} s"
    # nothing left: processes (reaped), namespaces, run directory, vnet programs and links
    ovs = details["ovs"]
    assert running_daemons() <= ovs_before
    assert not any(os.path.exists(f"/proc/{pid}") for pid in ovs["pids"].values())
    assert not os.path.exists(ovs["run_dir"])
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert details["topology"]["prefix"] not in netns
    orphans = new_orphans(bpf_before)
    assert not (orphans.progs or orphans.links), orphans


def test_ctrl_c_in_the_middle_leaves_nothing(tmp_path, monkeypatch):
    """A KeyboardInterrupt while the bulk flow runs through the rate-limited port: the echo
    server, bulk flow, switch and topology are all torn down on the way out."""
    import vnet.topology

    prefixes: list[str] = []

    class Recorded(vnet.topology.Topology):  # the scenario's topology, to find its namespaces
        def __init__(self):
            super().__init__()
            prefixes.append(self.prefix)

    monkeypatch.setattr(vnet.topology, "Topology", Recorded)
    bpf_before = vnet_snapshot()
    ovs_before = running_daemons()
    seen: list[str] = []

    def progress(step: str, fraction: float) -> None:
        seen.append(step)
        if step.startswith("congested"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo.run(DemoContext(out_dir=tmp_path, quick=True, progress=progress))
    assert any(s.startswith("rate-limiting") for s in seen) and len(prefixes) == 1
    assert running_daemons() <= ovs_before
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert prefixes[0] not in netns
    orphans = new_orphans(bpf_before)
    assert not (orphans.progs or orphans.links), orphans
