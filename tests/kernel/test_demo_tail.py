"""`vnet demo tail-latency` (issue 9 B), for real: an echo VM sharing its CPU with a
CPU-bound process must get a much larger round-trip tail than alone, and vnet's
trace and analysis must put that tail on run-queue wait behind the hog (named by
its comm), not on the network. Nothing the scenario started may outlive it.

The effect is physical (two processes on one CPU of a shared 2-core machine), so the
measurement is repeated once when the first attempt does not show it. When the
baseline itself was slow because something else on the machine held the CPU (the
scenario says so, from its own trace), the test is skipped with that explanation
rather than failed: the comparison was not possible, the code was not wrong.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kernel_support import new_orphans, vnet_snapshot
from vnet.demo import DemoContext, tail_latency

pytest.importorskip("numpy", reason="the demo analyses with vnet's analysis extra (numpy)")

MIN_TAIL_RATIO = 3.0    # p99 or p99.9 of the round trip, with the hog / alone
ROLES = {tail_latency.VM_COMM, tail_latency.HOG_COMM, tail_latency.CLIENT_COMM}


def _effect(res) -> tuple[bool, str]:
    r = res.numbers["rtt"]["ratio"]
    tail = max((x for x in (r["p99"], r["p999"]) if x is not None), default=0.0)
    p50 = r["p50"] or 0.0
    seen = tail >= MIN_TAIL_RATIO and p50 < tail / 2
    return seen, f"p50 x{p50}, p99 x{r['p99']}, p99.9 x{r['p999']}"


def _our_children() -> list[tuple[int, str]]:
    """Processes whose parent is this test process and whose comm is one of the scenario's roles,
    or whose command line names a file under the scenario's folders (the tracer)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if ppid == os.getpid() and comm in ROLES | {"vnet", "python", "python3", "taskset", "ip"}:
            found.append((int(pid), comm))
    return found


def _left_behind(res, folder: Path) -> list[str]:
    left = []
    for pid_key in ("vm", "hog"):
        pid = res.numbers.get(pid_key, {}).get("pid")
        if not pid:
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() in ROLES:
                    left.append(f"{pid_key} process {pid}")
        except FileNotFoundError:
            pass
    left += [f"child {pid} ({comm})" for pid, comm in _our_children()]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(folder).encode() in f.read():
                    left.append(f"process {pid} using {folder}")
        except (FileNotFoundError, ProcessLookupError):
            pass
    prefix = res.numbers["params"]["topology_prefix"]
    if prefix:
        left += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(prefix)] \
            if os.path.isdir("/run/netns") else []
        left += [f"device {d}" for d in os.listdir("/sys/class/net") if d.startswith(prefix)]
    return left


def test_tail_latency_demo_blames_the_run_queue_and_names_the_hog(tmp_path):
    before = vnet_snapshot()
    steps: list[tuple[str, float]] = []
    attempts = []
    for attempt in (1, 2):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        t0 = time.monotonic()
        res = tail_latency.run(DemoContext(out_dir=folder, quick=True,
                                           progress=lambda step, f: steps.append((step, f))))
        took = time.monotonic() - t0
        assert not _left_behind(res, folder), _left_behind(res, folder)
        assert "rtt" in res.numbers, res.verdict  # it ran (set-up failures come back as ok=False)
        seen, ratios = _effect(res)
        attempts.append(f"attempt {attempt} ({took:.0f} s): {ratios}; ok={res.ok} {res.why}")
        if seen and res.ok:
            break
    if not (seen and res.ok) and res.numbers["baseline_noise"]["busy"]:
        pytest.skip("the machine was too busy for the comparison: " + " | ".join(attempts))

    # direction and rough size: the tail grows a lot, the median much less
    assert seen, " | ".join(attempts)
    rtt = res.numbers["rtt"]
    assert rtt["alone"]["replies"] >= 0.99 * rtt["alone"]["requests"], rtt["alone"]
    assert rtt["with_hog"]["replies"] >= 0.99 * rtt["with_hog"]["requests"], rtt["with_hog"]

    # the answer: run-queue wait of the VM, behind the hog, not the network
    assert res.ok, res.why
    sched = res.numbers["sched"]
    assert sched["cpu_taken_by"].startswith(tail_latency.HOG_COMM), sched
    assert sched["waiting"].startswith(tail_latency.VM_COMM), sched
    assert sched["share_of_tail"] >= 0.5, sched
    path = res.numbers["request_path"]["with_hog"]
    assert path["path"][-1].startswith("sock:consume_skb"), path
    assert path["tail_largest_segment"].endswith(path["path"][-1]), path
    assert path["tail_share_network"] < 0.2, path
    assert "run-queue" in res.verdict.lower() and tail_latency.HOG_COMM in res.verdict, res.verdict
    assert "not the network" in res.verdict, res.verdict
    assert res.numbers["events_lost"] == {"alone": 0, "with_hog": 0}, res.numbers["events_lost"]

    # what it wrote, and how it reported progress
    names = {f.name for f in res.files}
    assert {"alone.vnt", "with-hog.vnt", "alone.analysis.json", "with-hog.analysis.json", "summary.json"} <= names
    assert all(f.exists() and f.stat().st_size > 0 for f in res.files)
    assert any(f.suffix == ".png" for f in res.files), names
    fractions = [f for _, f in steps]
    assert fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)

    # and no vnet program or link left attached
    orphans = new_orphans(before)
    assert not (orphans.progs or orphans.links), orphans
