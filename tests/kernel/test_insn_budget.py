"""A regression guard that is not a timing: every vnet program, loaded the way
`vnet trace` loads it, stays within the verifier work and size recorded in
tests/insn_budget.json (tools/bench/insn_budget.py measures both and writes
that file; read its docstring for the load variants and how to update).

The counts come from the kernel (struct bpf_prog_info: verified_insns,
xlated_prog_len) and differ between kernel series, so the budgets are checked
on the series they were recorded on. Needs root (tests/kernel/conftest.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("insn_budget", ROOT / "tools" / "bench" / "insn_budget.py")
ib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ib)

UPDATE = "sudo .venv/bin/python tools/bench/insn_budget.py --update (after a deliberate change; commit why)"


@pytest.fixture(scope="module")
def budget() -> dict:
    return ib.load_budget()


@pytest.fixture(scope="module")
def objects() -> dict[str, list[str]]:
    return ib.programs_in_objects()


@pytest.fixture(scope="module")
def measured(budget) -> dict:
    if budget["kernel"] != ib.kernel_series():
        pytest.skip(f"budgets were recorded on Linux {budget['kernel']}, this is {ib.kernel_series()}: the "
                    f"verifier's counts differ between kernels (compare by hand: tools/bench/insn_budget.py)")
    return ib.measure()


def test_every_program_has_a_load_plan(objects):
    missing = ib.uncovered(ib.plans(), objects)
    assert not missing, f"programs no plan in tools/bench/insn_budget.py loads: {missing} (add them there)"


def test_every_program_has_a_budget_for_every_variant(budget, objects):
    entries = budget["programs"]
    missing = [f"{obj}:{prog} [{variant}]" for obj, progs in objects.items() for prog in progs
               for variant in ib.VARIANTS if variant not in entries.get(f"{obj}:{prog}", {})]
    assert not missing, f"no budget in tests/insn_budget.json for {', '.join(missing)}: run {UPDATE}"
    known = {f"{obj}:{prog}" for obj, progs in objects.items() for prog in progs}
    stale = sorted(set(entries) - known)
    assert not stale, f"tests/insn_budget.json budgets programs no object has any more: {stale}: run {UPDATE}"


def test_every_program_stays_within_its_budget(budget, measured):
    problems = []
    for key, by_variant in sorted(measured.items()):
        for variant, now in by_variant.items():
            limit = budget["programs"].get(key, {}).get(variant)
            where = f"{key} [{variant}]"
            if limit is None:
                problems.append(f"{where}: no budget entry")
            elif "not_loaded" in now:
                if "not_loaded" not in limit:
                    problems.append(f"{where}: no longer loads on this kernel: {now['not_loaded'].splitlines()[0]}")
            elif "not_loaded" in limit:
                problems.append(f"{where}: loads now ({now['verified_insns']} verified, {now['xlated_insns']} "
                                f"xlated insns) but had no budget (did not load when recorded)")
            else:
                for metric in ib.METRICS:
                    was = limit["measured"][metric]
                    if now[metric] > limit[metric]:
                        problems.append(f"{where}: {metric} {now[metric]} > budget {limit[metric]} "
                                        f"(recorded {was}: +{now[metric] / was - 1:.0%})")
    assert not problems, "\n".join(problems) + f"\nIf the growth is wanted: {UPDATE}"


def test_the_budget_catches_growth(budget, measured):
    """The comparison itself: a program 1% over its budget is reported."""
    key, variant = "tc_trace:vnet_tc_ingress", "default"
    limit = budget["programs"][key][variant]
    assert measured[key][variant]["verified_insns"] <= limit["verified_insns"]
    grown = {key: {variant: {m: int(limit[m] * 1.01) + 1 for m in ib.METRICS}}}
    with pytest.raises(AssertionError, match=r"tc_trace:vnet_tc_ingress \[default\]: verified_insns \d+ > budget"):
        test_every_program_stays_within_its_budget(budget, grown)
