"""Load soak (issue 11): a real `vnet agent` shipping to a real `vnet collect` while the
real tc program is run at a sustained rate near the drain target (BPF_PROG_TEST_RUN,
tools/bench/drain.py's producer and agent rig, not a copy), for VNET_SOAK_SECONDS
(default 45; the 10-minute run: VNET_SOAK_SECONDS=600, figures in docs/reliability.md).

Asserted, none of it a timing: the resident memory and the open file descriptors of
both processes, sampled every few seconds, stay flat after a warm-up (a growth bound),
and every event is accounted for exactly: the losses the agent reports are the
kernel's counter, and the events the collector wrote plus every stage's losses are the
events the kernel saw (the producer's, and the few packets of the veth's own).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import pytest

from kernel_support import veth_pair

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
SECONDS = float(os.environ.get("VNET_SOAK_SECONDS", "45"))
RATE = int(os.environ.get("VNET_SOAK_RATE", "500000"))   # events/s offered (issue 10's drain target region)
RING_BYTES = 8 << 20                                     # vnet's default ring
QUEUE_MB = 64                                            # the agent's default chunk queue (drain.py: 512)
WARM_UP = 0.25                                           # of the run: queues, buffers and caches fill
RSS_GROWTH_BOUND = 16 << 20                              # bytes: growth without backlog, or a new high
#   (not 0: a receive buffer grows to the largest chunk seen yet, a step, once)
KEPT_PAGES = (4 << 20) + (1 << 20)                       # the queue file keeps its working bytes (+ header, a chunk's tail)
QUIET_CHUNKS = 8                                         # agent queue this short: no backlog held in memory
MIN_CALM = 9                                             # samples without backlog: enough to see a leak's growth
FD_SLACK = 2                                             # a reconnect or a file being opened at sampling


def _drain():
    """tools/bench/drain.py as a module (its producer runs as `drain.py _produce`)."""
    name = "vnet_bench_drain"
    if name not in sys.modules:
        sys.path.insert(0, str(ROOT / "tools" / "bench"))   # its own imports, beside it
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "bench" / "drain.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def sample(pid: int) -> tuple[int, int]:
    """(VmRSS in bytes, open file descriptors) of `pid`."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def flatness(series: list[tuple[int, int]], quiet: list[bool]) -> dict:
    """What the samples after the warm-up say. A leak grows the memory held when nothing is
    queued; a backlog (a collector lagging for a while on this shared machine) raises the
    agent's RSS by at most its queue, and the agent gives that back once the queue is empty
    (so a later, larger backlog sets a new high that is not a leak). Hence: "calm_growth",
    the median of the last third of the samples taken with no backlog minus the median of
    their first third; "over_calm", the highest sample above that first median (bounded by
    the queue); and, when too few samples were calm to tell, "new_high", the last third's
    highest sample above the highest before it. Also the fd counts seen."""
    steady = series[int(len(series) * WARM_UP):]
    start = len(series) - len(steady)
    rss = [r for r, _ in steady]
    fds = [f for _, f in steady]
    cut = len(steady) * 2 // 3
    calm = [r for (r, _), q in zip(steady, quiet[start:]) if q]
    third = max(1, len(calm) // 3)
    calm_first = statistics.median(calm[:third]) if calm else 0
    calm_last = statistics.median(calm[-third:]) if calm else 0
    return {"samples": len(steady), "calm": len(calm), "rss_max_mib": max(rss) / 2**20,
            "new_high": max(rss[cut:]) - max(rss[:cut]),
            "calm_growth": calm_last - calm_first, "over_calm": max(rss) - calm_first,
            "calm_first_mib": calm_first / 2**20, "calm_last_mib": calm_last / 2**20,
            "rss_mib": [round(r / 2**20) for r in rss],
            "fd_min": min(fds), "fd_max": max(fds), "fd_first": fds[0], "fd_last": fds[-1]}


def assert_flat(name: str, r: dict) -> None:
    """No leak: the memory held without a backlog does not grow, and a backlog takes no more
    than the queue it fills; with too few calm samples, no new high in the last third."""
    assert r["samples"] >= 6, r
    if r["calm"] >= MIN_CALM:
        assert r["calm_growth"] < RSS_GROWTH_BOUND, (name, r)
        assert r["over_calm"] < (QUEUE_MB << 20) + RSS_GROWTH_BOUND, (name, r)
    else:
        assert r["new_high"] < RSS_GROWTH_BOUND, (name, r)
    assert r["fd_max"] - r["fd_min"] <= FD_SLACK and r["fd_last"] <= r["fd_first"] + FD_SLACK // 2, (name, r)


def test_soak_memory_and_fds_flat_and_every_loss_counted(tmp_path):
    drain = _drain()
    every = min(5.0, max(0.5, SECONDS / 40))  # at least ~40 samples, at most one per 5 s
    with veth_pair(94) as net, contextlib.ExitStack() as stack:   # the producer goes even on a failure
        consumer = drain.AgentConsumer(f"{net.ns1}/{net.if1}", tmp_path, queue_mb=QUEUE_MB)
        try:
            kernel = consumer.start(RING_BYTES)
            try:
                pids = {"agent": consumer.agent.pid, "collector": consumer.collector.pid}
                producer = drain.Producer(kernel, RATE, int(RATE * SECONDS), max(1, RATE // 1000))
                stack.callback(lambda p=producer.proc: p.poll() is None and (p.kill(), p.wait()))
                series = {name: [] for name in pids}
                queued = []   # the agent's unacknowledged chunks at each sample: a backlog is not a leak
                producer.go()
                next_at = time.monotonic()
                while producer.proc.poll() is None:
                    for name, pid in pids.items():
                        series[name].append(sample(pid))
                    queued.append(consumer.status()["shipper"]["queued"])
                    next_at += every
                    while producer.proc.poll() is None and time.monotonic() < next_at:
                        time.sleep(0.1)
                produced = producer.result()
                deadline = time.monotonic() + 120   # a bound, not a timing: the agent catches up
                while not consumer.delivered(produced["produced"]):
                    assert time.monotonic() < deadline, consumer.status()
                    time.sleep(0.1)
                status = consumer.status()
                out = consumer.stop(kernel)
                after = kernel.counters()   # final: detached by the stop, so a stray packet up to it counts too
            finally:
                kernel.close()
        finally:
            consumer.close()
    n = produced["produced"]
    # the trace's own counters, whole: they start at 0 when the agent loads the program, as the
    # file starts empty (a difference from a later reading misses a veth packet that came between)
    kern = after
    lost = kern["lost"]
    rate = n / max(1e-9, produced["t1"] - produced["t0"])
    quiet = [q <= QUIET_CHUNKS for q in queued]
    report = {name: flatness(s, quiet) for name, s in series.items()}
    print(f"\nsoak {SECONDS:.0f} s at {RATE:,}/s offered: produced {n:,} ({rate:,.0f}/s), written {out.written:,}, "
          f"kernel lost {lost:,}, reported {out.reported_lost:,}, agent unread {out.extra['agent_unread']}, "
          f"spool full {out.extra['spool_full']}, chunks {status['chunks']:,}; kernel counters {kern}")
    for name, r in report.items():
        print(f"  {name}: {r['samples']} samples after warm-up; RSS max {r['rss_max_mib']:.1f} MiB, last third's "
              f"high {r['new_high'] / 2**20:+.1f} MiB over the earlier; without backlog ({r['calm']} samples) "
              f"{r['calm_first_mib']:.1f} -> {r['calm_last_mib']:.1f} MiB; fds {r['fd_first']} -> {r['fd_last']} "
              f"(range {r['fd_min']}-{r['fd_max']})\n    RSS MiB: {r['rss_mib']}")
    print(f"  agent queue (chunks): {queued}")
    # every loss counted, exactly: the kernel's counter is what the agent reports, and nothing is unaccounted
    assert out.reported_lost == lost
    # and nothing unaccounted: what the collector wrote and every stage's losses add up to what the kernel saw
    agent_lost = out.extra["agent_unread"] + out.extra["spool_full"]
    assert out.written + lost + agent_lost == kern["seen"] - kern["filtered"], (out.written, out.extra, kern)
    # what the kernel saw beyond the producer's runs: the veth's own stray packets (IPv6 neighbour discovery)
    assert 0 <= kern["seen"] - n <= 10 + SECONDS, (kern, n)
    assert out.extra["delivered"] is True
    for name, r in report.items():
        assert_flat(name, r)


def _queue_file(consumer) -> Path:
    """The agent's queue file for its current run (default --queue-dir)."""
    return Path("/dev/shm/vnet") / consumer.trace_name / "h1" / consumer.status()["shipper"]["run"] / "queue"


def _queue_file_pages(consumer) -> int:
    """Bytes of tmpfs memory the agent's queue file holds (written and not given back)."""
    path = _queue_file(consumer)
    return path.stat().st_blocks * 512 if path.exists() else 0


def _queue_file_bytes(consumer) -> int:
    """Bytes queued in the agent's queue file for its current run (default --queue-dir)."""
    from vnet.agent.queuefile import QueueFile

    path = _queue_file(consumer)
    if not path.exists():
        return 0
    q = QueueFile.open(path)
    try:
        return q.queued_bytes()
    finally:
        q.close()


@pytest.mark.parametrize("queue", ["tmpfs", "heap"])
def test_the_agent_gives_back_what_a_backlog_took(tmp_path, queue):
    """A stalled collector makes the agent hold its memory queue full (64 MiB): in its queue
    file on tmpfs (the default --queue-dir; resident in the agent too where its mapping was
    read, to send), or, with
    no usable --queue-dir, its heap. Once the collector catches up and the queue is empty the
    agent's resident memory is back near where it started (after a quiet second, TRIM_IDLE_S):
    the queue file's pages are given back to tmpfs (QueueFile.trim), the heap's to the system
    (glibc would keep the freed chunk copies: vnet.agent.shipper trims)."""
    import signal

    drain = _drain()
    with veth_pair(95) as net, contextlib.ExitStack() as stack:
        consumer = drain.AgentConsumer(f"{net.ns1}/{net.if1}", tmp_path, queue_mb=QUEUE_MB,
                                       agent_args=("--queue-dir", drain.HEAP_QUEUE) if queue == "heap" else ())
        stack.callback(consumer.close)
        kernel = consumer.start(RING_BYTES)
        stack.callback(kernel.close)
        start, _ = sample(consumer.agent.pid)
        os.kill(consumer.collector.pid, signal.SIGSTOP)
        stack.callback(lambda: consumer.collector.poll() is None and os.kill(consumer.collector.pid, signal.SIGCONT))
        producer = drain.Producer(kernel, 300_000, 1_500_000, 300)   # ~230 MB of events: queue full, then spool
        stack.callback(lambda p=producer.proc: p.poll() is None and (p.kill(), p.wait()))
        producer.go()
        produced = producer.result()["produced"]
        deadline = time.monotonic() + 30
        while consumer.status()["shipper"]["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        held, _ = sample(consumer.agent.pid)
        in_folder = _queue_file_bytes(consumer)
        os.kill(consumer.collector.pid, signal.SIGCONT)
        deadline = time.monotonic() + 120   # a bound, not a timing
        while not consumer.delivered(produced):
            assert time.monotonic() < deadline, consumer.status()
            time.sleep(0.1)
        deadline = time.monotonic() + 10  # given back after a quiet TRIM_IDLE_S (a bound, not a timing)
        while True:
            time.sleep(0.2)
            after, _ = sample(consumer.agent.pid)
            left, pages = _queue_file_bytes(consumer), _queue_file_pages(consumer)
            if (left == 0 and pages <= KEPT_PAGES and after - start < RSS_GROWTH_BOUND) or time.monotonic() > deadline:
                break
        print(f"\n{queue} queue: agent RSS {start / 2**20:.1f} MiB at start, {held / 2**20:.1f} holding the backlog "
              f"({in_folder / 2**20:.1f} MiB in the queue file), {after / 2**20:.1f} after it "
              f"({pages / 2**20:.1f} MiB of queue file pages)")
        # held in the heap (RSS), or in the queue file (tmpfs: in the RSS only where the shipper read it)
        assert max(held - start, in_folder) >= (QUEUE_MB << 20) // 2, "no backlog was held: the test proves nothing"
        if queue == "tmpfs":
            assert in_folder >= (QUEUE_MB << 20) // 2 and left == 0 and pages <= KEPT_PAGES, (in_folder, left, pages)
        else:
            assert in_folder == 0
        assert after - start < RSS_GROWTH_BOUND, (start, held, after)
        consumer.stop(kernel)
