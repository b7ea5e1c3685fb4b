"""Trace specs (vnet.dispatch.spec) and `vnet spec check`, no root: the shipped
examples pass; each kind of mistake is reported at its line and field; the
control packages survive msgpack and give back the same PacketFilter."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from vnet.dispatch import SpecError, control_package_to_filter, load, loads
from vnet.dispatch.spec import parse_duration, parse_size
from vnet.dispatch.tomlpos import Locator
from vnet.errors import UsageError
from vnet.trace.filters import PacketFilter

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
_SCRIPT = Path(sys.executable).parent / "vnet"
VNET = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "vnet"]


def _have_libpcap() -> bool:
    from vnet.binding import pcap

    try:
        pcap.lib()
    except Exception:
        return False
    return True


needs_libpcap = pytest.mark.skipif(not _have_libpcap(), reason="libpcap is not installed")

GOOD = """\
[trace]
duration = "10s"

[collector]
address = "127.0.0.1:7879"

[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
"""


# -- the shipped examples --------------------------------------------------------------------------

def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"device-dns.toml", "ovs-congestion.toml", "tail-latency.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path):
    if "expression" in path.read_text() and not _have_libpcap():
        pytest.skip("libpcap is not installed")
    spec = load(path)
    assert spec.hosts and spec.collector.address
    for host in spec.hosts:
        assert host.interfaces or host.run_probes


def test_examples_say_what_they_show():
    ovs = load(ROOT / "examples" / "ovs-congestion.toml")
    assert [h.name for h in ovs.hosts] == ["hv1", "vm1", "vm2"] and ovs.record == "events"
    hv1 = ovs.hosts[0]
    assert "ovs:*" in hv1.probes and "ovs:vport_receive" in hv1.run_probes and "ovs:*" not in hv1.run_probes
    assert all(h.filter.sample == "1/8" for h in ovs.hosts)
    assert ovs.hosts[1].directions == ("egress",)

    if _have_libpcap():
        tail = load(ROOT / "examples" / "tail-latency.toml")
        assert tail.record == "aggregate" and tail.interval_s == 10.0 and tail.duration_s == 300.0
        hv1, vm = tail.hosts
        assert "sched:runq" in hv1.run_probes and hv1.pids == (4242, 4243) and hv1.min_runq_ns == 50_000
        assert hv1.filter.expression == "tcp port 8080 and host 192.168.100.21"  # [host.filter] over [filter]
        assert vm.filter.expression == "tcp port 8080"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_vnet_spec_check(path):
    if "expression" in path.read_text() and not _have_libpcap():
        pytest.skip("libpcap is not installed")
    proc = subprocess.run([*VNET, "spec", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for host in load(path).hosts:
        assert f"host {host.name} (agent {host.agent})" in proc.stdout


# -- errors: line, field, message ------------------------------------------------------------------
# Each case marks the line the error must name with `# <-`.

ERRORS = [
    # unknown keys, with a suggestion
    ("typo", """
[trace]
duraton = "30s"  # <-
""", "trace.duraton", "unknown key 'duraton' (did you mean 'duration'?)"),
    ("typo in a host", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interface = ["tap1"]  # <-
""", "host[0].interface", "did you mean 'interfaces'?"),
    ("key in the wrong table", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
expression = "udp"  # <-
""", "host[0].expression", "it belongs in [filter] or [host.filter]"),
    ("unknown table", """
[colector]  # <-
address = "127.0.0.1:7879"
""", "colector", "did you mean 'collector'?"),
    # types
    ("string for an integer", """
[trace]
count = "10"  # <-
""", "trace.count", "expected an integer, got a string ('10')"),
    ("boolean is not an integer", """
[trace]
snaplen = true  # <-
""", "trace.snaplen", "expected an integer, got a boolean (true)"),
    ("not an array", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
probes = "net:*"  # <-
""", "host[0].probes", "expected an array, got a string"),
    ("one table instead of an array of tables", """
[host]  # <-
name = "hv1"
""", "host", "write [[host]]"),
    # values
    ("bad duration", """
[trace]
duration = "30 sec"  # <-
""", "trace.duration", "'30 sec' is not a duration"),
    ("zero duration", """
[trace]
duration = 0  # <-
""", "trace.duration", "more than 0"),
    ("bad record mode", """
[trace]
record = "histograms"  # <-
""", "trace.record", "use events, aggregate, both"),
    ("count with aggregate", """
[trace]
record = "aggregate"
count = 10  # <-
""", "trace.count", "not events"),
    ("snaplen", """
[trace]
snaplen = 20  # <-
""", "trace.snaplen", "use 0 (no packet bytes) or 64 to 256"),
    ("ring size not a power of two", """
[trace]
ring_size = "3MiB"  # <-
""", "trace.ring_size", "power of two"),
    ("ring size unit", """
[trace]
ring_size = "8 mb"  # <-
""", "trace.ring_size", "not a size"),
    ("no rings", """
[trace]
rings = 0  # <-
""", "trace.rings", "1 to 64, got 0"),
    ("too many rings", """
[trace]
rings = 65  # <-
""", "trace.rings", "1 to 64, got 65"),
    ("rings not a number", """
[trace]
rings = "per-cpu"  # <-
""", "trace.rings", "integer"),
    # addresses
    ("port out of range", """
[[host]]
name = "hv1"
agent = "10.0.0.1:99999"  # <-
""", "host[0].agent", "port 99999 is not 1-65535"),
    ("no port", """
[[host]]
name = "hv1"
agent = "10.0.0.1"  # <-
""", "host[0].agent", "HOST:PORT"),
    ("IPv6 without brackets", """
[[host]]
name = "hv1"
agent = "fd00::1:7878"  # <-
""", "host[0].agent", "put an IPv6 address in brackets"),
    ("bad host name", """
[[host]]
name = "hv1"
agent = "hv_1!:7878"  # <-
""", "host[0].agent", "not an IP address or host name"),
    ("relative unix path", """
[collector]
address = "unix:run/vnet.sock"  # <-
""", "collector.address", "must be absolute"),
    # hosts
    ("duplicate host name", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
[[host]]
name = "hv1"  # <-
agent = "10.0.0.2:7878"
""", "host[1].name", "host name 'hv1' is also host[0]'s"),
    ("duplicate agent", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
[[host]]
name = "hv2"
agent = "10.0.0.1:7878"  # <-
""", "host[1].agent", "is also host[0]'s (hv1)"),
    ("missing agent", """
[[host]]  # <-
name = "hv1"
interfaces = ["tap1"]
""", "host[0].agent", "missing (the agent's address"),
    ("nothing to trace", """
[[host]]  # <-
name = "hv1"
agent = "10.0.0.1:7878"
""", "host[0]", "nothing to trace"),
    # probes: catalog names and globs, never this kernel
    ("unmatched probe glob", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
probes = [
    "net:netif_receive_skb",
    "ovz:*",  # <-
]
""", "host[0].probes[1]", "no probe matches 'ovz:*' (did you mean 'ovs:*'?)"),
    ("misspelt probe", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
probes = ["net:netif_rx", "drop:kfree_skbb"]  # <-
""", "host[0].probes[1]", "did you mean 'drop:kfree_skb'?"),
    ("hook the probe lacks", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
probes = ["net:netif_rx@kprobe"]  # <-
""", "host[0].probes[0]", "has no kprobe hook (it has: tp_btf, raw_tp, tracepoint)"),
    ("device probe direction", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
probes = ["dev:tap*:sideways"]  # <-
""", "host[0].probes[0]", "bad direction"),
    ("probe listed twice", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
probes = ["ovs:*",
          "ovs:*"]  # <-
""", "host[0].probes[1]", "listed twice"),
    ("pids without a sched probe", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
pids = [1234]  # <-
""", "host[0].pids", "only sched:* probes use it"),
    # interfaces
    ("interface name too long", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1", "ns1/averyverylongname0"]  # <-
""", "host[0].interfaces[1]", "longer than 15 characters"),
    ("empty namespace", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["/eth0"]  # <-
""", "host[0].interfaces[0]", "empty network namespace name"),
    # filters
    ("bad port", """
[filter]
dport = 70000  # <-
""", "filter.dport", "70000 is not a port (1-65535)"),
    ("bad port in a host's filter", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
[host.filter]
sport = 0  # <-
""", "host[0].filter.sport", "0 is not a port"),
    ("bad port in an inline table", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
filter = { proto = "udp", port = 65536 }  # <-
""", "host[0].filter.port", "not a port"),
    ("bad port under a dotted key", """
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
filter.dport = -1  # <-
""", "host[0].filter.dport", "not a port"),
    ("bad address", """
[filter]
src = "10.0.0.300"  # <-
""", "filter.src", "'10.0.0.300' is not an address or prefix"),
    ("unknown protocol", """
[filter]
proto = "udpp"  # <-
""", "filter.proto", "unknown protocol 'udpp'"),
    ("bad sample", """
[filter]
sample = "2/10"  # <-
""", "filter.sample", "use 1/N with N >= 1"),
    ("max_len below the global min_len", """
[filter]
min_len = 100
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
[host.filter]
max_len = 50  # <-
""", "host[0].filter.max_len", "below min_len (100)"),
    ("IPv4 and IPv6 mixed", """
[filter]
src = "10.0.0.1"
[[host]]
name = "hv1"
agent = "10.0.0.1:7878"
interfaces = ["tap1"]
[host.filter]  # <-
dst = "fd00::1"
""", "host[0].filter", "mixes IPv4 and IPv6"),
    ("too many filter interfaces", """
[filter]
ifaces = ["a", "b", "c", "d", "e"]  # <-
""", "filter.ifaces", "1 to 4 interfaces"),
]


