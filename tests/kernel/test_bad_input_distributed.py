"""Bad user input to `vnet dispatch`, `vnet agent` and `vnet collect` (issue 11), the
matrix tests/kernel/test_bad_input.py runs for `vnet trace`: every case is exactly one
line on stderr naming the problem (for a host's problem: `host NAME: cause`), its own
exit code, nothing on stdout, no traceback; afterwards nothing of vnet is attached on
the agents' hosts and both agents and the collector still serve. Real CLI processes,
real agents in two network namespaces joined by a veth pair, a real collector.

Exit codes (vnet/errors.py, README): 2 usage (spec, options, keys, listen addresses,
folders), 3 not permitted, 4 no such interface or netns on the agent's host, 5 a probe
that host's kernel cannot run, 11 authentication failed, 12 agent unreachable."""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernel_support import assert_nothing_on, start_agent, start_collector, veth_pair, vnet_snapshot
from test_bad_input import _function_probes_work
from test_trace import assert_no_orphans, assert_one_error_line, run_cli
from vnet.protocol import connect, load_key, new_key

pytestmark = pytest.mark.kernel


@dataclass
class Rig:
    tmp: Path
    key: Path
    net: object
    socks: dict
    agents: dict
    collector: object
    col_sock: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badinput")
    key = new_key(tmp / "key")
    with veth_pair(94) as net:
        socks = {"a": tmp / "a.sock", "b": tmp / "b.sock"}
        agents, col = {}, None
        try:
            agents["a"] = start_agent(net.ns1, socks["a"], key, tmp / "spool-a", "a")
            agents["b"] = start_agent(net.ns2, socks["b"], key, tmp / "spool-b", "b")
            col = start_collector(f"unix:{tmp}/col.sock", key, tmp / "out")
            yield Rig(tmp, key, net, socks, agents, col, tmp / "col.sock")
        finally:
            for p in [*agents.values(), col]:
                if p is not None:
                    p.close()


def _still_serving(r: Rig) -> None:
    """Both agents answer a hello, the collector a handshake, and nothing of vnet is left on the veths."""
    for name, sock in r.socks.items():
        assert r.agents[name].proc.poll() is None, f"agent {name} exited:\n" + "\n".join(r.agents[name].stderr)
        ch = connect(f"unix:{sock}", load_key(r.key), "agent")
        try:
            hello = ch.request({"type": "hello"}, ("hello",))
        finally:
            ch.close()
        assert hello["host"] == name and not hello["busy"], hello
        # every refusal was a clean one: no request the agent did not foresee
        assert not [ln for ln in r.agents[name].stderr if "Traceback" in ln], "\n".join(r.agents[name].stderr)
    assert r.collector.proc.poll() is None
    connect(f"unix:{r.col_sock}", load_key(r.key), "collector").close()
    assert_nothing_on(r.net.ns1, r.net.if1)
    assert_nothing_on(r.net.ns2, r.net.if2)


# -- vnet dispatch ------------------------------------------------------------------------------------------

def _spec(r: Rig, **over) -> str:
    """A spec that would run (host a traces ifA, host b ifB) with some of its parts replaced."""
    v = {"trace": "", "expression": "udp", "a_agent": f"unix:{r.socks['a']}", "a_ifaces": f'"{r.net.if1}"',
         "a_extra": "", "b_ifaces": f'"{r.net.if2}"', "collector_key": str(r.key), **over}
    return f"""
[trace]
name = "bad"
duration = 1
{v['trace']}

[collector]
address = "unix:{r.col_sock}"
key = "{v['collector_key']}"

[filter]
expression = "{v['expression']}"

[[host]]
name = "a"
agent = "{v['a_agent']}"
interfaces = [{v['a_ifaces']}]
{v['a_extra']}

[[host]]
name = "b"
agent = "unix:{r.socks['b']}"
interfaces = [{v['b_ifaces']}]
"""


def _key_file(r: Rig, name: str, text: str | None = None, mode: int = 0o600) -> Path:
    path = r.tmp / name
    if text is None:
        new_key(path, force=True)
    else:
        path.write_text(text)
    os.chmod(path, mode)
    return path


