"""Interfaces and namespaces that go away while agents trace (issue 11): the agent keeps
tracing what is left, reports each one once (its status, and a "vanished" chunk in the
collector's file), and when nothing is left on its host it ends its trace by itself.
`vnet dispatch` says `host H: iface I vanished at T (why)` as it happens and in its
summary, goes on with the other hosts, and exits 4 (as `vnet trace` does when nothing
is left) naming the host; `vnet analyze` says it too. Real agents, collector and
dispatcher processes; the devices are deleted with `ip`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest

from kernel_support import VnetProcess, new_orphans, start_collector, vnet_snapshot, wait_until
from vnet.collector.tracefile import TraceFileReader
from vnet.protocol import connect, load_key, new_key

pytestmark = pytest.mark.kernel
VANISHED = re.compile(r"^vnet: host (\S+): iface (\S+) vanished at \d\d:\d\d:\d\d\.\d{3} UTC \((.+)\): its hooks stopped$")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def rig(tmp_path):
    """Three namespaces with a veth pair each; agents h1 and h2 in the root namespace."""
    names = [f"vnd{uuid.uuid4().hex[:6]}" for _ in range(3)]
    procs = []
    try:
        for ns in names:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
            ip("-n", ns, "link", "set", "va", "up")
            ip("-n", ns, "link", "set", "vb", "up")
        key = new_key(tmp_path / "key")
        for host in ("h1", "h2"):
            p = VnetProcess("agent", "--listen", f"unix:{tmp_path / host}.sock", "--key", str(key), "--spool",
                            str(tmp_path / f"spool-{host}"), "--host", host)
            procs.append(p)
            p.wait_stderr("agent listening on", timeout=20)
        procs.append(start_collector(f"unix:{tmp_path}/col.sock", key, tmp_path / "out"))
        yield names, key, tmp_path, procs
    finally:
        for p in procs:
            p.close()
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _spec(tmp, key, name: str, duration: float, h1: list[str], h2: list[str] | None) -> str:
    hosts = [("h1", h1)] + ([("h2", h2)] if h2 else [])
    text = f"""
[trace]
name = "{name}"
duration = {duration}

[collector]
address = "unix:{tmp / 'col.sock'}"
key = "{key}"
"""
    for host, ifaces in hosts:
        text += f"""
[[host]]
name = "{host}"
agent = "unix:{tmp / host}.sock"
interfaces = [{', '.join(f'"{i}"' for i in ifaces)}]
"""
    (tmp / f"{name}.toml").write_text(text)
    return str(tmp / f"{name}.toml")


def _vanished(p: VnetProcess) -> list[tuple[str, str, str]]:
    return [m.groups() for ln in p.stderr if (m := VANISHED.match(ln))]


def test_a_host_that_loses_everything_ends_its_trace_and_the_others_go_on(rig):
    (a, b, c), key, tmp, procs = rig
    before = vnet_snapshot()
    spec = _spec(tmp, key, "vanish", 8, [f"{a}/va", f"{b}/va"], [f"{c}/va"])
    with VnetProcess("dispatch", spec, "--json", "-q") as d:
        d.wait_stderr("h2: tracing", timeout=30)
        ip("-n", a, "link", "del", "va")          # one of h1's two: h1 goes on
        assert wait_until(lambda: _vanished(d), 10), d.stderr
        assert _vanished(d) == [("h1", f"{a}/va", "deleted")]
        ip("netns", "del", b)                     # the last of h1's: its trace ends by itself
        ended = d.wait_stderr("host h1: every traced interface is gone", timeout=10)
        assert ended == f"vnet: host h1: every traced interface is gone ({a}/va, {b}/va): nothing left to " \
                        f"trace: its trace ended"
        assert d.proc.poll() is None, "the dispatcher stopped while h2 still traces"
        rc = d.wait(timeout=40)
    assert rc == 4, d.stderr
    assert not any("Traceback" in ln for ln in d.stderr)
    # as it happened, then again in the summary
    assert _vanished(d) == [("h1", f"{a}/va", "deleted"), ("h1", f"{b}/va", f"network namespace {b} was deleted")] * 2
    assert "vnet: stopped (duration)" in "\n".join(d.stderr)
    assert d.stderr[-1] == f"vnet: error: host h1: every traced interface is gone ({a}/va, {b}/va): nothing left " \
                           f"to trace"
    summary = json.loads(d.stdout[-1])
    assert summary["ended"] == {"h1": f"every traced interface is gone ({a}/va, {b}/va): nothing left to trace"}
    assert [v["iface"] for v in summary["vanished"]["h1"]] == [f"{a}/va", f"{b}/va"]
    assert summary["hosts"]["h1"]["delivered"] and summary["hosts"]["h2"]["delivered"]

    # the collector's file of h1 says what went and when; h2's says nothing went
    f = TraceFileReader(tmp / "out" / "vanish" / "h1.vnt")
    gone = list(f.chunks(["vanished"]))
    assert [(v["iface"], v["why"]) for v in gone] == [(f"{a}/va", "deleted"),
                                                      (f"{b}/va", f"network namespace {b} was deleted")]
    assert gone[0]["at_ns"] <= gone[1]["at_ns"]
    end = list(f.chunks(["end"]))[-1]
    assert end["ended"].startswith("every traced interface is gone") and len(end["vanished"]) == 2
    assert list(TraceFileReader(tmp / "out" / "vanish" / "h2.vnt").chunks(["vanished"])) == []

    # vnet analyze names them with the host
    report = subprocess.run([sys.executable, "-m", "vnet", "analyze", str(tmp / "out" / "vanish"), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    problems = {h["host"]: h["problems"] for h in json.loads(report.stdout)["hosts"]}
    assert [p.split(" vanished at ")[0] for p in problems["h1"]] == [f"iface {a}/va", f"iface {b}/va"], problems
    assert problems["h2"] == []

    # nothing left, both agents serve on
    left = new_orphans(before)
    assert not left.progs and not left.links, left
    for host in ("h1", "h2"):
        ch = connect(f"unix:{tmp / host}.sock", load_key(key), "agent")
        assert not ch.request({"type": "hello"}, ("hello",))["busy"]
        ch.close()


def test_the_only_host_losing_everything_ends_the_dispatch_early(rig):
    (a, _, _), key, tmp, procs = rig
    spec = _spec(tmp, key, "alone", 60, [f"{a}/va"], None)
    with VnetProcess("dispatch", spec, "-q") as d:
        d.wait_stderr("h1: tracing", timeout=30)
        ip("-n", a, "link", "del", "va")
        rc = d.wait(timeout=20)  # well before the 60 s
    assert rc == 4, d.stderr
    assert _vanished(d)[0] == ("h1", f"{a}/va", "deleted")
    assert any(ln.startswith("vnet: stopped (nothing left to trace)") for ln in d.stderr), d.stderr
    assert d.stderr[-1] == f"vnet: error: host h1: every traced interface is gone ({a}/va): nothing left to trace"
