"""Golden tests: `vnet analyze` and `vnet export` on small traces recorded for real.

The traces in tests/fixtures/traces/ were recorded by tools/record_fixtures.py
on a real kernel (throwaway namespaces, the real `vnet trace -w`, and for two
hosts real agents, collector and dispatcher); tests/fixtures/fixtures.json says
what was sent and which hops it had to cross. The golden outputs next to them
(tests/fixtures/golden/) are what the code printed for them when they were
made. Nothing here needs root or a kernel: only the committed files are read.

Two kinds of checks:
- the output is exactly the golden one (JSON compared as parsed objects), so
  any change of the analysis shows up as a diff to review;
- what a person would check by hand on each recording: the paths, counts,
  drop places and reasons, clocks and run-queue waits are the ones the
  recording made, whatever the golden files say.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("numpy")

from vnet.analysis.stream import read_table  # noqa: E402
from vnet.analysis.export import write_jsonl  # noqa: E402
from vnet.analysis.report import analyze, render_text  # noqa: E402
from vnet.collector.tracefile import TraceFileReader  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("record_fixtures", ROOT / "tools" / "record_fixtures.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

MANIFEST = tool.load_manifest()
NAMES = sorted(MANIFEST)
REGEN = ("if the analysis output changed on purpose, regenerate the golden files with "
         "`.venv/bin/python tools/record_fixtures.py --golden-only` and review the diff")
EXPECTED = {"veth-path", "drops", "two-hosts", "sched-runq"}


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    # The reports name the trace files as given: relative to the repository root, as the golden files do.
    monkeypatch.chdir(ROOT)


def _files(name: str) -> list[str]:
    return MANIFEST[name]["files"]


def _facts(name: str) -> dict:
    return MANIFEST[name]["facts"]


def _plain(report: dict):
    """The report as the CLI's JSON holds it (numpy scalars become numbers)."""
    return json.loads(json.dumps(report, default=lambda o: o.item()))


_reports: dict[tuple[str, int], dict] = {}


def report(name: str, slowest: int = 0) -> dict:
    key = (name, slowest)
    if key not in _reports:
        _reports[key] = _plain(analyze(read_table(_files(name)), slowest=slowest))
    return _reports[key]


def golden(name: str, suffix: str):
    path = tool.golden_path(name, suffix)
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: {REGEN}"
    text = path.read_text()
    if suffix.endswith(".json"):
        return json.loads(text)
    if suffix.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines()]
    return text


def _by_segment(r: dict) -> dict[tuple[str, str], dict]:
    return {(s["from"], s["to"]): s for s in r["segments"]}


def _path(r: dict, hops: list[str]) -> dict | None:
    return next((p for p in r["paths"] if p["hops"] == hops), None)


# -- the fixtures themselves ----------------------------------------------------------------------------


def test_every_fixture_is_there_with_its_golden_outputs():
    assert EXPECTED <= set(MANIFEST), f"fixtures.json lists {sorted(MANIFEST)}: record with tools/record_fixtures.py"
    for name in NAMES:
        for f in _files(name):
            size = (ROOT / f).stat().st_size
            assert 0 < size < tool.MAX_TRACE_BYTES, f"{f}: {size} bytes; fixtures stay small"
        for suffix, _, _ in tool.GOLDEN_RUNS:
            assert tool.golden_path(name, suffix).exists(), f"{name}.{suffix} missing: {REGEN}"
    committed = {p.relative_to(ROOT).as_posix() for p in tool.TRACES.rglob("*") if p.is_file()}
    listed = {f for name in NAMES for f in _files(name)}
    assert committed == listed, "trace files and fixtures.json disagree"


@pytest.mark.parametrize("name", NAMES)
def test_trace_files_read_cleanly(name):
    """Every chunk whole and known, a record layout in the header, every event decodes,
    the counts of the events chunks add up, nothing lost."""
    for f in _files(name):
        r = TraceFileReader(f)
        assert r.header is not None and r.header["abi"]["structs"]["vnet_event"], f
        chunks = list(r.chunks())
        assert not r.truncated and r.problem is None and r.skipped == 0, (f, r.problem)
        kinds = [c["kind"] for c in chunks]
        assert kinds[0] == "header" and kinds[-1] == "end" and "events" in kinds, (f, kinds)
        events = list(r.events())
        assert len(events) == sum(c["count"] for c in chunks if c["kind"] == "events") > 0, f
        end = chunks[-1]
        assert not any(end["losses"].values()), (f, end["losses"])
        assert end.get("events", len(events)) == len(events)
        assert all(e.get("kind") == "sched" or len(e["pkt_id"]) == 16 for e in events), f


# -- golden outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix,slowest", [("analyze.json", 0), ("analyze-slowest3.json", 3)])
def test_analysis_matches_golden_json(name, suffix, slowest):
    assert report(name, slowest) == golden(name, suffix), f"{name}: analysis differs from {suffix}; {REGEN}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix,slowest", [("analyze.txt", 0), ("analyze-slowest3.txt", 3)])
