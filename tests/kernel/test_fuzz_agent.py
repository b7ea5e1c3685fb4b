"""A hostile *authenticated* dispatcher against a real `vnet agent` process (issue 11): the
key proves who is talking, not that what it sends is sane. Generated requests of every
type the agent serves (and others), with control packages whose fields have the wrong
types, sizes and values (trace names that climb out of the spool folder, interfaces and
probes that are not strings, negative and huge numbers, nested junk). Each must get an
answer (an error names what is wrong) or, for a message the protocol does not allow
there, a closed connection; the agent must keep serving, leave nothing attached once
its traces are stopped, and create nothing outside its spool folder.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernel_support import VnetProcess, new_orphans, veth_pair, vnet_snapshot  # noqa: E402
from vnet.errors import VnetError  # noqa: E402
from vnet.protocol import connect, load_key, new_key  # noqa: E402

pytestmark = pytest.mark.kernel
COLLECTOR = [""]   # the rig's collector socket, for the generated packages

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)
names = st.one_of(st.sampled_from(["ok", "../../escape", "/abs", "", ".hidden", "a" * 65, "x/y", "..", "t" * 64]),
                  st.text(max_size=70))


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzagent")
    key_path = new_key(tmp / "key")
    spool = tmp / "spool"
    before = vnet_snapshot()
    with veth_pair(subnet=81) as net, \
            VnetProcess("collect", "--listen", f"unix:{tmp}/c.sock", "--key", str(key_path), "--out",
                        str(tmp / "out")) as collector, \
            VnetProcess("agent", "--listen", f"unix:{tmp}/a.sock", "--key", str(key_path), "--spool", str(spool),
                        "--host", "fz") as agent:
        collector.wait_stderr("collector listening on", timeout=30)
        COLLECTOR[0] = f"{tmp}/c.sock"
        agent.wait_stderr("agent listening on", timeout=30)
        yield {"addr": f"unix:{tmp}/a.sock", "key": load_key(key_path), "tmp": tmp, "spool": spool, "net": net,
               "agent": agent, "before": before, "outcomes": Counter()}


def packages(net):
    base = {"version": st.just(1), "trace": names, "host": st.just("fz"),
            "interfaces": st.one_of(st.just([net.spec1]), st.lists(st.one_of(st.text(max_size=20), junk),
                                                                    max_size=3), junk),
            "directions": st.one_of(st.just(["ingress", "egress"]), junk),
            "probes": st.one_of(st.just([]), st.lists(st.sampled_from(["net:netif_receive_skb", "nosuch:x", "*"]),
                                                      max_size=2), junk),
            "pids": st.one_of(st.just([]), st.lists(st.integers(-5, 1 << 40), max_size=3), junk),
            "filter": st.one_of(st.just({}), st.dictionaries(st.sampled_from(["proto", "port", "expression",
                                                                              "bogus", "sample"]), junk,
                                                             max_size=2)),
            "record": st.one_of(st.just("events"), junk),
            "duration_s": st.one_of(st.none(), junk),
            "snaplen": st.one_of(st.just(0), st.integers(-10, 1 << 20), junk),
            "ring_bytes": st.one_of(st.just(1 << 16), st.integers(-1, 1 << 40), junk),
            "rings": st.one_of(st.none(), st.integers(-2, 1 << 33), junk),
            "strict": st.one_of(st.booleans(), junk),
            "collector": st.one_of(st.just({"address": f"unix:{COLLECTOR[0]}"}), junk)}
    return st.fixed_dictionaries({}, optional=base)


def sane(net):
    """A package the spec could have made (a trace on the veth), one field perhaps made hostile."""
    good = {"version": 1, "trace": "ok", "host": "fz", "interfaces": [net.spec1], "directions": ["ingress"],
            "probes": [], "pids": [], "filter": {}, "record": "events", "snaplen": 0, "ring_bytes": 1 << 16,
            "rings": None, "strict": False, "collector": {"address": f"unix:{COLLECTOR[0]}"}}
    return st.one_of(st.just(good), st.tuples(st.sampled_from(sorted(good)), junk)
                     .map(lambda kv: {**good, kv[0]: kv[1]}))


def requests(net):
    pkg = st.one_of(sane(net), packages(net), junk)
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("start"), "package": pkg}),
        st.fixed_dictionaries({"type": st.just("check"), "package": pkg}),
        st.fixed_dictionaries({"type": st.sampled_from(["status", "stop"])}),
        st.fixed_dictionaries({"type": st.sampled_from(["started", "chunk", "nonsense"])}, optional={"x": junk}),
    )


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_request_is_answered_or_refused_and_the_agent_serves_on(rig, data):
    msg = data.draw(requests(rig["net"]))
    ch = connect(rig["addr"], rig["key"], "agent", timeout=30)  # one per example: no state carried over
    try:
        try:
            ch.send(msg)
        except VnetError:  # too big to send at all (this end's own limit): nothing reached the agent
            rig["outcomes"]["unsendable"] += 1
            return
        try:
            reply = ch.recv(("error", "started", "checked", "status", "stopped"))
        except (VnetError, OSError) as e:
            # the protocol refuses this message here (the agent closes): a type it does not take
            assert msg["type"] not in ("start", "check", "status", "stop"), (msg, e)
            reply = None
        rig["outcomes"][reply["type"] if reply is not None else "closed"] += 1
        if reply is not None and reply["type"] == "started":  # a sane package: a real trace; stop it again
            assert ch.request({"type": "stop"}, ("stopped",))["type"] == "stopped"
    finally:
        ch.close()
    assert rig["agent"].proc.poll() is None, "\n".join(rig["agent"].stderr[-20:])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(msg=st.fixed_dictionaries({"type": st.sampled_from(["resume", "status"])},
                                 optional={"trace": st.one_of(st.just("ok"), junk), "run": junk, "heartbeat_s": junk}))
def test_a_resume_or_heartbeat_of_any_shape_is_refused_and_the_agent_serves_on(rig, msg):
    """resume {trace, run} and heartbeat_s (the control line's cut, docs/reliability.md) with
    fields of every type: refused with an error (no trace of that name and run here), a status
    served, never a dropped connection or a traceback."""
    ch = connect(rig["addr"], rig["key"], "agent", timeout=30)
    try:
        try:
            ch.send(msg)
        except VnetError:  # too big to send at all: nothing reached the agent
            return
        reply = ch.recv(("error", "status", "resumed", "gone"))
        assert reply["type"] == ("error" if msg["type"] == "resume" else "status"), (msg, reply)
        assert reply.get("exit_code") != 7, reply  # not "the agent could not serve" (a bug's traceback)
    finally:
        ch.close()
    assert rig["agent"].proc.poll() is None, "\n".join(rig["agent"].stderr[-20:])


def test_afterwards_nothing_attached_and_nothing_outside_the_spool(rig):
    outcomes = rig["outcomes"]
    print("outcomes:", dict(outcomes))
    # the generated requests reached every path: refusals, real traces started and stopped, checks
    assert outcomes["error"] >= 100 and outcomes["started"] >= 5 and outcomes["checked"] >= 5, outcomes
    ch = connect(rig["addr"], rig["key"], "agent", timeout=30)
    assert ch.request({"type": "status"}, ("status",))["running"] is False
    ch.close()
    deadline = time.monotonic() + 10
    while new_orphans(rig["before"]).progs and time.monotonic() < deadline:
        time.sleep(0.2)
    left = new_orphans(rig["before"])
    assert not left.progs and not left.links, left
    out = rig["tmp"] / "out"   # the collector's files
    outside = [p for p in rig["tmp"].rglob("*") if not (p in (rig["spool"], out) or rig["spool"] in p.parents
                                                        or out in p.parents or p.name in ("key", "a.sock", "c.sock"))]
    assert not outside, outside
    for dirpath, dirnames, filenames in os.walk(rig["spool"]):
        for d in dirnames + filenames:
            assert not d.startswith(".") or d.startswith(".tmp"), os.path.join(dirpath, d)