def _spec_text(snippet: str) -> str:
    """The snippet, completed with the sections it does not have."""
    text = snippet.lstrip("\n")
    if "[collector]" not in text:
        text += '\n[collector]\naddress = "127.0.0.1:7879"\n'
    if "host]" not in text:
        text += '\n[[host]]\nname = "hv0"\nagent = "10.0.0.9:7878"\ninterfaces = ["tap0"]\n'
    return text


def _marked_line(text: str) -> int:
    (line,) = [n for n, s in enumerate(text.splitlines(), 1) if "# <-" in s]
    return line


@pytest.mark.parametrize("what,snippet,field,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_names_line_and_field(what, snippet, field, message):
    text = _spec_text(snippet)
    with pytest.raises(SpecError) as err:
        loads(text, "spec.toml")
    e = err.value
    assert (e.line, e.field) == (_marked_line(text), field), f"{e}\n---\n{text}"
    assert message in e.reason
    assert str(e).startswith(f"spec.toml:{e.line}: {field}: ")
    assert isinstance(e, UsageError) and e.exit_code == 2


@needs_libpcap
def test_bad_tcpdump_expression_gets_libpcaps_message():
    text = GOOD + '[host.filter]\nexpression = "udp and prt 53"\n'
    with pytest.raises(SpecError) as err:
        loads(text, "spec.toml")
    assert (err.value.line, err.value.field) == (12, "host[0].filter.expression")
    assert err.value.reason == "libpcap: syntax error in filter expression"


def test_toml_syntax_error_is_tomllibs_message():
    text = GOOD.replace('name = "hv1"', 'name = hv1')
    with pytest.raises(SpecError) as err:
        loads(text, "spec.toml")
    assert err.value.line == 8 and err.value.field is None
    assert str(err.value) == "spec.toml:8: invalid TOML: Invalid value (at line 8, column 8)"


def test_missing_sections_have_no_line():
    with pytest.raises(SpecError) as err:
        loads('[collector]\naddress = "127.0.0.1:7879"\n', "spec.toml")
    assert str(err.value).startswith("spec.toml: host: missing (one [[host]] table per host)")


def test_defaults():
    spec = loads(GOOD, "/tmp/My spec.toml")
    assert spec.name == "My-spec"  # the file's stem, made a name
    assert (spec.record, spec.count, spec.snaplen, spec.ring_bytes, spec.strict) == ("events", None, 0, 8 << 20, False)
    assert spec.duration_s == 10.0 and spec.interval_s is None and spec.collector.key is None
    host = spec.hosts[0]
    assert host.directions == ("ingress", "egress") and host.filter == PacketFilter() and host.line == 7


def test_probes_are_not_resolved_against_this_kernel():
    # ovs and xen probes exist on few machines; the spec names them all the same.
    spec = loads(GOOD.replace('interfaces = ["tap1"]', 'probes = ["xen:*", "ovs:vport_receive@kprobe"]'))
    assert spec.hosts[0].run_probes == ("xen:start_xmit", "xen:tx_action", "xen:rx_action",
                                        "ovs:vport_receive@kprobe")


# -- control packages ------------------------------------------------------------------------------

def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _specs():
    yield from (load(p) for p in EXAMPLES if _have_libpcap() or "expression" not in p.read_text())
    yield loads(GOOD + """
[host.filter]
proto = "tcp"
host = "fd00::/64"
port = 443
min_len = 60
max_len = 1500
sample = 16
outer = true
netns = "ns1"
ifaces = ["veth1", "veth2"]
""")


def test_control_packages_round_trip_through_msgpack():
    for spec in _specs():
        packages = spec.control_packages()
        assert list(packages) == [h.name for h in spec.hosts]
        for host in spec.hosts:
            pkg = packages[host.name]
            assert _plain(pkg)
            back = msgpack.unpackb(msgpack.packb(pkg))
            assert back == pkg
            assert control_package_to_filter(back) == host.filter
            assert back["version"] == 1 and back["host"] == host.name and back["trace"] == spec.name
            assert back["collector"] == {"address": spec.collector.address}  # the key file stays home


def test_the_specs_rings_reach_every_agent_and_by_default_none_is_said():
    with_rings = GOOD.replace('duration = "10s"\n', 'duration = "10s"\nrings = 2\n')
    assert loads(with_rings).control_packages()["hv1"]["rings"] == 2
    assert loads(GOOD).control_packages()["hv1"]["rings"] is None  # the agent's CPUs decide


def test_control_package_fields():
    pkg = loads(GOOD + '[host.filter]\nifaces = ["veth1"]\nsample = 16\n').control_packages()["hv1"]
    assert pkg == {"version": 1, "trace": "trace", "host": "hv1", "interfaces": ["tap1"],
                   "directions": ["ingress", "egress"], "probes": [], "pids": [], "min_runq_ns": 0,
                   "filter": {"ifaces": ["veth1"], "sample": "16"}, "record": "events", "duration_s": 10.0,
                   "count": None, "interval_s": None, "snaplen": 0, "ring_bytes": 8 << 20, "rings": None,
                   "strict": False,
                   "hypervisor": None, "collector": {"address": "127.0.0.1:7879"}}
    assert control_package_to_filter(pkg) == PacketFilter(sample="16", ifaces=("veth1",))


GUEST = GOOD + """
[[host]]
name = "vm1"
agent = "10.0.0.2:7878"
interfaces = ["eth0"]
hypervisor = "{hv}"
"""


def test_a_guest_names_its_hypervisor_among_the_hosts():
    spec = loads(GUEST.format(hv="hv1"))
    assert spec.hosts[1].hypervisor == "hv1" and spec.hosts[0].hypervisor is None
    assert spec.control_packages()["vm1"]["hypervisor"] == "hv1"  # into the guest's file header
    for bad, why in (("hv9", "'hv9' is not another host of this spec"), ("vm1", "'vm1' is not another host")):
        with pytest.raises(SpecError, match=why) as e:
            loads(GUEST.format(hv=bad))
        assert "host[1].hypervisor" in str(e.value)


def test_control_package_to_filter_refuses_what_it_does_not_know():
    pkg = loads(GOOD).control_packages()["hv1"]
    with pytest.raises(UsageError, match="version 2"):
        control_package_to_filter({**pkg, "version": 2})
    with pytest.raises(UsageError, match="unknown filter fields bogus"):
        control_package_to_filter({**pkg, "filter": {"bogus": 1}})


def test_every_filter_field_has_a_spec_key():
    from vnet.dispatch.spec import FILTER_FIELDS

    assert set(FILTER_FIELDS) == {f.name for f in dataclasses.fields(PacketFilter)}


# -- values and the locator ------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("30s", 30), ("2m", 120), ("500ms", 0.5), ("1m30s", 90), ("1.5h", 5400),
                                          ("250us", 250e-6), ("45", 45), (12, 12), (0.25, 0.25)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "30 sec", "1d", "m30", "-5s", "5s!"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text,size", [("8MiB", 8 << 20), ("64KiB", 64 << 10), ("1G", 1 << 30), ("4096", 4096),
                                       (4096, 4096), ("1MB", 10**6), ("16 MiB", 16 << 20)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_locator_follows_tables_arrays_and_strings():
    text = '''\
# comment [not = a table]
[trace]
name = "a # not a comment [x]"
a.b = 1.5
[[host]]
name = 'x'
probes = [
  "p0",  # comment, "p9"
  ["n0", "n1"], { k = 1, d.e = """multi
line ] string"""},
  "p3" ]
[host.filter]
when = 1979-05-27 07:32:00Z
[[host]]
[host.filter]
q = { r = [1,
  2] }
[[host.sub]]
[[host.sub]]
v = 1
'''
    import tomllib

    tomllib.loads(text)  # the scanner only sees text tomllib accepts
    lines = Locator(text).lines
    assert lines[("trace",)] == 2 and lines[("trace", "name")] == 3 and lines[("trace", "a", "b")] == 4
    assert lines[("host", 0)] == 5 and lines[("host", 0, "probes")] == 7
    assert [lines[("host", 0, "probes", i)] for i in range(4)] == [8, 9, 9, 11]
    assert lines[("host", 0, "probes", 1, 1)] == 9 and lines[("host", 0, "probes", 2, "d", "e")] == 9
    assert lines[("host", 0, "filter", "when")] == 13
    assert lines[("host", 1)] == 14 and lines[("host", 1, "filter")] == 15
    assert lines[("host", 1, "filter", "q", "r", 1)] == 17
    assert lines[("host", 1, "sub", 1)] == 19 and lines[("host", 1, "sub", 1, "v")] == 20
    # Not there: the nearest enclosing table.
    assert Locator(text).line(("host", 1, "filter", "missing")) == 15


# -- the command -----------------------------------------------------------------------------------

def test_cli_check_good_and_json(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    proc = subprocess.run([*VNET, "spec", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "host hv1 (agent 10.0.0.1:7878)" in proc.stdout and "tap1 (ingress and egress)" in proc.stdout
    proc = subprocess.run([*VNET, "spec", "check", "--json", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == loads(GOOD, str(path)).control_packages()


def test_cli_check_bad_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('interfaces = ["tap1"]', 'interfaces = ["tap1"]\nprobes = ["ovz:*"]'))
    proc = subprocess.run([*VNET, "spec", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"vnet: error: {path}:11: host[0].probes[0]: no probe matches 'ovz:*' "
                                        "(did you mean 'ovs:*'?)"]


def test_cli_check_missing_file(tmp_path):
    proc = subprocess.run([*VNET, "spec", "check", str(tmp_path / "none.toml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "cannot read" in proc.stderr