def test_text_report_matches_golden(name, suffix, slowest):
    text = "\n".join(render_text(analyze(read_table(_files(name)), slowest=slowest))) + "\n"
    assert text == golden(name, suffix), f"{name}: text report differs from {suffix}; {REGEN}"


@pytest.mark.parametrize("name", NAMES)
def test_export_jsonl_matches_golden(name, tmp_path):
    out = tmp_path / "events.jsonl"
    n = write_jsonl(_files(name), out)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(events)
    assert events == golden(name, "export.jsonl"), f"{name}: export --to jsonl differs; {REGEN}"


@pytest.mark.parametrize("name", NAMES)
def test_cli_analyze_json_matches_golden(name):
    proc = subprocess.run(tool.vnet_argv(("analyze", "--json"), _files(name)), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == golden(name, "analyze.json"), f"{name}: vnet analyze --json differs; {REGEN}"


def test_cli_export_jsonl_matches_golden():
    name = "two-hosts"
    proc = subprocess.run(tool.vnet_argv(("export", "--to", "jsonl", "-o", "-"), _files(name)), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(ln) for ln in proc.stdout.splitlines()] == golden(name, "export.jsonl"), REGEN


# -- what a person checks on each recording ---------------------------------------------------------------


def _export(name: str) -> list[dict]:
    return golden(name, "export.jsonl")


def test_veth_path_follows_the_bridge_hop_by_hop():
    f, r = _facts("veth-path"), report("veth-path")
    udp, pings = f["udp"], f["icmp_echo"]
    assert [h["host"] for h in r["hosts"]] == [r["hosts"][0]["host"]] and not r["hosts"][0]["problems"]
    # the datagrams and the echo requests cross the same four hooks in this order; the replies come back
    forward = r["paths"][0]
    assert forward["hops"] == f["forward_hops"], forward["hops"]
    assert forward["count"] == udp["sent"] + pings["sent"]
    backward = _path(r, f["backward_hops"])
    assert backward is not None and backward["count"] == pings["replies"], [p["hops"] for p in r["paths"]]
    assert len(r["paths"]) == 2
    assert r["packets"] == udp["sent"] + pings["sent"] + pings["replies"]
    assert r["events"] == 4 * r["packets"] == f["events_written"]
    segs = _by_segment(r)
    for a, b in zip(f["forward_hops"], f["forward_hops"][1:]):
        s = segs[(a, b)]
        assert s["count"] == forward["count"] and s["clock_error_ns"] == 0
        assert 0 < s["min_ns"] <= s["p50_ns"] <= s["p99_ns"] <= s["max_ns"] < 100_000_000, s
    e2e = forward["e2e"]
    assert e2e["min_ns"] >= sum(segs[(a, b)]["min_ns"] for a, b in zip(forward["hops"], forward["hops"][1:]))
    largest = forward["tail"]["segments"][forward["tail"]["largest"]]
    assert f"between {largest['from']} and {largest['to']}" in r["verdict"]
    assert abs(sum(s["tail_share"] for s in forward["tail"]["segments"]) - 1) < 1e-9
    assert r["drops"] == {"ended_early": [], "in_flight_at_end": 0, "kfree_skb": []} and r["sched"] is None
    # every datagram at every hop, in path order, with its own pkt_id
    datagrams: dict[str, list[dict]] = {}
    for e in _export("veth-path"):
        if e["proto"] == "udp":
            assert (e["sport"], e["dport"], e["src"], e["dst"]) == (udp["sport"], udp["dport"], udp["src"], udp["dst"])
            datagrams.setdefault(e["pkt_id"], []).append(e)
    assert len(datagrams) == udp["sent"]
    for evs in datagrams.values():
        assert [e["probe"].removeprefix("dev:") for e in evs] == f["forward_hops"]
        assert [e["t_ns"] for e in evs] == sorted(e["t_ns"] for e in evs)


def test_drops_are_placed_and_explained():
    f, r = _facts("drops"), report("drops")
    ok, big, closed = f["delivered"], f["too_big"], f["closed_port"]
    assert r["hosts"][0]["drop_events"] == big["sent"] + closed["sent"]
    # delivered and closed-port datagrams cross every hop; the too-big ones stop at the bridge
    assert r["paths"][0]["hops"] == f["forward_hops"] and r["paths"][0]["count"] == ok["sent"] + closed["sent"]
    short = _path(r, f["forward_hops"][:2])
    assert short is not None and short["count"] == big["sent"]
    assert r["drops"]["ended_early"] == [{"last_hop": big["dropped_after"], "next_hop": big["next"],
                                          "packets": big["sent"]}]
    assert r["drops"]["in_flight_at_end"] == 0
    by_hop = {row["last_hop"]: row for row in r["drops"]["kfree_skb"]}
    assert set(by_hop) == {big["dropped_after"], closed["dropped_after"]}, r["drops"]["kfree_skb"]
    assert by_hop[closed["dropped_after"]] == {"reason": closed["reason"], "last_hop": closed["dropped_after"],
                                               "packets": closed["sent"]}
    assert by_hop[big["dropped_after"]]["packets"] == big["sent"]  # the reason is the kernel's (NOT_SPECIFIED on 6.18)
    assert f"vanished early, most after {big['dropped_after']}" in r["verdict"]
    # the drop events themselves: the closed port's for NO_SOCKET in vm2, the big ones' on tap2 (the bridge's
    # egress port, before its TC hook), and no big datagram ever reached tap2's egress hook
    drops = [e for e in _export("drops") if e["probe"] == "drop:kfree_skb"]
    assert len(drops) == big["sent"] + closed["sent"]
    assert {e["reason"] for e in drops if e["dport"] == closed["dport"]} == {closed["reason"]}
    big_ids = {e["pkt_id"] for e in drops if e["len"] > 1000}
    assert len(big_ids) == big["sent"]
    port = big["next"].removesuffix(":egress")  # freed by the bridge with skb->dev already its egress port
    assert {f"{e['netns']}/{e['ifname']}" for e in drops if e["len"] > 1000} == {port}
    assert not [e for e in _export("drops") if e["pkt_id"] in big_ids and e["probe"] == f"dev:{big['next']}"]


def test_two_hosts_are_merged_with_their_clocks():
    f, r = _facts("two-hosts"), report("two-hosts")
    hosts = {h["host"]: h for h in r["hosts"]}
    assert sorted(hosts) == f["hosts"]
    for h in hosts.values():
        assert h["clock"]["applied"] and h["clock"]["error_ns"] > 0 and not h["problems"], h
    err = sum(h["clock"]["error_ns"] for h in hosts.values())
    # every datagram at its three hops; all three hops on every path
    assert r["packets"] == f["udp"]["sent"] and r["events"] == 3 * f["udp"]["sent"]
    assert sum(p["count"] for p in r["paths"]) == f["udp"]["sent"]
    assert all(sorted(p["hops"]) == sorted(f["hops"]) for p in r["paths"]), [p["hops"] for p in r["paths"]]
    for s in r["segments"]:
        same = s["from"].split(" ", 1)[0] == s["to"].split(" ", 1)[0]
        assert s["clock_error_ns"] == (0 if same else err), s
        # hops on one host keep the kernel's order: the receive tracepoint runs before TC ingress
        if same:
            assert (s["from"], s["to"]) == (f["hops"][1], f["hops"][2]) and s["min_ns"] > 0, s
        assert abs(s["min_ns"]) <= s["clock_error_ns"] or same
    assert "clock error" in r["verdict"]
    # the export puts each host's events on the collector's clock
    for e in _export("two-hosts"):
        assert e["t_ns"] == e["ts_ns"] - hosts[e["host"]]["clock"]["offset_ns"]


def test_two_hosts_paths_start_at_the_sender():
    """The pings put the two agents' clocks within ±200 us (both share one CLOCK_MONOTONIC
    here), too loose for the sub-microsecond veth hop; the packets themselves (they leave
    hostA at an egress hook, reach hostB at receive hooks, and cannot arrive before they
    left) move hostB's clock enough to keep the sender first (analysis.clocksync)."""
    f, r = _facts("two-hosts"), report("two-hosts")
    assert [p["hops"] for p in r["paths"]] == [f["hops"]]


def test_sched_waits_of_the_watched_receiver():
    f, r = _facts("sched-runq"), report("sched-runq")
    events = _export("sched-runq")
    waits = [e for e in events if e["kind"] == "sched"]
    assert waits and r["hosts"][0]["sched_events"] == len(waits) == r["sched"]["waits"]
    assert {e["tgid"] for e in waits} == {f["receiver_pid"]}  # only the watched process
    assert all(e["probe"] == "sched:runq" and e["runq_ns"] >= 0 and e["cpu"] == 0 for e in waits)
    assert any(e["prev_pid"] == f["hog_pid"] for e in waits)  # it waited behind the hog on its CPU
    whole = _path(r, f["hops"])
    assert whole is not None and whole["count"] == f["tcp"]["messages"]
    assert r["sched"]["slow_packets"] >= 1
    assert 0 <= r["sched"]["explained_ns"] <= r["sched"]["tail_ns"]
    copies = [e for e in events if e["probe"] == "sock:datagram_copy"]
    assert len(copies) == f["tcp"]["messages"] and {e["pid"] for e in copies} == {f["receiver_pid"]}
    assert all(e["len"] == f["tcp"]["size"] for e in copies)  # the payload, headers pulled


def test_sched_socket_copies_join_their_packets():
    """The copy to the receiver has the pkt_id of the segment at the devices (kernel hooks once
    hashed what lay past the skb's linear part, where TCP's payload is not): every message has
    one path to the application, and the receiver's run-queue waits behind the hog fall inside
    the slow packets' last segment."""
    f, r = _facts("sched-runq"), report("sched-runq")
    assert [(p["hops"], p["count"]) for p in r["paths"]] == [(f["hops"], f["tcp"]["messages"])]
    sched = r["sched"]
    assert sched["packets_with_overlap"] >= 1 and 0 < sched["explained_ns"] <= sched["tail_ns"]
    assert {t["waiting"] for t in sched["threads"]} == {f"python ({f['receiver_pid']})"}
    assert f"python ({f['hog_pid']})" in {t["cpu_taken_by"] for t in sched["threads"]}
