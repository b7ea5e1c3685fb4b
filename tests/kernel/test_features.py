"""Feature probing (vnet.probes.features) and `vnet doctor` on the running kernel.

Nothing is faked: every answer comes from loading and attaching vnet's own
programs. The expectations are this test host's: Linux 6.18 with BTF, tcx,
tp_btf and raw_tp, where fentry loads are refused with EPERM (function tracing
locked down), there are no kprobes, and tracefs is not mounted. Where the test
asserts an errno, it repeats the attempt itself and compares with what the
probe reported, so the expected errno is the kernel's, not a constant.

Needs root (tests/kernel/conftest.py skips otherwise); uses bpftool and setpriv.
Other vnet processes may load programs concurrently: leak checks look only at
IDs that appeared while probing, and at who (which process fd) holds them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_support import bpftool_json

from vnet.binding import BpfObject
from vnet.errors import BpfError, NotPermittedError, UnsupportedError
from vnet.objects import object_path
from vnet.probes import features
from vnet.probes.features import Support

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
SUPPORTED_HERE = ("btf", "ringbuf", "tp_btf", "raw_tp", "tcx", "tc_link", "prog_test_run", "capabilities", "libbpf",
                  "parse_copy", "parse_direct")
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
# Root without any capability (bounding set emptied before exec): the fallback where nobody cannot run Python.
NO_CAPS_ROOT = ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]


# -- what the kernel holds -------------------------------------------------------------------------------
def _vnet_progs() -> dict[int, str]:
    return {p["id"]: p.get("name", "") for p in bpftool_json("prog", "show") if p.get("name", "").startswith("vnet_")}


def _links() -> dict[int, int]:
    return {link["id"]: link.get("prog_id", 0) for link in bpftool_json("link", "show")}


def _held_ids() -> tuple[set[int], set[int]]:
    """Program and link IDs some process holds an fd to (fdinfo prog_id/link_id)."""
    progs, links = set(), set()
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "prog_id":
                progs.add(int(value))
            elif key == "link_id":
                links.add(int(value))
    return progs, links


def _own_bpf_fds() -> set[tuple[int, str]]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "bpf" in target:
            fds.add((int(fd), target))
    return fds


def _lo_tc() -> str:
    """lo's qdiscs and ingress/egress filters in this namespace, as tc shows them."""
    if not shutil.which("tc"):
        return ""
    return "".join(subprocess.run(["tc", *args, "show", "dev", "lo", *extra], capture_output=True, text=True,
                                  timeout=30).stdout
                   for args, extra in ((["qdisc"], []), (["filter"], ["ingress"]), (["filter"], ["egress"])))


def _orphans(progs_before: dict[int, str], links_before: dict[int, int], deadline_s: float = 5.0) -> list[str]:
    """vnet programs and links that appeared since the snapshots and that no process
    holds (still attached somewhere, or pinned); waits out the kernel's deferred frees."""
    deadline = time.monotonic() + deadline_s
    while True:
        progs = {i: n for i, n in _vnet_progs().items() if i not in progs_before}
        links = {i: p for i, p in _links().items() if i not in links_before and p in progs}
        held_progs, held_links = _held_ids()
        linked = set(links.values())
        left = [f"prog {i} {n}" for i, n in progs.items() if i not in held_progs and i not in linked]
        left += [f"link {i} (prog {p})" for i, p in links.items() if i not in held_links]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module")
def probed():
    """Every feature probed afresh in this process, with the kernel's state around it."""
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed")
    progs_before, links_before, fds_before, lo_before = _vnet_progs(), _links(), _own_bpf_fds(), _lo_tc()
    features.clear_cache()
    t0 = time.monotonic()
    found = features.all_features()
    elapsed = time.monotonic() - t0
    fds_after, lo_after = _own_bpf_fds(), _lo_tc()
    orphans = _orphans(progs_before, links_before)
    print(f"\nall_features() probed in {elapsed:.3f} s")
    return {"features": {f.name: f for f in found}, "order": [f.name for f in found], "elapsed": elapsed,
            "fds_before": fds_before, "fds_after": fds_after, "orphans": orphans,
            "lo_before": lo_before, "lo_after": lo_after}


# -- answers on this host -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SUPPORTED_HERE)
def test_supported_here(probed, name):
    f = probed["features"][name]
    assert f.support is Support.SUPPORTED, f
    assert f.ok and f.detail and f.hint == ""
    features.require(name)  # does not raise


def test_every_feature_answers_in_display_order(probed):
    assert probed["order"] == list(features.NAMES)
    assert all(f.detail for f in probed["features"].values())
    assert probed["elapsed"] < 10


def _fentry_errno() -> int:
    """The same fentry attempt as the probe, made here: the errno the kernel returns."""
    with BpfObject(object_path("skb_trace")) as o:
        o.keep_programs(["vnet_fentry_skb"])
        o.set_config("skb_cfg", {"skb_arg": 1})
        prog = o.programs["vnet_fentry_skb"]
        prog.set_attach_target("netif_receive_skb")
        try:
            o.load()
            prog.attach_trace().detach()
        except BpfError as e:
            return e.errno
    return 0


