"""Pure logic of vnet.probes.features and `vnet doctor`: how an answer becomes an
error sentence and an error class, and how a list of answers becomes doctor's
exit code and output.

This is the only place where feature answers are faked: the Feature values
below are constructed by hand, to reach every outcome (a missing libbpf, a
kernel without tcx...) that the host running the tests does not have. Nothing
here probes the kernel; tests/kernel/test_features.py checks the real answers.
"""

from __future__ import annotations

import errno
import struct

import pytest

from vnet.cli.doctor import NEEDED, render, verdict
from vnet.errors import LibbpfMissingError, NotPermittedError, UnsupportedError
from vnet.probes import features
from vnet.probes.features import NEEDS_ROOT, Feature, Support

S, U, I = Support.SUPPORTED, Support.UNSUPPORTED, Support.INCONCLUSIVE


def answers(**overrides: Support) -> list[Feature]:
    """Every feature SUPPORTED unless overridden (hand-made, see the module docstring)."""
    out = []
    for name in features.NAMES:
        support = overrides.get(name, S)
        detail = {S: "works", U: "refused: EINVAL (Invalid argument)", I: f"{NEEDS_ROOT} (lacks CAP_BPF)"}[support]
        out.append(Feature(name, support, detail, features.REQUIRES[name],
                           "" if support is S else features.HINTS[name]))
    return out


# -- Feature and its error ----------------------------------------------------------------------------
def test_error_sentence_of_a_kernel_feature():
    f = Feature("fentry", U, "program load refused: EPERM (function tracing is locked down?)",
                ">= 5.5 with BPF trampolines", "kernel functions need fentry or kprobe")
    e = f.error()
    assert type(e) is UnsupportedError and e.exit_code == 5
    assert e.message == ("fentry not supported on this kernel (requires >= 5.5 with BPF trampolines; "
                         "here: program load refused: EPERM (function tracing is locked down?))")
    assert e.hint == "kernel functions need fentry or kprobe"
    assert not f.ok and Feature("fentry", S, "attached").ok and not Feature("fentry", I, "?").ok


def test_error_without_requires_or_hint():
    e = Feature("tracepoint", U, "tracefs is not mounted").error()
    assert e.message == "tracepoint not supported on this kernel (here: tracefs is not mounted)"
    assert e.hint is None


@pytest.mark.parametrize("name, support, detail, exit_code, also", [
    ("capabilities", U, "missing CAP_BPF", 3, NotPermittedError),
    ("lockdown", U, "confidentiality", 3, NotPermittedError),
    ("libbpf", U, "libbpf not found", 6, LibbpfMissingError),
    ("tcx", I, f"{NEEDS_ROOT} (lacks CAP_BPF)", 3, NotPermittedError),
    ("tcx", I, "link create refused: ENOMEM (Cannot allocate memory)", 5, UnsupportedError),
])
def test_error_class_and_exit_code(name, support, detail, exit_code, also):
    e = Feature(name, support, detail, features.REQUIRES[name]).error()
    assert isinstance(e, UnsupportedError) and isinstance(e, also)  # callers may catch either
    assert e.exit_code == exit_code
    assert f"here: {detail})" in e.message


def test_inconclusive_error_says_so():
    e = Feature("tcx", I, f"{NEEDS_ROOT} (lacks CAP_BPF)", ">= 6.6").error()
    assert e.message == f"tcx support could not be determined (requires >= 6.6; here: {NEEDS_ROOT} (lacks CAP_BPF))"


def test_unknown_feature_name_is_a_key_error():
    with pytest.raises(KeyError, match="unknown feature 'bpf_magic'"):
        features.check("bpf_magic")


def test_every_feature_has_requires_and_hint_and_a_probe():
    assert set(features.NAMES) == set(features._PROBES) == set(features.REQUIRES) == set(features.HINTS)
    assert len(features.NAMES) == len(set(features.NAMES))


def test_errno_names():
    assert features._describe(errno.EPERM, "function tracing is locked down?") == \
        "EPERM (function tracing is locked down?)"
    assert features._describe(errno.ENOENT) == "ENOENT (No such file or directory)"
    assert features._errname(-errno.EOPNOTSUPP) == "EOPNOTSUPP"
    assert features._errname(524) == "ENOTSUPP"


def test_probe_frame_is_a_valid_60_byte_udp_frame():
    frame = features._udp_frame()
    assert len(frame) == 60 and frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    s = sum(struct.unpack("!10H", ip))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    assert s == 0xFFFF  # the header checksum verifies
    assert ip[9] == 17 and struct.unpack("!H", ip[2:4])[0] == 60 - 14
    assert struct.unpack("!H", frame[38:40])[0] == 60 - 34  # UDP length


# -- doctor's decision -------------------------------------------------------------------------------------
def test_everything_needed_works_is_exit_0_even_without_optional_features():
    code, summary = verdict(answers(fentry=U, kprobe=U, kprobe_multi=U, tracepoint=U, prog_test_run=U))
    assert code == 0
    assert "device probes (tcx) and tracepoint probes (tp_btf) work here" in summary
    assert "fentry, kprobe" in summary and "no kernel-function probes" in summary


def test_one_of_each_alternative_is_enough():
    code, summary = verdict(answers(tcx=U, tc_link=U, tp_btf=U))
    assert code == 0 and "(clsact)" in summary and "(raw_tp)" in summary
    assert verdict(answers(clsact=U, raw_tp=U))[0] == 0


def test_missing_capabilities_is_exit_3_whatever_else():
    everything_unknown = {name: I for name in features.NAMES}
    assert verdict(answers(**{**everything_unknown, "capabilities": U}))[0] == 3
    assert verdict(answers(capabilities=U, libbpf=U, btf=U))[0] == 3


def test_missing_libbpf_is_exit_6():
    code, summary = verdict(answers(libbpf=U, btf=U))
    assert code == 6 and "libbpf" in summary


@pytest.mark.parametrize("missing", [{"btf": U}, {"ringbuf": U}, {"tcx": U, "clsact": U}, {"tp_btf": U, "raw_tp": U}])
def test_missing_kernel_feature_is_exit_5(missing):
    code, summary = verdict(answers(**missing))
    assert code == 5
    assert " or ".join(missing) in summary


def test_unknown_needed_feature_is_exit_1_and_missing_beats_unknown():
    assert verdict(answers(tcx=U, clsact=I))[0] == 1
    assert verdict(answers(ringbuf=I, tp_btf=U, raw_tp=U))[0] == 5


def test_needed_groups_name_real_features():
    assert {n for group in NEEDED for n in group} <= set(features.NAMES)


def test_render_marks_and_hints():
    lines = render(answers(fentry=U, clsact=I))
    by_name = {line.split()[1]: line for line in lines}
    assert by_name["btf"].startswith("ok ") and "hint" not in by_name["btf"]
    assert by_name["fentry"].startswith("missing ") and f"(hint: {features.HINTS['fentry']})" in by_name["fentry"]
    assert by_name["clsact"].startswith("? ") and "hint:" in by_name["clsact"]
    assert len(lines) == len(features.NAMES)