# name -> (spec text or a path maker, extra args, exit code, words the line must hold)
DISPATCH = {
    "key file missing": (lambda r: _spec(r, collector_key="/nonexistent/vnet.key"), [], 2,
                         ["cannot read key /nonexistent/vnet.key", "vnet agent init"]),
    "key readable by others": (lambda r: _spec(r, collector_key=str(_key_file(r, "k644", None, 0o644))), [], 2,
                               ["readable by others", "chmod 600"]),
    "not a key": (lambda r: _spec(r, collector_key=str(_key_file(r, "knot", "hello\n"))), [], 2,
                  ["is not a vnet key"]),
    "wrong key": (lambda r: _spec(r, collector_key=str(_key_file(r, "kother"))), [], 11,
                  ["host a: ", "refused our key", "same key file"]),
    "spec missing": (lambda r: r.tmp / "nosuch.toml", [], 2, ["cannot read", "nosuch.toml"]),
    "spec is a directory": (lambda r: r.tmp, [], 2, ["cannot read", "Is a directory"]),
    "TOML syntax": (lambda r: "[trace\nname = 1\n", [], 2, ["spec.toml:1", "invalid TOML"]),
    "unknown key": (lambda r: _spec(r, trace='colour = "red"'), [], 2, ["trace.colour", "unknown key 'colour'"]),
    "wrong type": (lambda r: _spec(r, trace='count = "ten"'), [], 2, ["trace.count", "expected an integer"]),
    "unknown probe": (lambda r: _spec(r, a_extra='probes = ["nosuch:probe"]'), [], 2,
                      ["host[0].probes[0]", "no probe matches 'nosuch:probe'"]),
    "bad filter expression": (lambda r: _spec(r, expression="udp and"), [], 2, ["filter.expression", "libpcap"]),
    "option out of range": (lambda r: _spec(r), ["--nosuch"], 2, ["No such option: --nosuch"]),
    "unknown host": (lambda r: _spec(r, a_agent="nosuchhost.invalid:7878"), [], 12,
                     ["host a: cannot connect to nosuchhost.invalid:7878", "is a vnet agent listening"]),
    "agent not listening": (lambda r: _spec(r, a_agent=f"unix:{r.tmp}/nothing.sock"), [], 12,
                            ["host a: cannot connect to unix:", "No such file or directory"]),
    "wrong port (connection refused)": (lambda r: _spec(r, a_agent="127.0.0.1:9"), [], 12,
                                        ["host a: cannot connect to 127.0.0.1:9", "Connection refused"]),
    "no such interface": (lambda r: _spec(r, a_ifaces='"eth9"'), [], 4,
                          ["host a: no such interface: eth9", "ip link"]),
    "no such interface after a good one": (lambda r: _spec(r, a_ifaces=f'"{r.net.if1}", "eth9"'), [], 4,
                                           ["host a: no such interface: eth9"]),
    "no such netns": (lambda r: _spec(r, a_ifaces='"vnetnosuchns/eth0"'), [], 4,
                      ["host a: no such network namespace: vnetnosuchns"]),
    "second host's interface missing": (lambda r: _spec(r, b_ifaces='"eth9"'), [], 4,
                                        ["host b: no such interface: eth9"]),
    "probe this kernel cannot run (--strict)": (lambda r: _spec(r, a_extra='probes = ["bridge:forward"]'),
                                                ["--strict"], 5, ["host a: probe bridge:forward unavailable",
                                                                  "fentry or kprobe"]),
    "only a probe this kernel cannot run": (lambda r: _spec(r, a_ifaces="", a_extra='probes = ["bridge:forward"]'),
                                            [], 5, ["host a: ", "bridge:forward", "vnet probes"]),
}


@pytest.mark.parametrize("case", list(DISPATCH))
def test_dispatch_bad_input_is_one_line_and_nothing_attached(rig, case):
    make, args, code, needles = DISPATCH[case]
    if "cannot run" in case and _function_probes_work():
        pytest.skip("this kernel runs fentry or kprobe programs: the VM suite covers the refusal")
    before = vnet_snapshot()
    spec = make(rig)
    if isinstance(spec, str):
        path = rig.tmp / "spec.toml"
        path.write_text(spec)
        spec = path
    proc = run_cli("dispatch", str(spec), *args, timeout=90)
    assert "Traceback" not in proc.stderr
    assert_one_error_line(proc, code, *needles)
    assert_no_orphans(before)
    _still_serving(rig)