def test_fentry_unsupported_with_the_kernels_errno(probed):
    err = _fentry_errno()
    assert err == errno.EPERM, "this host refuses fentry with EPERM (function tracing locked down)"
    f = probed["features"]["fentry"]
    assert f.support is Support.UNSUPPORTED
    assert f.detail == "program load refused: EPERM (function tracing is locked down?)"
    assert errno.errorcode[err] in f.detail
    with pytest.raises(UnsupportedError) as exc:
        features.require("fentry")
    assert exc.value.message == (
        "fentry not supported on this kernel (requires >= 5.5 with BPF trampolines "
        "(CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS); here: program load refused: EPERM "
        "(function tracing is locked down?))")
    assert exc.value.exit_code == 5 and "fentry or kprobe" in exc.value.hint


def test_kprobe_unsupported_with_the_kernels_errno(probed):
    fn = features._probe_function()
    with BpfObject(object_path("skb_trace")) as o:
        o.keep_programs(["vnet_kprobe_skb"])
        o.set_config("skb_cfg", {"skb_arg": 1})
        o.load()  # the program type loads; attaching is what this kernel cannot do
        with pytest.raises(BpfError) as exc:
            o.programs["vnet_kprobe_skb"].attach_kprobe(fn)
    name = errno.errorcode[exc.value.errno]
    f = probed["features"]["kprobe"]
    assert f.support is Support.UNSUPPORTED
    assert f.detail.startswith("kprobes not available")
    assert f"refused: {name} (" in f.detail
    assert f.error().message.startswith("kprobe not supported on this kernel (requires CONFIG_KPROBES=y; here: ")


def test_kprobe_multi_and_tracepoint_unsupported_here(probed):
    km = probed["features"]["kprobe_multi"]
    assert km.support is Support.UNSUPPORTED and "BPF_TRACE_KPROBE_MULTI" in km.detail
    tp = probed["features"]["tracepoint"]
    if features.tracefs_events() is None:
        assert tp.support is Support.UNSUPPORTED
        assert tp.detail == "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
    else:  # someone mounted tracefs: then the real attach decides
        assert tp.support is Support.SUPPORTED, tp


def test_tc_link_is_the_tcx_answer(probed):
    tcx, link = probed["features"]["tcx"], probed["features"]["tc_link"]
    assert link.name == "tc_link" and link.support is tcx.support and tcx.detail in link.detail


def test_clsact_probed_in_a_throwaway_namespace(probed):
    f = probed["features"]["clsact"]
    assert f.support is Support.SUPPORTED, f
    assert "throwaway network namespace" in f.detail
    # Only the throwaway namespace got a clsact qdisc: lo's here are as they were.
    assert probed["lo_after"] == probed["lo_before"]


def test_lockdown_answer_is_derived(probed):
    f = probed["features"]["lockdown"]
    assert f.support is Support.SUPPORTED, f
    if not os.path.exists(features.LOCKDOWN):
        assert "program reading kernel memory loaded" in f.detail


def test_results_are_cached(probed):
    for name in features.NAMES:
        if probed["features"][name].support is not Support.INCONCLUSIVE:
            assert features.check(name) is probed["features"][name]


