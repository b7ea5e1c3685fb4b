"""Choose, for each catalog probe, the hook this kernel can run — and say why
the preferred ones were passed over. Tracepoints and functions are looked up in
the running kernel's BTF (vmlinux and loaded modules), tracefs and kallsyms."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

from vnet.binding import Btf, BpfObject
from vnet.binding.btf import FUNC, TYPEDEF, release_shared_vmlinux, shared_vmlinux
from vnet.errors import ProbeUnavailableError, ResourceError, UsageError, VnetError

from . import features
from .catalog import BY_NAME, Hook, ProbeSpec

log = logging.getLogger("vnet.probes")

PROGRAMS = {
    "skb_trace": {"tp_btf": "vnet_tp_btf_skb", "raw_tp": "vnet_raw_tp_skb", "tracepoint": "vnet_tp_skb",
                  "fentry": "vnet_fentry_skb", "kprobe": "vnet_kprobe_skb"},
    "drop": {"tp_btf": "vnet_tp_btf_drop", "raw_tp": "vnet_raw_tp_drop"},
}
SCHED_PROGRAMS = ("sched_wakeup", "sched_wakeup_new", "sched_switch")
CONFIG_VAR = {"skb_trace": "skb_cfg", "drop": "drop_cfg", "sched": "sched_cfg"}


@dataclass
class Resolution:
    spec: ProbeSpec
    hook: Hook | None = None
    why_not: list[str] = field(default_factory=list)  # one line per hook passed over, in preference order
    tp_skb_off: int = 0
    force: str | None = None
    presumed: bool = False  # the hook's feature was not probed (resolve(presume=True)): plan() can fall back

    @property
    def available(self) -> bool:
        return self.hook is not None

    @property
    def reason(self) -> str:
        """Why the probe cannot run here (empty when it can)."""
        if self.available:
            return ""
        missing = [w for w in self.why_not if "not in this kernel" in w]
        if missing:
            return missing[0]
        kinds = [h.kind for h in self.spec.hooks]
        return f"needs {' or '.join(kinds)}: none works on this kernel (see 'vnet doctor')"


# -- what the running kernel has ------------------------------------------------
@lru_cache(maxsize=1)
def _catalog_targets() -> frozenset[str]:
    """Every kernel function a catalog hook names."""
    return frozenset(h.target for spec in BY_NAME.values() for h in spec.hooks if ":" not in h.target)


def _kernel_functions(target: str) -> frozenset[str]:
    """The catalog's functions this kernel has (kallsyms read once), or for a name
    outside the catalog, whether it has that one."""
    wanted = _catalog_targets()
    return features.kernel_functions(wanted if target in wanted else frozenset([target]))


@lru_cache(maxsize=None)
def _module_btf(module: str) -> Btf | None:
    _loaded_modules.add(module)
    if not os.path.exists(f"/sys/kernel/btf/{module}"):
        return None
    try:
        return Btf.module(module, shared_vmlinux())
    except ResourceError:
        raise  # out of descriptors: no answer, and not cached
    except VnetError:
        return None


def release_btf() -> None:
    """Free the kernel BTF kept for resolving (vmlinux ~6 MiB parsed, and modules'):
    a long-running process (the agent) calls it once a trace is resolved and loaded;
    the next resolution loads it again."""
    modules = [b for b in (_module_btf(m) for m in list(_loaded_modules)) if b is not None]
    _module_btf.cache_clear()
    _loaded_modules.clear()
    for btf in modules:
        btf.close()
    release_shared_vmlinux()


_loaded_modules: set[str] = set()


def _has_tracepoint(name: str) -> bool:
    return shared_vmlinux().has(f"btf_trace_{name}", TYPEDEF)


def _has_function_btf(fn: str, module: str | None) -> bool:
    if shared_vmlinux().has(fn, FUNC):
        return True
    mod = _module_btf(module) if module else None
    return bool(mod and mod.has(fn, FUNC))


def _tracefs_format(category: str, name: str) -> str | None:
    events = features.tracefs_events()
    path = f"{events}/{category}/{name}/format"
    if events is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def _missing(fn: str, module: str | None) -> str:
    if module and not os.path.isdir(f"/sys/module/{module}"):
        return f"{fn}: not in this kernel — is the {module} module loaded? (modprobe {module})"
    return f"{fn}: not in this kernel"


# -- choosing ---------------------------------------------------------------------
def _check(spec: ProbeSpec, hook: Hook, presume: bool = False) -> tuple[str, int]:
    """'' when `hook` can run here (with the classic tracepoint's skb offset), else why not.
    presume: see resolve()."""
    presumed = presume and features.presumed(hook.kind)
    if presumed and hook.kind != "tracepoint":
        # Whether the tracepoint or function exists, the load (attach target) or attach tells too;
        # looking first costs a parse of the kernel's BTF or a read of kallsyms.
        return "", 0
    feature = None if presumed else features.check(hook.kind)
    unsupported = f"{hook.kind}: {feature.error().message}" if feature is not None and not feature.ok else ""
    if hook.kind in ("tp_btf", "raw_tp", "tracepoint"):
        category, name = hook.tracepoint if ":" in hook.target else ("", hook.target)
        if not _has_tracepoint(name) and not (category and _tracefs_format(category, name)):
            return f"tracepoint {name}: not in this kernel", 0
        if unsupported:
            return unsupported, 0
        if hook.kind != "tracepoint":
            return "", 0
        fmt = _tracefs_format(category, name)
        if fmt is None:
            return f"tracepoint: no {category}/{name} in tracefs", 0
        m = re.search(r"void \* skbaddr;\s*offset:(\d+);", fmt)
        if hook.skb_arg and not m:
            return f"tracepoint: {category}/{name} has no skbaddr field", 0
        return "", int(m.group(1)) if m else 0
    present = (_has_function_btf(hook.target, spec.module) if hook.kind == "fentry"
               else hook.target in _kernel_functions(hook.target))
    if not present:
        return _missing(hook.target, spec.module), 0
    if unsupported:
        return unsupported, 0
    return "", 0


def resolve(spec: ProbeSpec, force: str | None = None, *, presume: bool = False) -> Resolution:
    """Walk the hooks in preference order (or only `force`, e.g. "kprobe").

    presume=True (a one-shot trace): the first hook whose kind is not known to be missing is taken
    if the process has the capabilities to try it, unchecked (a classic tracepoint's tracefs format
    is still read, for its skb offset): the trace's own load and attach test what the feature probe
    and the BTF/kallsyms lookups would, and cost no more than the load alone. plan() gives the Plan
    a fallback that resolves with every check if that load or attach fails."""
    hooks = [h for h in spec.hooks if force is None or h.kind == force]
    if force and not hooks:
        kinds = ", ".join(h.kind for h in spec.hooks)
        raise UsageError(f"probe {spec.name} has no {force} hook (it has: {kinds})")
    res = Resolution(spec, force=force)
    for hook in hooks:
        why, off = _check(spec, hook, presume)
        if not why:
            res.hook, res.tp_skb_off = hook, off
            res.presumed = presume
            return res
        res.why_not.append(why)
    return res


def parse(name: str) -> tuple[ProbeSpec, str | None]:
    """'group:point' or 'group:point@hook' (force one implementation)."""
    base, _, force = name.partition("@")
    spec = BY_NAME.get(base)
    if spec is None:
        raise UsageError(f"unknown probe {base!r} (list them with 'vnet probes')")
    return spec, force or None


# -- plans ------------------------------------------------------------------------


def watch_words(pids: tuple[int, ...], words: int) -> dict[int, int]:
    """The sched probe's watch set (vnet_sched_watch in sched.bpf.c: one bit per
    tgid, 64 to a word) as {word index: bits}. A pid the map cannot hold is the
    caller's error: UsageError."""
    out: dict[int, int] = {}
    for pid in pids:
        if not 0 < pid < words * 64:
            raise UsageError(f"--pid {pid}: not a process id (1..{words * 64 - 1})")
        out[pid // 64] = out.get(pid // 64, 0) | 1 << pid % 64
    return out


def plan(res: Resolution, *, pids: tuple[int, ...] = (), min_runq_ns: int = 0):
    """The trace plan (object, config, programs, attach) for an available probe.
    `pids`/`min_runq_ns` apply to scheduler probes: watch these processes'
    threads (none: every thread) and report waits at least this long."""
    from vnet.trace.session import Hook as LiveHook, Plan

    spec, hook = res.spec, res.hook
    if spec.obj == "sched":
        programs = tuple(f"vnet_{hook.kind}_{tp}" for tp in SCHED_PROGRAMS)
        config = {"watch_all": int(not pids), "min_runq_ns": min_runq_ns}
    else:
        programs = (PROGRAMS[spec.obj][hook.kind],)
        config = ({"skb_arg": hook.skb_arg, "skb_deref": int(hook.skb_deref), "task": int(spec.task),
                   "tp_skb_off": res.tp_skb_off, "dev_arg": hook.dev_arg} if spec.obj == "skb_trace" else {})

    def prepare(obj: BpfObject) -> None:
        if hook.kind in ("tp_btf", "fentry") and spec.obj == "skb_trace":
            obj.programs[programs[0]].set_attach_target(hook.function)

    def attach(obj: BpfObject):
        if spec.obj == "sched":  # before the first event can fire
            watch = obj.maps["vnet_sched_watch"]
            if watch.value_size == 1:  # objects before the bitmap, a hash of tgids (benchmarks' --compare-to)
                for pid in pids:
                    watch.update(pid.to_bytes(4, "little"), b"\x01")
            else:
                for word, bits in watch_words(pids, watch.max_entries).items():
                    watch.update(word.to_bytes(4, "little"), bits.to_bytes(8, "little"))
        links = []
        for name in programs:
            prog = obj.programs[name]
            if spec.obj != "skb_trace":
                link = prog.attach()  # the section names the tracepoint
            elif hook.kind == "raw_tp":
                link = prog.attach_raw_tracepoint(hook.function)
            elif hook.kind == "tracepoint":
                link = prog.attach_tracepoint(*hook.tracepoint)
            elif hook.kind == "kprobe":
                link = prog.attach_kprobe(hook.target)
            else:
                link = prog.attach()
            links.append(LiveHook(spec.name, hook.kind, link))
        return links

    def fallback(error: VnetError) -> Plan:
        """The presumed hook failed to load or attach: resolve with every check (feature probes,
        BTF, kallsyms). The same hook again: the failure is the trace's own (raised again). Another
        one: its plan. None: ProbeUnavailableError, with the reason select() would have given."""
        if isinstance(error, ResourceError):  # out of descriptors (Trace tells): another hook would fail the same way
            raise error
        log.info("%s: %s failed (%s); resolving with every check", spec.name, hook.kind, error)
        again = resolve(spec, res.force)
        if not again.available:
            raise ProbeUnavailableError(spec.name, again.reason) from None
        if again.hook == hook:
            raise error
        return plan(again, pids=pids, min_runq_ns=min_runq_ns)

    return Plan(spec.obj, CONFIG_VAR[spec.obj], config, programs, attach,
                {None: {"probe": spec.name, "layer": spec.layer}}, prepare=prepare, name=spec.name,
                filterable=spec.obj in ("skb_trace", "drop"), fallback=fallback if res.presumed else None)
