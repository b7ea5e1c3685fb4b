"""Pure logic of how a Trace chooses the kernel hooks' parse (bpf/src/vnet_packet.bpf.h
parse_cfg: the packet read in place, one copy, or a read per header): what features says,
and the way back, one step at a time, when a verifier refuses a way after all; and what a
failed count of the possible CPUs becomes.

The kernel is faked here: Trace._load is replaced by a stand-in that refuses (as a
VerifierError) whatever was to be loaded in the ways it is told to refuse, as a kernel
whose verifier passed the features' probes but not the parser would. tests/kernel/test_features.py and
tests/vm/test_parse_copy_guest.py load the real objects on 6.18 and 6.1."""

from __future__ import annotations

import errno
import logging

import pytest

from vnet.errors import VerifierError
from vnet.probes import features
from vnet.probes.features import Feature, Support
from vnet.trace.session import Plan, Trace


def plan(obj: str, name: str) -> Plan:
    return Plan(obj, "cfg", {}, ("prog",), lambda o: [], {}, name=name)


def way(trace: Trace, p: Plan) -> str:
    """How `p`'s object is loaded: "direct" (the packet read in place), "copy" or "reads"."""
    return "direct" if trace._parse_direct_for(p) else "copy" if trace._parse_copy_for(p) else "reads"


class FakeKernel:
    """Stands in for Trace._load: records (plan name, parse way) and refuses the ways in `refuse`."""

    def __init__(self, refuse: tuple[str, ...] = ()):
        self.refuse = refuse
        self.loads: list[tuple[str, str]] = []

    def __call__(self, trace: Trace, p: Plan, probe_id: int):
        w = way(trace, p)
        self.loads.append((p.name, w))
        if w in self.refuse:
            raise VerifierError("load", errno.E2BIG, f"{p.obj}.bpf.o", "BPF program is too large. Processed 1000001 insn")
        return object(), []


@pytest.fixture
def answer(monkeypatch):
    """features' answer: one Support for every feature, or per feature name."""
    def set_answer(support: Support | dict[str, Support]) -> None:
        pick = support.get if isinstance(support, dict) else (lambda name: support)
        monkeypatch.setattr(features, "check", lambda name: Feature(name, pick(name), "faked"))
    return set_answer


def run(monkeypatch, kernel: FakeKernel, **kw) -> Trace:
    monkeypatch.setattr(Trace, "_load", lambda self, p, probe_id: kernel(self, p, probe_id))
    t = Trace([plan("tc_trace", "dev"), plan("skb_trace", "tp1"), plan("drop", "drop"), plan("skb_trace", "tp2")],
              **kw)
    for i, p in enumerate(t.plans):
        t._load_or_fall_back(p, i)
    return t


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_fake_kernel_reads_in_place_where_features_says_so(monkeypatch, answer):
    answer(Support.SUPPORTED)
    kernel = FakeKernel()
    run(monkeypatch, kernel)
    assert kernel.loads == [("dev", "reads"), ("tp1", "direct"), ("drop", "direct"), ("tp2", "direct")]


def test_fake_kernel_copy_where_features_says_so_but_not_in_place(monkeypatch, answer):
    answer({"parse_copy": Support.SUPPORTED, "parse_direct": Support.UNSUPPORTED})
    kernel = FakeKernel()
    run(monkeypatch, kernel)
    assert kernel.loads == [("dev", "reads"), ("tp1", "copy"), ("drop", "copy"), ("tp2", "copy")]


def test_fake_kernel_header_reads_where_features_says_no(monkeypatch, answer):
    answer(Support.UNSUPPORTED)
    kernel = FakeKernel()
    run(monkeypatch, kernel)
    assert kernel.loads == [("dev", "reads"), ("tp1", "reads"), ("drop", "reads"), ("tp2", "reads")]


def test_fake_kernel_asked_for_reads_never_copies_nor_reads_in_place(monkeypatch, answer):
    answer(Support.SUPPORTED)
    kernel = FakeKernel()
    run(monkeypatch, kernel, parse_copy=False)
    assert [w for _, w in kernel.loads] == ["reads"] * 4


def test_fake_kernel_asked_for_the_copy_does_not_read_in_place(monkeypatch, answer):
    answer(Support.SUPPORTED)
    kernel = FakeKernel()
    run(monkeypatch, kernel, parse_copy=True, parse_direct=False)
    assert [w for _, w in kernel.loads] == ["reads", "copy", "copy", "copy"]


def test_fake_kernel_refusing_in_place_falls_back_to_the_copy_once_and_for_the_rest(monkeypatch, answer, caplog):
    answer(Support.SUPPORTED)
    kernel = FakeKernel(refuse=("direct",))
    with caplog.at_level(logging.WARNING, logger="vnet"):
        t = run(monkeypatch, kernel)
    assert kernel.loads == [("dev", "reads"), ("tp1", "direct"), ("tp1", "copy"), ("drop", "copy"), ("tp2", "copy")]
    assert t.parse_direct is False and t.parse_copy is True
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "tp1: the verifier refused reading the packet in place (E2BIG)" in warnings[0]


def test_fake_kernel_refusing_the_copy_falls_back_once_and_for_the_rest(monkeypatch, answer, caplog):
    answer(Support.SUPPORTED)
    kernel = FakeKernel(refuse=("direct", "copy"))
    with caplog.at_level(logging.WARNING, logger="vnet"):
        t = run(monkeypatch, kernel)
    assert kernel.loads == [("dev", "reads"), ("tp1", "direct"), ("tp1", "copy"), ("tp1", "reads"), ("drop", "reads"),
                            ("tp2", "reads")]
    assert t.parse_copy is False
    warnings = warnings_of(caplog)
    assert len(warnings) == 2 and "tp1: the verifier refused the parse from a copy (E2BIG)" in warnings[1]


def test_fake_kernel_other_refusals_are_not_retried(monkeypatch, answer):
    """Without the copy, a refusal is the program's own: raised as it was."""
    answer(Support.UNSUPPORTED)
    kernel = FakeKernel()

    def refuse(self, p, probe_id):
        kernel.loads.append((p.name, way(self, p)))
        raise VerifierError("load", errno.EACCES, "skb_trace.bpf.o", "R2 invalid mem access 'scalar'")

    monkeypatch.setattr(Trace, "_load", refuse)
    t = Trace([plan("skb_trace", "tp1")])
    with pytest.raises(VerifierError):
        t._load_or_fall_back(t.plans[0], 0)
    assert kernel.loads == [("tp1", "reads")]


# -- the possible-CPU count (per-CPU map reads) ---------------------------------------------------------
def test_fake_libbpf_without_a_descriptor_for_the_cpu_count_is_a_resource_error(monkeypatch):
    """libbpf_num_possible_cpus() answers -EMFILE when its first call cannot open
    /sys/devices/system/cpu/possible (a trace near its open-file limit once read its counters
    that way: a negative buffer size, an internal error). Faked: a libbpf that answers so."""
    from vnet.binding import object as bpfobject
    from vnet.errors import BpfResourceError

    class FakeLib:
        def libbpf_num_possible_cpus(self):
            return -errno.EMFILE

    monkeypatch.setattr(bpfobject, "lib", lambda: FakeLib())
    with pytest.raises(BpfResourceError) as e:
        bpfobject.possible_cpus()
    assert e.value.exit_code == 14 and "possible CPUs" in str(e.value)