def test_a_good_spec_still_runs_after_the_bad_ones(rig):
    """The agents served every bad request above and still trace."""
    path = rig.tmp / "good.toml"
    path.write_text(_spec(rig))
    proc = run_cli("dispatch", str(path), "-q", timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "vnet: error" not in proc.stderr and "Traceback" not in proc.stderr
    assert "vnet: stopped (duration)" in proc.stderr
    _still_serving(rig)


def test_an_agent_busy_with_another_trace(rig):
    """One trace per agent: a second dispatcher is refused in one line (13) and the
    first trace goes on, untouched."""
    from kernel_support import VnetProcess

    path = rig.tmp / "long.toml"
    path.write_text(_spec(rig).replace("duration = 1", "duration = 30").replace('name = "bad"', 'name = "long"'))
    with VnetProcess("dispatch", str(path), "-q") as first:
        first.wait_stderr("b: tracing", timeout=60)
        again = rig.tmp / "again.toml"
        again.write_text(_spec(rig))
        proc = run_cli("dispatch", str(again), timeout=90)
        assert_one_error_line(proc, 13, "host a: the agent at unix:", "is already running a trace")
        assert first.proc.poll() is None
        first.signal(signal.SIGINT)
        assert first.wait(timeout=60) == 0, first.stderr
    assert "vnet: stopped (Ctrl-C)" in "\n".join(first.stderr)
    _still_serving(rig)


# -- vnet agent / vnet collect ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def busy_port():
    """A loopback TCP port something already listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


NO_CAPS = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")  # uid 0 with no capability at all

# name -> (options from (rig, busy port) over good ones: a key, a spool or out folder, a
# socket of their own; None leaves one out, True is a flag), prefix, exit code, words
AGENT = {
    "key file missing": (lambda r, p: {"--key": "/nonexistent/vnet.key"}, (), 2, ["cannot read key"]),
    "bad listen address": (lambda r, p: {"--listen": "nonsense"}, (), 2, ["address 'nonsense'", "HOST:PORT"]),
    "remote address without --allow-remote": (lambda r, p: {"--listen": "10.9.9.9:7878"}, (), 2,
                                              ["not a loopback address", "--allow-remote"]),
    "address not on this host": (lambda r, p: {"--listen": "192.0.2.1:7878", "--allow-remote": True}, (), 2,
                                 ["cannot listen on 192.0.2.1:7878", "Cannot assign requested address"]),
    "TCP port in use": (lambda r, p: {"--listen": f"127.0.0.1:{p}"}, (), 2,
                        ["cannot listen on 127.0.0.1:", "Address already in use"]),
    "unix socket of a running agent": (lambda r, p: {"--listen": f"unix:{r.socks['a']}"}, (), 2,
                                       ["a server is already listening there"]),
    "spool not writable": (lambda r, p: {"--spool": "/proc/vnet-spool"}, (), 2,
                           ["--spool /proc/vnet-spool is not a writable directory"]),
    "spool is a file": (lambda r, p: {"--spool": "/etc/hostname"}, (), 2,
                        ["--spool /etc/hostname exists and is not a directory"]),
    "queue size out of range": (lambda r, p: {"--queue-mb": "-1"}, (), 2, ["--queue-mb", "greater than or equal to 0"]),
    "unknown option": (lambda r, p: {"--nosuch": True}, (), 2, ["No such option: --nosuch"]),
    "without capabilities": (lambda r, p: {}, NO_CAPS, 3, ["CAP_BPF", "CAP_NET_ADMIN", "sudo"]),
}

COLLECT = {
    "key file missing": (lambda r, p: {"--key": "/nonexistent/vnet.key"}, (), 2, ["cannot read key"]),
    "out missing": (lambda r, p: {"--out": None}, (), 2, ["Missing option '--out'"]),
    "out is a file": (lambda r, p: {"--out": "/etc/hostname"}, (), 2,
                      ["--out /etc/hostname exists and is not a directory"]),
    "out not writable": (lambda r, p: {"--out": "/proc/vnet-out"}, (), 2,
                         ["--out /proc/vnet-out is not a writable directory"]),
    "bad listen address": (lambda r, p: {"--listen": "nonsense:port"}, (), 2, ["address 'nonsense:port'"]),
    "TCP port in use": (lambda r, p: {"--listen": f"127.0.0.1:{p}"}, (), 2, ["Address already in use"]),
    "unix socket of a running collector": (lambda r, p: {"--listen": f"unix:{r.col_sock}"}, (), 2,
                                           ["a server is already listening there"]),
    "rotate size out of range": (lambda r, p: {"--rotate-mb": "0"}, (), 2, ["--rotate-mb", "greater than or equal to 1"]),
}


def _options(given: dict, defaults: dict) -> list[str]:
    out: list[str] = []
    for opt, value in {**defaults, **given}.items():
        if value is True:
            out.append(opt)
        elif value is not None:
            out += [opt, str(value)]
    return out


@pytest.mark.parametrize("case", list(AGENT))
def test_agent_bad_input_is_one_line(rig, busy_port, case):
    make, prefix, code, needles = AGENT[case]
    before = vnet_snapshot()
    defaults = {"--key": rig.key, "--spool": rig.tmp / "spool-x", "--listen": f"unix:{rig.tmp}/x.sock"}
    proc = run_cli("agent", *_options(make(rig, busy_port), defaults), prefix=prefix, timeout=60)
    assert "Traceback" not in proc.stderr
    assert_one_error_line(proc, code, *needles)
    assert_no_orphans(before)
    _still_serving(rig)


@pytest.mark.parametrize("case", list(COLLECT))
def test_collect_bad_input_is_one_line(rig, busy_port, case):
    make, prefix, code, needles = COLLECT[case]
    defaults = {"--key": rig.key, "--out": rig.tmp / "out-x", "--listen": f"unix:{rig.tmp}/y.sock"}
    proc = run_cli("collect", *_options(make(rig, busy_port), defaults), prefix=prefix, timeout=60)
    assert "Traceback" not in proc.stderr
    assert_one_error_line(proc, code, *needles)
    _still_serving(rig)


def test_a_stale_socket_file_is_taken_over(rig, tmp_path):
    """The other side of refusing a live server's socket: the file a killed server left
    (nobody listening) does not stop a new one."""
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    from kernel_support import VnetProcess

    with VnetProcess("collect", "--listen", f"unix:{path}", "--key", str(rig.key), "--out",
                     str(tmp_path / "out"), python=sys.executable) as p:
        p.wait_stderr("collector listening on", timeout=20)
