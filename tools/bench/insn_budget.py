#!/usr/bin/env python3
"""How much verifier work and code each vnet program is, as vnet loads it.

Every program of every object in bpf/build/ is loaded through vnet's own trace
loader (vnet.trace.Trace: the same config defaults, filter encoding, tcpdump
splice and attach targets as `vnet trace`), only nothing is attached. For each
program the kernel reports (struct bpf_prog_info):

  verified_insns  instructions the verifier processed (its work; the limit is 1 M)
  xlated_insns    the program after the verifier's rewrites (its size)

in six load variants, because read-only config prunes code at load:

  default  no filter, no snaplen, no aggregation (`vnet trace -i IFACE`)
  full     every field filter, --snaplen 256, aggregation and events
  pcap     a tcpdump expression spliced in ('udp and (dst port 53 or dst port 5353) and
           (host 10.0.0.1 or net 10.2.0.0/16 or host fd00::1)': its criteria, tested first,
           have a set of ports and one of addresses (IPv4: prefixes) of each family, the most
           step 2a tests)
  exclude  the same with 'not port 22 and not port 2049 and not port 3260 and not host 10.0.0.5
           and not net 192.168.0.0/16': ports and IPv4 addresses excluded, what step 2a tests
           with the VLAN tag the sk_buff holds
  reads    kernel hooks reading each header, as where features says no to
           "parse_copy" (default, full and pcap follow what it says here)
  copy     kernel hooks parsing from a copy, as where features says yes to
           "parse_copy" and no to "parse_direct" (typed hooks reading in place)

tests/kernel/test_insn_budget.py compares them with tests/insn_budget.json.
After a deliberate change to a program, record new budgets (measured + 10%):

    sudo .venv/bin/python tools/bench/insn_budget.py --update

and commit the JSON diff with the reason. Without --update it prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vnet.binding import BpfObject  # noqa: E402
from vnet.probes import catalog  # noqa: E402
from vnet.probes import resolve as resolver  # noqa: E402
from vnet.trace.filters import PacketFilter  # noqa: E402
from vnet.trace.session import Plan, Trace  # noqa: E402

BUDGET_FILE = ROOT / "tests" / "insn_budget.json"
BUILD = ROOT / "bpf" / "build"
HEADROOM = 0.10
METRICS = ("verified_insns", "xlated_insns")

# The variants, as Trace keyword arguments. "full" sets every knob that adds code.
VARIANTS: dict[str, dict] = {
    "default": {},
    "full": {"packet_filter": PacketFilter(proto="udp", src="fd00::1", dst="fd00::2/128", host="fd00::/64",
                                           sport=1, dport=2, port=3, len_min=10, len_max=1000, sample="1/4",
                                           ifaces=("lo",)),
             "snaplen": 256, "aggregate_and_events": True},
    "pcap": {"packet_filter": PacketFilter(
        expression="udp and (dst port 53 or dst port 5353) and (host 10.0.0.1 or net 10.2.0.0/16 or host fd00::1)")},
    "exclude": {"packet_filter": PacketFilter(
        expression="not port 22 and not port 2049 and not port 3260 and not host 10.0.0.5 and not net 192.168.0.0/16")},
    # kernel hooks reading each header (parse_cfg.copy 0), what "default" is where features
    # says no to parse_copy (Linux 6.1): kept in budget here too
    "reads": {"parse_copy": False},
    # ... parsing from a copy, what "default" is where features says yes to parse_copy and no
    # to parse_direct (a verifier that prunes well but refuses the loads in place)
    "copy": {"parse_copy": True, "parse_direct": False},
}

# The catalog probe each generic program is loaded for (its skb/dev argument
# positions are load-time constants: one representative per hook kind).
SKB_PROBE = {"tp_btf": "net:netif_receive_skb", "raw_tp": "net:netif_receive_skb",
             "tracepoint": "net:netif_receive_skb", "fentry": "veth:xmit", "kprobe": "veth:xmit"}


def programs_in_objects(build: Path = BUILD) -> dict[str, list[str]]:
    """object name -> its programs, from the object files themselves."""
    out = {}
    for path in sorted(build.glob("*.bpf.o")):
        obj = BpfObject(path)
        try:
            out[path.name.removesuffix(".bpf.o")] = sorted(obj.programs)
        finally:
            obj.close()
    return out


def _no_attach(_obj) -> list:
    return []


def _probe_plan(spec: catalog.ProbeSpec, kind: str) -> Plan:
    """resolve.plan() for the hook of `kind`, chosen even where this kernel
    cannot attach it (only loading matters here)."""
    res = resolver.resolve(spec, force=kind)
    if not res.available:
        res = resolver.Resolution(spec, next(h for h in spec.hooks if h.kind == kind))
    return resolver.plan(res)


def plans() -> dict[str, Plan]:
    """One plan per program (sched: per program set), keyed 'object:program[,program...]',
    each loading exactly as `vnet trace` would and attaching nothing."""
    out: dict[str, Plan] = {}
    for prog in ("vnet_tc_ingress", "vnet_tc_egress"):
        out[f"tc_trace:{prog}"] = Plan("tc_trace", "tc_cfg", {"l3": 0}, (prog,), _no_attach, {}, filterable=True)
    for obj, by_kind in resolver.PROGRAMS.items():
        for kind, prog in by_kind.items():
            spec = catalog.BY_NAME["drop:kfree_skb" if obj == "drop" else SKB_PROBE[kind]]
            out[f"{obj}:{prog}"] = _probe_plan(spec, kind)
    for kind in ("tp_btf", "raw_tp"):
        plan = _probe_plan(catalog.BY_NAME["sched:runq"], kind)
        out["sched:" + ",".join(plan.programs)] = plan
    return {key: dataclasses.replace(plan, attach=_no_attach, name=key, labels={}) for key, plan in out.items()}


def uncovered(planned: dict[str, Plan], objects: dict[str, list[str]]) -> list[str]:
    """Programs in the objects that no plan loads (each needs one, and a budget)."""
    have = {(p.obj, prog) for p in planned.values() for prog in p.programs}
    return [f"{obj}:{prog}" for obj, progs in objects.items() for prog in progs if (obj, prog) not in have]


def measure(variants=tuple(VARIANTS)) -> dict[str, dict[str, dict]]:
    """'object:program' -> variant -> {verified_insns, xlated_insns}, or
    {'not_loaded': why} where this kernel refuses the program."""
    planned = plans()
    out: dict[str, dict[str, dict]] = {}
    for variant in variants:
        trace = Trace(list(planned.values()), strict=False, **VARIANTS[variant])
        try:
            trace.start()
            skipped = dict(trace.skipped)
            loaded = iter(trace.objects)
            for key, plan in planned.items():
                if key in skipped:
                    for prog in plan.programs:
                        out.setdefault(f"{plan.obj}:{prog}", {})[variant] = {"not_loaded": skipped[key]}
                    continue
                obj = next(loaded)
                for prog in plan.programs:
                    info = obj.programs[prog].info()
                    out.setdefault(f"{plan.obj}:{prog}", {})[variant] = {
                        "verified_insns": info.verified_insns, "xlated_insns": info.xlated_insns}
        finally:
            trace.close()
    return out


def kernel_series() -> str:
    """'6.18' of '6.18.44-...': verifier counts are compared within one kernel series."""
    return ".".join(platform.release().split(".")[:2])


def budgets(measured: dict[str, dict[str, dict]], headroom: float = HEADROOM) -> dict:
    programs = {}
    for key, by_variant in sorted(measured.items()):
        programs[key] = {}
        for variant, m in by_variant.items():
            if "not_loaded" in m:
                programs[key][variant] = {"not_loaded": m["not_loaded"].splitlines()[0][:200]}
            else:
                programs[key][variant] = {**{k: int(m[k] * (1 + headroom)) + 1 for k in METRICS}, "measured": m}
    return {
        "_about": ["Per program and load variant: the most instructions the verifier may process",
                   "(verified_insns) and the largest program after the verifier (xlated_insns), checked by",
                   "tests/kernel/test_insn_budget.py. 'measured' is what the kernel below reported when the",
                   "budgets were set (budget = measured + 10%). After a deliberate change to a program:",
                   "sudo .venv/bin/python tools/bench/insn_budget.py --update, and commit with the reason."],
        "kernel": kernel_series(),
        "headroom": headroom,
        "programs": programs,
    }


def dumps(budget: dict) -> str:
    """JSON with one line per program and variant (diffs show what changed)."""
    head = {k: v for k, v in budget.items() if k != "programs"}
    out = json.dumps(head, indent=1)[:-2] + ',\n "programs": {\n'
    progs = []
    for key, by_variant in budget["programs"].items():
        rows = ",\n".join(f"   {json.dumps(v)}: {json.dumps(m)}" for v, m in by_variant.items())
        progs.append(f"  {json.dumps(key)}: {{\n{rows}\n  }}")
    return out + ",\n".join(progs) + "\n }\n}\n"


def load_budget(path: Path = BUDGET_FILE) -> dict:
    return json.loads(path.read_text())


def table(measured: dict[str, dict[str, dict]]) -> str:
    lines = [f"{'program':<42} {'variant':<8} {'verified':>9} {'xlated':>7}"]
    for key, by_variant in sorted(measured.items()):
        for variant, m in by_variant.items():
            if "not_loaded" in m:
                lines.append(f"{key:<42} {variant:<8} not loaded: {m['not_loaded'].splitlines()[0][:60]}")
            else:
                lines.append(f"{key:<42} {variant:<8} {m['verified_insns']:>9} {m['xlated_insns']:>7}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help=f"write {BUDGET_FILE.relative_to(ROOT)}")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (loads eBPF programs)")
    missing = uncovered(plans(), programs_in_objects())
    if missing:
        sys.exit(f"programs with no load plan in {Path(__file__).name}: {', '.join(missing)}")
    measured = measure()
    print(table(measured))
    if args.update:
        BUDGET_FILE.write_text(dumps(budgets(measured)))
        print(f"wrote {BUDGET_FILE.relative_to(ROOT)} (kernel {kernel_series()}, +{HEADROOM:.0%})")


if __name__ == "__main__":
    main()