def test_inconclusive_is_not_cached_and_needs_root():
    """As nobody, tcx cannot be probed: INCONCLUSIVE, a new answer each call, and
    require() says it is about privileges (exit 3), not a missing kernel feature."""
    code = ("from vnet.probes import features as f\n"
            "a, b = f.check('tcx'), f.check('tcx')\n"
            "e = a.error()\n"
            "print(a.support.name, a is b, a == b, type(e).__name__, e.exit_code)\n"
            "print(a.detail)\n")
    r = _run_unprivileged([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    first, detail = r.stdout.splitlines()[:2]
    assert first == "INCONCLUSIVE False True MissingPrivilegesError 3"
    assert detail.startswith(features.NEEDS_ROOT) and "CAP_BPF" in detail


def test_parse_copy_decides_how_kernel_hooks_are_loaded(probed, monkeypatch):
    """6.18 prunes the probe's 8 two-way stack slots as it walks them (~170 instructions, where
    Linux 6.1 walks all 256 combinations: tests/vm/test_parse_copy_guest.py): a tracepoint's
    object is loaded with parse_cfg.copy set; with the feature withheld (VNET_WITHOUT), as on
    6.1, without it; tc's programs never have it set (they read the packet directly)."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver
    from vnet.trace import Trace

    f = probed["features"]["parse_copy"]
    walked = int(f.detail.split(" took ")[1].split()[0])
    assert 8 * 8 < walked <= features.PRUNE_LINEAR_MAX, f.detail

    def copy_flag(**kw) -> int:
        plan = resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"]))
        with Trace([plan], ring_bytes=1 << 16, **kw) as t:
            return t.objects[0].config("parse_cfg")["copy"]

    assert copy_flag() == 1
    assert copy_flag(parse_copy=False) == 0
    monkeypatch.setenv(features.WITHOUT_ENV, "parse_copy")
    features.clear_cache()
    try:
        assert copy_flag() == 0
    finally:
        monkeypatch.delenv(features.WITHOUT_ENV)
        features.clear_cache()


def test_parse_direct_decides_whether_typed_hooks_read_the_packet_in_place(probed, monkeypatch):
    """6.18 types a load of skb->head in a tp_btf program as read-only untrusted memory, so
    the probe's load through it passes: tracepoint objects are loaded with parse_cfg.direct
    set, on the copy; withheld (VNET_WITHOUT), or without the copy, they are not. Linux 6.1
    refuses the probe (tests/vm/test_parse_copy_guest.py)."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver
    from vnet.trace import Trace

    assert probed["features"]["parse_direct"].ok, probed["features"]["parse_direct"]

    def parse_cfg(**kw) -> dict:
        plan = resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"]))
        with Trace([plan], ring_bytes=1 << 16, **kw) as t:
            return t.objects[0].config("parse_cfg")

    assert parse_cfg() == {"copy": 1, "direct": 1}
    assert parse_cfg(parse_copy=False) == {"copy": 0, "direct": 0}
    monkeypatch.setenv(features.WITHOUT_ENV, "parse_direct")
    features.clear_cache()
    try:
        assert parse_cfg() == {"copy": 1, "direct": 0}
    finally:
        monkeypatch.delenv(features.WITHOUT_ENV)
        features.clear_cache()


def test_probing_leaves_nothing_behind(probed):
    assert probed["fds_after"] == probed["fds_before"], "a probe kept a BPF fd open"
    assert probed["orphans"] == [], "a probe left a program or link in the kernel"


def test_require_raises_the_features_error():
    with pytest.raises(UnsupportedError):
        features.require("kprobe")
    with pytest.raises(KeyError):
        features.require("no_such_feature")


# -- vnet doctor -------------------------------------------------------------------------------------------
def _doctor(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "vnet", "doctor", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def _lines(out: str) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines() if line and line.split()[0] in ("ok", "missing", "?")}


def test_doctor_exit_0_and_lists_missing_function_hooks_with_hints():
    progs_before, links_before = _vnet_progs(), _links()
    t0 = time.monotonic()
    r = _doctor()
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _lines(r.stdout)
    assert list(lines) == list(features.NAMES)
    for name in ("fentry", "kprobe"):
        assert lines[name].startswith("missing "), lines[name]
        assert "(hint: kernel functions (OVS/bridge/veth/Xen probes) need fentry or kprobe" in lines[name]
    for name in SUPPORTED_HERE:
        assert lines[name].startswith("ok "), lines[name]
        assert "hint" not in lines[name]
    assert "EPERM" in lines["fentry"]
    assert r.stdout.rstrip().splitlines()[-1].startswith("vnet doctor: device probes (tcx) and tracepoint probes")
    assert r.stderr == ""  # libbpf's complaints about refused attempts stay quiet without -v
    assert _orphans(progs_before, links_before) == []
    print(f"\nvnet doctor ran in {elapsed:.3f} s")


def test_doctor_json():
    r = _doctor("--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == list(features.NAMES)
    assert all(set(row) == {"name", "support", "detail", "requires", "hint"} for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["fentry"]["support"] == "unsupported" and by_name["fentry"]["hint"]
    assert by_name["btf"]["support"] == "supported"
    assert by_name["tcx"]["requires"] == ">= 6.6"


def _unprivileged_prefix() -> list[str]:
    """setpriv as nobody where nobody can run this Python; else root with every capability dropped."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed")
    probe = subprocess.run(["setpriv", *NOBODY, sys.executable, "-c", "import vnet.cli.main"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode == 0:
        return ["setpriv", *NOBODY]
    # nobody cannot read the interpreter or the venv (e.g. Python under a 0700 /root): the
    # capabilities are what doctor checks, and root without any is the same answer.
    return ["setpriv", *NO_CAPS_ROOT]


def _run_unprivileged(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*_unprivileged_prefix(), *cmd], capture_output=True, text=True, timeout=120, cwd="/")


def test_doctor_without_capabilities_is_exit_3():
    prefix = _unprivileged_prefix()
    r = subprocess.run([*prefix, sys.executable, "-m", "vnet", "doctor"], capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == NotPermittedError.exit_code == 3, r.stdout + r.stderr
    lines = _lines(r.stdout)
    cap = lines["capabilities"]
    assert cap.startswith("missing ")
    assert "missing CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN" in cap
    assert "(running as uid 65534)" in cap if "--reuid=65534" in prefix else "(running as root)" in cap
    assert "(hint: run as root" in cap
    # What needs privileges to probe is unknown, not missing.
    for name in ("tcx", "tp_btf", "raw_tp", "fentry", "kprobe", "ringbuf"):
        assert lines[name].startswith("? ") and features.NEEDS_ROOT in lines[name], lines[name]
    assert lines["btf"].startswith("ok ")
    assert "missing capabilities" in r.stdout.splitlines()[-1]
