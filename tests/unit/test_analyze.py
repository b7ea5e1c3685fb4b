"""vnet analyze on synthetic traces with known delays (tools/synth_trace.py): the
injected per-segment delays come back within 1 us, the slow segment is named,
drops are located, clock offsets between hosts are applied (no root)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from synth_trace import Spec, write  # noqa: E402

from vnet.analysis.bulk import Flow, runs  # noqa: E402
from vnet.analysis.stream import read_table  # noqa: E402
from vnet.analysis.report import analyze, render_text  # noqa: E402
from vnet.binding.ringbatch import pack_records, records  # noqa: E402

US = 1000


def run(tmp_path, **kw):
    spec = Spec(**kw)
    paths, truth = write(spec, tmp_path)
    return spec, truth, analyze(read_table([tmp_path]), slowest=3, hist=True)


def seg(report, a, b):
    rows = [s for s in report["segments"] if s["from"].endswith(f"eth{a}:ingress") and s["to"].endswith(f"eth{b}:ingress")]
    assert len(rows) == 1, report["segments"]
    return rows[0]


@pytest.mark.parametrize("hosts", [1, 2])
@pytest.mark.parametrize("inject", [0, 1, 2])
def test_injected_delay_recovered_and_named(tmp_path, hosts, inject):
    delays = [5 * US, 20 * US, 8 * US]
    spec, truth, r = run(tmp_path, packets=5000, hosts=hosts, delays_ns=delays, jitter_ns=300,
                         inject_segment=inject, extra_ns=150 * US, inject_fraction=0.03)
    for i, d in enumerate(delays):
        s = seg(r, i, i + 1)
        assert s["count"] == 5000
        assert abs(s["min_ns"] - d) < US and abs(s["p50_ns"] - d) < US
        want_tail = d + (150 * US if i == inject else 0)
        assert abs(s["p99_ns"] - want_tail) < US and abs(s["max_ns"] - want_tail) < US
        # exact per-packet truth: the distribution is that of the generated delays
        true = np.diff(truth.times, axis=1)[:, i]
        assert s["p50_ns"] == int(np.sort(true)[int(np.ceil(0.5 * true.size)) - 1])
    p = r["paths"][0]
    assert p["count"] == 5000 and len(p["hops"]) == 4
    big = p["tail"]["segments"][p["tail"]["largest"]]
    assert big["from"].endswith(f"eth{inject}:ingress") and big["to"].endswith(f"eth{inject + 1}:ingress")
    assert f"eth{inject}:ingress and " in r["verdict"] and big["tail_share"] > 0.7


def test_clock_offset_between_hosts_applied_with_its_error(tmp_path):
    spec, truth, r = run(tmp_path, packets=2000, hosts=2, delays_ns=[5 * US, 20 * US, 8 * US],
                         offset_ns=7_000_000_000, error_ns=1234, inject_segment=None, sched=False)
    cross = seg(r, 1, 2)  # h0 -> h1: 20 us, although h1's clock runs 7 s ahead
    assert cross["min_ns"] == cross["max_ns"] == 20 * US
    assert cross["clock_error_ns"] == 2 * 1234  # the best estimate of each host, not the coarse first one
    assert seg(r, 0, 1)["clock_error_ns"] == 0
    assert r["hosts"][1]["clock"]["offset_ns"] == 7_000_000_000
    assert "±2.5us clock error" in r["verdict"]


def test_drops_located_with_kernel_reason(tmp_path):
    spec, truth, r = run(tmp_path, packets=4000, drop_after=1, drop_fraction=0.05, inject_segment=None, sched=False)
    n = int(truth.dropped.sum())
    assert n > 50
    d = r["drops"]
    assert d["ended_early"] == [{"last_hop": "h0/eth1:ingress", "next_hop": "h0/eth2:ingress", "packets": n}]
    assert d["kfree_skb"] == [{"reason": "NETFILTER_DROP", "last_hop": "h0/eth1:ingress", "packets": n}]
    assert "vanished early" in r["verdict"]


def test_sched_waits_explain_the_tail(tmp_path):
    spec, truth, r = run(tmp_path, packets=5000, hosts=2, inject_segment=2, extra_ns=300 * US, inject_fraction=0.02)
    s = r["sched"]
    assert s["waits"] == int(truth.injected.sum())  # the discarded record is not counted
    assert s["packets_with_overlap"] >= 0.9 * s["slow_packets"]
    assert s["share_of_tail"] > 0.8
    assert s["threads"][0]["waiting"] == "vhost-4240 (4242)" and s["threads"][0]["cpu_taken_by"] == "stress-ng (777)"


def test_filters_and_slowest(tmp_path):
    spec, truth, r = run(tmp_path, packets=3000, inject_segment=1, extra_ns=100 * US, inject_fraction=0.01)
    slow = r["slowest"]
    assert len(slow) == 3 and slow[0]["total_ns"] >= slow[1]["total_ns"]
    assert slow[0]["hops"][2]["delta_ns"] >= 100 * US and slow[0]["hops"][0]["delta_ns"] == 0
    hosts = read_table([tmp_path], flow=Flow(proto=17, dport=6000))
    assert analyze(hosts)["packets"] == 3000
    assert analyze(read_table([tmp_path], flow=Flow(dport=1)))["packets"] == 0
    half = analyze(read_table([tmp_path]), since=0.0, until=spec.gap_ns * 1500 / 1e9)
    assert half["packets"] == 1500
    text = "\n".join(render_text(r, hist=True))
    assert "p99.9" in text and "usecs" in text and r["verdict"] in text
    json.dumps(r)


def test_repeated_identical_packets_become_separate_instances(tmp_path):
    spec = Spec(packets=200, inject_segment=None, sched=False)
    _, truth = write(spec, tmp_path / "a")
    truth.pkt_ids[100:] = truth.pkt_ids[:100]  # the same datagram sent twice, 1 ms apart
    write(spec, tmp_path / "b", truth)
    r = analyze(read_table([tmp_path / "b"]))
    assert r["packets"] == 200 and r["paths"][0]["count"] == 200
    assert seg(r, 1, 2)["max_ns"] == spec.delays_ns[1]


def test_runs_split_a_mixed_blob_like_records():
    recs = [b"a" * 144] * 5 + [b"s" * 72] * 3 + [b"a" * 144] * 2
    blob = pack_records(recs, discarded=[6])
    got = [(blob[off + i * stride:off + i * stride + length]) for off, stride, n, length in runs(blob)
           for i in range(n)]
    assert got == [bytes(r) for r in records(blob)]
    with pytest.raises(ValueError):
        list(runs(blob[:-3]))


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from vnet.cli.app import app

    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "none.vnt")])
    assert res.exit_code == 2
    write(Spec(packets=100), tmp_path)
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--json", "--flow", "udp 10.0.0.1 > 10.0.0.2:6000"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["packets"] == 100
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--flow", "nonsense"])
    assert res.exit_code == 2
