"""vnet export on synthetic traces (tools/synth_trace.py): jsonl on the merged timeline,
a Perfetto trace that parses back with its tracks and flows, parquet, the --plot PNGs,
and the CLI's exit codes (no root)."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from synth_trace import Spec, write  # noqa: E402

from vnet.analysis import export as ex  # noqa: E402
from vnet.cli.app import app  # noqa: E402
from vnet.errors import UnsupportedError  # noqa: E402

US = 1000
OFFSET = 7_000_000_000


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    spec = Spec(packets=1500, hosts=2, delays_ns=[5 * US, 20 * US, 8 * US], jitter_ns=300, offset_ns=OFFSET,
                inject_segment=1, extra_ns=150 * US, inject_fraction=0.03, drop_after=1, drop_fraction=0.02,
                chunk_records=500)
    paths, truth = write(spec, d)
    return d, spec, truth


def test_jsonl_merged_timeline(two_hosts, tmp_path):
    d, spec, truth = two_hosts
    out = tmp_path / "e.jsonl"
    n = ex.export([d], "jsonl", out)["events"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    packets = [r for r in rows if r["kind"] == "packet"]
    sched = [r for r in rows if r["kind"] == "sched"]
    hop_events = int((truth.times >= 0).sum())
    assert n == len(rows) == hop_events + int(truth.dropped.sum()) + len(sched)
    assert len(sched) == int((truth.injected & (truth.times[:, 2] >= 0)).sum())
    # one timeline, in order; t_ns is the truth (collector's clock) whichever host's clock the event had
    t = [r["t_ns"] for r in rows]
    assert t == sorted(t)
    pos = {int(p): i for i, p in enumerate(truth.pkt_ids.tolist())}
    for r in packets:
        if r["probe"] == "drop:kfree_skb":
            continue
        hop = int(r["probe"].rsplit("eth", 1)[1].split(":")[0])
        i = pos[int(r["pkt_id"], 16)]
        assert r["t_ns"] == truth.times[i, hop]
        assert r["host"] == f"h{spec.host_of(hop)}"
        assert r["ts_ns"] - r["t_ns"] == (OFFSET if r["host"] == "h1" else 0)  # the host's own clock kept
        assert (r["src"], r["dst"], r["sport"], r["dport"], r["proto"]) == ("10.0.0.1", "10.0.0.2", 5000, 6000, "udp")
    drops = [r for r in packets if r["probe"] == "drop:kfree_skb"]
    assert len(drops) == int(truth.dropped.sum()) and {r["reason"] for r in drops} == {"NETFILTER_DROP"}
    assert {"runq_ns", "pid", "comm", "prev_comm"} <= set(sched[0])


def test_jsonl_host_filter_and_small_reorder_window(two_hosts, tmp_path):
    d, spec, truth = two_hosts
    rows = list(ex.merged_events([d], hosts=["h1"]))
    assert rows and {r["host"] for r in rows} == {"h1"}
    assert [r["t_ns"] for r in rows] == sorted(r["t_ns"] for r in rows)
    # h1's file has its run-queue waits in its first chunk, ahead of their time: a reorder
    # window of 4 events cannot sort them (memory is bounded by it), but loses nothing
    small = list(ex.merged_events([d], hosts=["h1"], window=4))
    assert sorted(r["t_ns"] for r in small) == [r["t_ns"] for r in rows]
    assert [r["t_ns"] for r in small] != [r["t_ns"] for r in rows]
    with pytest.raises(ex.UsageError, match="no trace of host nope"):
        list(ex.merged_events([d], hosts=["nope"]))


def test_perfetto_parses_back_with_tracks_events_and_flows(two_hosts, tmp_path):
    pytest.importorskip("perfetto")
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

    d, spec, truth = two_hosts
    out = tmp_path / "t.pftrace"
    s = ex.export([d], "perfetto", out)
    trace = Trace.FromString(out.read_bytes())
    desc = {p.track_descriptor.uuid: p.track_descriptor for p in trace.packet if p.HasField("track_descriptor")}
    events = [p for p in trace.packet if p.HasField("track_event")]
    assert {p.trusted_packet_sequence_id for p in trace.packet} == {ex.SEQ_ID}
    hosts = {u: t.name for u, t in desc.items() if not t.HasField("parent_uuid")}
    assert sorted(n.split()[0] for n in hosts.values()) == ["h0", "h1"]
    hop_tracks = {u: t.name for u, t in desc.items() if t.name.endswith(":ingress")}
    assert sorted(hop_tracks.values()) == [f"h{spec.host_of(i)}/eth{i}:ingress" for i in range(4)]
    assert all(desc[u].parent_uuid in hosts for u in hop_tracks)
    assert all(e.track_event.track_uuid in desc for e in events)
    # one instant per packet event, on its hop's track, in time order
    instants = [e for e in events if e.track_event.track_uuid in hop_tracks]
    hop_events = int((truth.times >= 0).sum())
    assert len(instants) == s["hop_events"] == hop_events
    assert all(e.track_event.type == TrackEvent.TYPE_INSTANT for e in instants)
    ts = [e.timestamp for e in events]
    assert ts == sorted(ts)
    # flow arrows: one per consecutive hop pair of each packet, ending at its last hop
    per_flow: dict[int, list] = {}
    for e in instants:
        for f in list(e.track_event.flow_ids) + list(e.track_event.terminating_flow_ids):
            per_flow.setdefault(f, []).append(e)
    seen = (truth.times >= 0).sum(1)
    assert len(per_flow) == truth.pkt_ids.size
    assert sorted(len(v) for v in per_flow.values()) == sorted(seen.tolist())
    assert s["flows"] == int((seen - 1).sum()) == sum(len(e.track_event.flow_ids) for e in instants)
    for evs in per_flow.values():
        names = {e.track_event.name for e in evs}
        assert len(names) == 1  # one packet per flow
        assert list(evs[-1].track_event.terminating_flow_ids) and not evs[-1].track_event.flow_ids
    # one packet: its hops on the merged clock, with the time since the previous hop
    i = int(np.flatnonzero(~truth.dropped)[0])
    mine = [e for e in instants if e.track_event.name == f"pkt {int(truth.pkt_ids[i]):016x}"]
    assert [e.timestamp for e in mine] == truth.times[i].tolist()
    since = [a.int_value for e in mine[1:] for a in e.track_event.debug_annotations if a.name == "since_prev_hop_ns"]
    assert since == np.diff(truth.times[i]).tolist()
    # run-queue waits: balanced slices on thread tracks; drops on their own track
    begins = [e for e in events if e.track_event.type == TrackEvent.TYPE_SLICE_BEGIN]
    ends = [e for e in events if e.track_event.type == TrackEvent.TYPE_SLICE_END]
    assert len(begins) == len(ends) == s["sched_slices"] > 0
    assert all(desc[e.track_event.track_uuid].name.startswith("runq vhost-4240 [4242]") for e in begins)
    drops = [e for e in events if desc[e.track_event.track_uuid].name == "drop:kfree_skb"]
    assert len(drops) == s["drops"] == int(truth.dropped.sum())
    assert {e.track_event.name for e in drops} == {"drop NETFILTER_DROP"}


def test_perfetto_without_sched_and_with_a_flow_filter(two_hosts, tmp_path):
    pytest.importorskip("perfetto")
    d, spec, truth = two_hosts
    s = ex.export([d], "perfetto", tmp_path / "a", sched=False)
    assert s["sched_slices"] == 0 and s["hop_events"] > 0
    s = ex.export([d], "perfetto", tmp_path / "b", flow=ex.Flow(dport=9))
    assert s["hop_events"] == 0 and s["flows"] == 0


def test_parquet(two_hosts, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    d, spec, truth = two_hosts
    out = tmp_path / "e.parquet"
    n = ex.write_parquet([d], out, batch=1000)  # several row groups
    t = pq.read_table(out)
    assert t.num_rows == n and pq.ParquetFile(out).num_row_groups > 1
    assert t.schema.names == [k for k, _ in ex.PARQUET_FIELDS]
    rows = [json.loads(line) for line in _jsonl(d, tmp_path).read_text().splitlines()]
    assert t.column("t_ns").to_pylist() == [r["t_ns"] for r in rows]
    assert t.column("pkt_id").to_pylist() == [r.get("pkt_id") for r in rows]
    assert t.column("host").to_pylist() == [r["host"] for r in rows]
    assert t.column("runq_ns").null_count == sum(r["kind"] == "packet" for r in rows)


def _jsonl(d, tmp_path):
    out = tmp_path / "ref.jsonl"
    ex.export([d], "jsonl", out)
    return out


def test_missing_extra_names_it(monkeypatch, two_hosts, tmp_path):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.split(".")[0] == "pyarrow":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    monkeypatch.setattr("importlib.import_module", lambda name: no_pyarrow(name))
    with pytest.raises(UnsupportedError, match=r"pyarrow.*vnet\[analysis\]"):
        ex.export([two_hosts[0]], "parquet", tmp_path / "x.parquet")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plots(two_hosts, tmp_path):
    pytest.importorskip("matplotlib")
    from vnet.analysis.plots import plot_all
    from vnet.analysis.stream import read_table

    d, spec, truth = two_hosts
    written = plot_all(read_table([d]), tmp_path / "plots", slowest=5)
    assert [p.name for p in written] == ["segment_cdf.png", "latency_heatmap.png", "waterfall.png"]
    for p in written:
        w, h = _png_size(p)
        assert 600 <= w <= 2500 and 300 <= h <= 2500, (p, w, h)
        assert p.stat().st_size > 10_000


runner = CliRunner()


def test_cli_exit_codes(two_hosts, tmp_path):
    d = str(two_hosts[0])
    r = runner.invoke(app, ["export", d, "--to", "jsonl", "-o", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.jsonl").read_text().count("\n") > 1000
    r = runner.invoke(app, ["export", d, "--to", "pcapng", "-o", str(tmp_path / "x.pcapng")])
    assert r.exit_code == 2 and "snaplen" in r.output and not (tmp_path / "x.pcapng").exists()
    r = runner.invoke(app, ["export", d, "--to", "csv", "-o", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "unknown export format 'csv'" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "missing.vnt"), "--to", "jsonl", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(app, ["export", d])
    assert r.exit_code == 2 and "nothing to do" in r.output
    r = runner.invoke(app, ["export", d, "--to", "perfetto"])
    assert r.exit_code == 2 and "needs -o" in r.output
    not_a_trace = tmp_path / "junk.vnt"
    not_a_trace.write_bytes(b"hello world, not a trace")
    r = runner.invoke(app, ["export", str(not_a_trace), "--to", "jsonl", "-o", str(tmp_path / "z")])
    assert r.exit_code == 2 and "not a vnet trace file" in r.output


def test_cli_perfetto_and_plot(two_hosts, tmp_path):
    pytest.importorskip("perfetto")
    pytest.importorskip("matplotlib")
    d = str(two_hosts[0])
    r = runner.invoke(app, ["export", d, "--to", "perfetto", "-o", str(tmp_path / "t.pftrace"),
                            "--plot", str(tmp_path / "plots"), "--host", "h0"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t.pftrace").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latency_heatmap.png", "segment_cdf.png",
                                                                      "waterfall.png"]


def test_cli_analyze_plot_follows_the_time_window(two_hosts, tmp_path):
    pytest.importorskip("matplotlib")
    d = str(two_hosts[0])
    r = runner.invoke(app, ["analyze", d, "--plot", str(tmp_path / "all")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["latency_heatmap.png", "segment_cdf.png",
                                                                    "waterfall.png"]
    r = runner.invoke(app, ["analyze", d, "--plot", str(tmp_path / "none"), "--since", "1000"])
    assert r.exit_code == 0, r.output  # no packet in the window: no plot, no failure
    assert not list((tmp_path / "none").iterdir())
