"""What this machine supports, in one place, found out by trying.

Each feature is probed the cilium/ebpf way: load (and where it matters attach)
a tiny real thing, namely vnet's own programs, and keep what the kernel said
(parse_copy: how much a small program of its own costs the verifier; parse_direct: whether
its verifier takes five instructions of its own).
The kernel version never decides; it only fills the `requires` text and, for an
INCONCLUSIVE answer, says which way the version points.

    check("fentry")   -> Feature(name, support, detail, requires, hint), cached
                         unless INCONCLUSIVE (a later call probes again)
    require("fentry") -> raises check("fentry").error() unless it is ok
    all_features()    -> every feature, in display order (`vnet doctor`)

A probe that needs privileges the process lacks answers INCONCLUSIVE ("needs
root to probe"), never UNSUPPORTED. Every probe closes what it opened; libbpf's
complaints about the failed attempts go to the `vnet.libbpf` logger.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import struct
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from vnet.errors import FD_LIMIT_HINT, LibbpfMissingError, NotPermittedError, ResourceError, UnsupportedError, VnetError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
LOCKDOWN = "/sys/kernel/security/lockdown"
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAP_NAMES = {CAP_BPF: "CAP_BPF", CAP_PERFMON: "CAP_PERFMON", CAP_NET_ADMIN: "CAP_NET_ADMIN",
             CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}

BPF_MAP_TYPE_RINGBUF = 27
BPF_TRACE_KPROBE_MULTI = 42
ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space as-is
NEEDS_ROOT = "needs root to probe"
# A kernel function every kernel has, to attach kprobes/fentry to; then stand-ins.
PROBE_FUNCTIONS = ("netif_receive_skb", "__netif_receive_skb", "consume_skb", "kfree_skb_reason", "dev_queue_xmit")
PROBE_TRACEPOINT = ("net", "netif_receive_skb")
# An error that says nothing about the feature: try again later instead of caching a "no".
_TRANSIENT = {_errno.ENOMEM, _errno.EAGAIN, _errno.EBUSY, _errno.EMFILE, _errno.ENFILE, _errno.EINTR}


# -- the original helpers (other modules call these) --------------------------------------------------
@lru_cache(maxsize=1)
def kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]  # platform.release(), without platform's import (~5 ms)
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_privileges(net_admin: bool = True) -> None:
    """Fail early, with one clear line, instead of a cryptic EPERM from the kernel."""
    caps = effective_caps()

    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)

    bpf = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    if not bpf or (net_admin and not (has(CAP_NET_ADMIN) or has(CAP_SYS_ADMIN))):
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        raise NotPermittedError(
            f"tracing needs CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; running as {who} without them",
            hint="run with sudo",
        )


@lru_cache(maxsize=1)
def preempt_rt() -> bool:
    """A PREEMPT_RT kernel: softirqs run in threads that can be preempted, so two programs
    may interleave on one CPU (the event areas then stay off: vnet/binding/cpuarea.py)."""
    try:
        with open("/sys/kernel/realtime") as f:
            return f.read().strip() == "1"
    except OSError:
        return "PREEMPT_RT" in os.uname().version


def tcx_expected() -> bool:
    """tcx links exist from Linux 6.6 (older kernels: clsact filters). Attach still
    falls back to clsact if a kernel that should have tcx refuses it."""
    return kernel_version() >= (6, 6)


def require_btf() -> None:
    """The CO-RE objects are relocated against the running kernel's BTF."""
    if not os.path.exists(VMLINUX_BTF):
        raise UnsupportedError(
            f"kernel BTF not supported (requires CONFIG_DEBUG_INFO_BTF=y: {VMLINUX_BTF} is missing)",
            hint="use a distribution kernel from 2020 on (Debian 11+, Ubuntu 20.10+, RHEL 8.2+)")


# -- the answers -----------------------------------------------------------------------------------------
class Support(enum.Enum):
    SUPPORTED = "supported"
    UNSUPPORTED = "unsupported"
    INCONCLUSIVE = "inconclusive"  # could not find out (no privileges, a transient error): not cached


class MissingPrivilegesError(NotPermittedError, UnsupportedError):
    """A feature vnet cannot use because of privileges (or lockdown): exit code 3."""

    exit_code = NotPermittedError.exit_code


class LibbpfUnsupportedError(LibbpfMissingError, UnsupportedError):
    """libbpf is missing or older than 1.0: exit code 6."""

    exit_code = LibbpfMissingError.exit_code


# How the error sentence reads, and which error it is, where not "X not supported on this kernel".
_PHRASES = {"capabilities": "not sufficient", "lockdown": "blocks tracing", "libbpf": "not supported"}
_ERRORS: dict[str, type[UnsupportedError]] = {"capabilities": MissingPrivilegesError,
                                              "lockdown": MissingPrivilegesError,
                                              "libbpf": LibbpfUnsupportedError}


@dataclass(frozen=True)
class Feature:
    name: str            # "fentry"
    support: Support
    detail: str          # what was observed
    requires: str = ""   # ">= 5.5 with BPF trampolines"
    hint: str = ""       # one line for `vnet doctor`

    @property
    def ok(self) -> bool:
        return self.support is Support.SUPPORTED

    def error(self) -> UnsupportedError:
        """The error to raise when this feature is needed and not ok, e.g.
        "fentry not supported on this kernel (requires >= 5.5 ...; here: ...)"."""
        inside = "; ".join(p for p in (f"requires {self.requires}" if self.requires else "",
                                       f"here: {self.detail}" if self.detail else "") if p)
        tail = f" ({inside})" if inside else ""
        hint = self.hint or None
        if self.support is Support.INCONCLUSIVE:
            cls = MissingPrivilegesError if self.detail.startswith(NEEDS_ROOT) else UnsupportedError
            return cls(f"{self.name} support could not be determined{tail}", hint=hint)
        phrase = _PHRASES.get(self.name, "not supported on this kernel")
        return _ERRORS.get(self.name, UnsupportedError)(f"{self.name} {phrase}{tail}", hint=hint)


# Oldest kernel (or libbpf) that has each feature: the `requires` text, and the tie-breaker.
REQUIRES = {
    "capabilities": "CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN) and CAP_NET_ADMIN",
    "lockdown": "lockdown none or integrity (confidentiality forbids reading kernel memory)",
    "libbpf": "libbpf >= 1.0",
    "btf": ">= 5.2 with CONFIG_DEBUG_INFO_BTF=y",
    "ringbuf": ">= 5.8",
    "prog_test_run": ">= 4.12 (BPF_PROG_TEST_RUN of TC programs)",
    "tcx": ">= 6.6",
    "tc_link": ">= 6.6 (tcx links)",
    "clsact": ">= 4.5 with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF",
    "tp_btf": ">= 5.5 (BTF-typed tracepoints)",
    "raw_tp": ">= 4.17",
    "tracepoint": ">= 4.7 and a mounted tracefs",
    "fentry": ">= 5.5 with BPF trampolines (CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)",
    "kprobe": "CONFIG_KPROBES=y",
    "kprobe_multi": ">= 5.18 with CONFIG_FPROBE",
    "libpcap": "libpcap (libpcap0.8) for tcpdump filter expressions",
    "gmac": "libcrypto (OpenSSL >= 1.1, Debian's libssl3) with AES-128-GCM",
    "libdeflate": "libdeflate (Debian's libdeflate0) for the trace files' CRC-32",
    "parse_copy": "a verifier that prunes a spilled scalar against plain stack data (Linux 6.18 does, 6.1 does not)",
    "parse_direct": "a verifier that lets a program read through a typed struct's pointer to bytes "
                    "(skb->head: read-only untrusted memory; Linux 6.18 does, 6.1 does not)",
}
MIN_KERNEL = {"btf": (5, 2), "ringbuf": (5, 8), "prog_test_run": (4, 12), "tcx": (6, 6), "tc_link": (6, 6),
              "clsact": (4, 5), "tp_btf": (5, 5), "raw_tp": (4, 17), "tracepoint": (4, 7), "fentry": (5, 5),
              "kprobe_multi": (5, 18)}
_FUNCTIONS_HINT = "kernel functions (OVS/bridge/veth/Xen probes) need fentry or kprobe"
HINTS = {
    "capabilities": "run as root (sudo vnet ...) or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN",
    "lockdown": "boot with lockdown=integrity or none: confidentiality mode forbids BPF reads of kernel memory",
    "libbpf": "install libbpf >= 1.0: apt-get install libbpf1 (Debian 12+, Ubuntu 23.04+), dnf install libbpf",
    "btf": "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian 11+, Ubuntu 20.10+, RHEL 8.2+)",
    "ringbuf": "vnet delivers events through BPF ring buffers: use Linux >= 5.8",
    "prog_test_run": "only self-tests run programs on crafted packets; tracing does not need it",
    "tcx": "device probes use clsact filters instead (Linux < 6.6)",
    "tc_link": "without tcx links, a killed vnet leaves its clsact filters behind (the next run on that "
               "interface replaces them; a restarted agent removes its predecessor's)",
    "clsact": "device probes need tcx or clsact: enable CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF",
    "tp_btf": "tracepoint probes fall back to raw_tp",
    "raw_tp": "tracepoint probes need tp_btf or raw_tp (Linux >= 4.17)",
    "tracepoint": "classic-tracepoint fallbacks need tracefs: mount -t tracefs nodev /sys/kernel/tracing",
    "fentry": f"{_FUNCTIONS_HINT}; fentry needs BPF trampolines and function tracing that is not locked down",
    "kprobe": f"{_FUNCTIONS_HINT}; kprobes need a kernel built with CONFIG_KPROBES=y",
    "kprobe_multi": "not used by vnet's probes yet; needs Linux >= 5.18 with CONFIG_FPROBE",
    "libpcap": "tcpdump expressions need it: apt-get install libpcap0.8 (the field filters --proto/--port... do not)",
    "gmac": "agents and collectors tag their frames with HMAC-SHA256 instead (~7x the CPU per byte shipped): "
            "apt-get install libssl3",
    "libdeflate": "trace files are checked with zlib's CRC-32 instead (~3x the CPU per byte written or read): "
                  "apt-get install libdeflate0",
    "parse_copy": "kernel hooks read each header with its own bpf_probe_read_kernel instead (~20% more per "
                  "event): the parse from one copy would cost this verifier many times the work",
    "parse_direct": "typed kernel hooks (tp_btf, fentry) parse from a copy of the packet's first bytes "
                    "instead of reading it in place (~15% more per event)",
}
NAMES = ("capabilities", "lockdown", "libbpf", "btf", "ringbuf", "prog_test_run", "tcx", "tc_link", "clsact",
         "tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe", "kprobe_multi", "libpcap", "gmac", "libdeflate",
         "parse_copy", "parse_direct")

_cache: dict[str, Feature] = {}
_lock = threading.RLock()
# Features to treat as missing whatever the kernel says (VNET_WITHOUT=tcx,fentry): the paths
# older kernels take (clsact filters, kprobes), run and tested on this one.
WITHOUT_ENV = "VNET_WITHOUT"


def _withheld(name: str) -> Feature | None:
    if name in {n.strip() for n in os.environ.get(WITHOUT_ENV, "").split(",")}:
        return _feature(name, Support.UNSUPPORTED, f"turned off ({WITHOUT_ENV}={os.environ[WITHOUT_ENV]})")
    return None


def check(name: str) -> Feature:
    """Whether this machine has `name` (one of NAMES); probed once, then cached
    unless the answer was INCONCLUSIVE."""
    if name not in _PROBES:
        raise KeyError(f"unknown feature {name!r} (known: {', '.join(NAMES)})")
    with _lock:
        cached = _cache.get(name) or _withheld(name)
        if cached is not None:
            return cached
        try:
            feature = _PROBES[name]()
        except ResourceError:
            raise
        except LibbpfMissingError as e:
            feature = _feature(name, Support.INCONCLUSIVE, f"libbpf unavailable: {e.message}")
        except VnetError as e:  # the object file is missing...
            feature = _feature(name, Support.INCONCLUSIVE, f"probe failed: {e}")
        except Exception as e:  # noqa: BLE001 - one broken probe must not take `vnet doctor` down
            feature = _feature(name, Support.INCONCLUSIVE, f"probe failed: {type(e).__name__}: {e}")
        if feature.support is not Support.SUPPORTED and (free := fd_headroom()) < FD_HEADROOM:
            # out of descriptors, the probe proves nothing (libbpf may even say ESRCH): not an answer
            raise ResourceError(f"cannot probe {name}: too many open files ({free} descriptors left)",
                                hint=FD_LIMIT_HINT)
        if feature.support is not Support.INCONCLUSIVE:
            _cache[name] = feature
        return feature


# Free descriptors below which a failed probe or load is put down to the open-file limit: a
# probe loads a whole object (maps, programs, BTF: dozens of descriptors), and libbpf may
# report the shortage as ESRCH or EINVAL; a negative answer found that close to the limit is
# neither believed nor cached (it would stay wrong for as long as an agent runs).
FD_HEADROOM = 256


def fd_headroom(at_most: int = FD_HEADROOM) -> int:
    """How many more descriptors this process can open (counted up to at_most)."""
    fds: list[int] = []
    try:
        while len(fds) < at_most:
            fds.append(os.open("/", os.O_RDONLY | os.O_CLOEXEC) if not fds else os.dup(fds[0]))
    except OSError:
        pass
    finally:
        for fd in fds:
            os.close(fd)
    return len(fds)


def known(name: str) -> Feature | None:
    """The cached answer for `name`, if it was probed already (no probe here)."""
    with _lock:
        return _cache.get(name) or _withheld(name)


# Kinds of hooks a trace may presume available, and the capabilities their probe needs: the
# trace's own load and attach of the program is the same test as the feature probe, so a
# one-shot trace tries it directly and probes (check) only when that fails (vnet.probes.resolve).
PRESUMABLE = {"tp_btf": {"perfmon": True}, "raw_tp": {"perfmon": True}, "tracepoint": {"perfmon": True},
              "fentry": {"perfmon": True}, "kprobe": {"perfmon": True}}


def presumed(name: str) -> bool:
    """Whether a trace may try `name` without probing it first: it is not known to be missing,
    and the process has the capabilities its probe would need (without them the probe's answer,
    "needs root", is what the user gets, as before)."""
    cached = known(name)
    if cached is not None:
        return cached.ok
    return name in PRESUMABLE and _needs_root(name, **PRESUMABLE[name]) is None


def all_features() -> list[Feature]:
    """Every feature, from what vnet needs first to what it can do without."""
    return [check(name) for name in NAMES]


def require(name: str) -> None:
    feature = check(name)
    if not feature.ok:
        raise feature.error()


def clear_cache() -> None:
    """Forget every answer (tests; a process that just gained privileges)."""
    with _lock:
        _cache.clear()


# -- building answers -------------------------------------------------------------------------------------
def _feature(name: str, support: Support, detail: str, hint: str | None = None) -> Feature:
    if support is Support.INCONCLUSIVE and name in MIN_KERNEL:
        have, need = kernel_version(), MIN_KERNEL[name]
        verdict = "should have it" if have >= need else "predates it"
        detail += f"; kernel {have[0]}.{have[1]} {verdict} (>= {need[0]}.{need[1]})"
    if hint is None:
        hint = "" if support is Support.SUPPORTED else (
            "run 'sudo vnet doctor' to find out" if detail.startswith(NEEDS_ROOT) else HINTS.get(name, ""))
    return Feature(name, support, detail, REQUIRES.get(name, ""), hint)


def _errname(err: int) -> str:
    err = abs(err)
    if err == ENOTSUPP:
        return "ENOTSUPP"
    if err == _errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # Python's errorcode says ENOTSUP, the kernel's sources EOPNOTSUPP
    return _errno.errorcode.get(err, f"errno {err}")


def _describe(err: int, why: str = "") -> str:
    """'EPERM (why)', or with no why 'EPERM (Operation not permitted)'."""
    err = abs(err)
    return f"{_errname(err)} ({why or (os.strerror(err) if err != ENOTSUPP else 'Operation not supported')})"


def _has_cap(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def _needs_root(name: str, *, perfmon: bool = False, net_admin: bool = False, sys_admin: bool = False
                ) -> Feature | None:
    """INCONCLUSIVE when the process could not even try; None when it can."""
    caps = effective_caps()
    if _has_cap(caps, CAP_SYS_ADMIN):
        return None
    missing = []
    if sys_admin:
        missing.append("CAP_SYS_ADMIN")
    else:
        for cap, wanted in ((CAP_BPF, True), (CAP_PERFMON, perfmon), (CAP_NET_ADMIN, net_admin)):
            if wanted and not _has_cap(caps, cap):
                missing.append(CAP_NAMES[cap])
    if not missing:
        return None
    return _feature(name, Support.INCONCLUSIVE, f"{NEEDS_ROOT} (lacks {', '.join(missing)})")


def _lockdown_mode() -> str | None:
    """'none', 'integrity', 'confidentiality', or None when it cannot be read."""
    try:
        with open(LOCKDOWN) as f:
            text = f.read()
    except OSError:
        return None
    if "[" not in text:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def _errno_of(e: BaseException) -> int:
    return abs(getattr(e, "errno", 0) or _errno.EINVAL)


def _refused(name: str, what: str, err: int, *, verifier: bool = False, eperm_why: str = "",
             prefix: str = "") -> Feature:
    """An answer from a failed load/attach: transient errnos are INCONCLUSIVE, the rest UNSUPPORTED;
    out of descriptors is no answer at all (ResourceError: the caller must not fall back on it)."""
    if err in (_errno.EMFILE, _errno.ENFILE):
        raise ResourceError(f"cannot probe {name}: {what}: {os.strerror(err)}", hint=FD_LIMIT_HINT)
    why = ""
    if err in (_errno.EPERM, _errno.EACCES):
        mode = _lockdown_mode()
        why = "; ".join(w for w in (eperm_why, f"kernel lockdown: {mode}" if mode and mode != "none" else "") if w)
    detail = f"{prefix}{what} {'rejected by the verifier' if verifier else 'refused'}: {_describe(err, why)}"
    return _feature(name, Support.INCONCLUSIVE if err in _TRANSIENT else Support.UNSUPPORTED, detail)


def _failed(name: str, what: str, e: BaseException, **kw) -> Feature:
    from vnet.errors import VerifierError

    return _refused(name, what, _errno_of(e), verifier=isinstance(e, VerifierError), **kw)


def _open(obj: str, program: str, config: dict | None = None, target: str | None = None):
    """Open `obj` with only `program` to load, configured; the caller loads it."""
    from vnet.binding import BpfObject
    from vnet.objects import object_path

    o = BpfObject(object_path(obj))
    try:
        o.keep_programs([program])
        for m in o.maps.values():
            if m.type == BPF_MAP_TYPE_RINGBUF:
                m.max_entries = os.sysconf("SC_PAGE_SIZE")  # one page, not the tracer's megabytes
        if config:
            o.set_config("skb_cfg" if obj == "skb_trace" else "tc_cfg", config)
        if target:
            o.programs[program].set_attach_target(target)
    except BaseException:
        o.close()
        raise
    return o


@lru_cache(maxsize=8)
def kernel_functions(among: frozenset[str]) -> frozenset[str]:
    """Which of the functions `among` the running kernel and its loaded modules have
    (kallsyms). Only those names are kept: all ~120k of them are ~12 MiB of Python
    strings, for as long as an agent runs."""
    found = set()
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in among and parts[1] in "tTwW":
                    found.add(parts[2])
    except OSError as e:
        if e.errno in (_errno.EMFILE, _errno.ENFILE):  # not "no such function": and never cached
            raise ResourceError(f"cannot read /proc/kallsyms: {e.strerror}", hint=FD_LIMIT_HINT) from None
    return frozenset(found)


def _probe_function() -> str:
    """A kernel function present here, to attach kprobes to."""
    names = kernel_functions(frozenset(PROBE_FUNCTIONS))
    return next((fn for fn in PROBE_FUNCTIONS if fn in names), PROBE_FUNCTIONS[0])


def tracefs_events() -> str | None:
    """The tracefs events directory, if tracefs is mounted."""
    for root in TRACEFS:
        if os.path.isdir(os.path.join(root, "events")):
            return os.path.join(root, "events")
    return None


def bpffs_problem(path: str | os.PathLike) -> str | None:
    """Why maps cannot be pinned under `path` (None: it is on a mounted bpffs). Not cached:
    a bpffs may be mounted later, and each mount namespace sees its own (`ip netns exec`
    mounts a new /sys without /sys/fs/bpf)."""
    path = os.path.abspath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount = fields[4].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):  # the last, deepest mount covering it wins
                    best, fstype = mount, right.split()[0]
    except OSError as e:
        return f"cannot read /proc/self/mountinfo: {e.strerror}"
    if fstype != "bpf":
        return f"{path} is not on a bpffs (it is on {fstype or 'nothing'} mounted at {best or '?'})"
    return None


# -- the probes ---------------------------------------------------------------------------------------------
def _capabilities() -> Feature:
    caps = effective_caps()
    present = [n for c, n in CAP_NAMES.items() if _has_cap(caps, c)]
    absent = [n for c, n in CAP_NAMES.items() if not _has_cap(caps, c)]
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    try:
        require_privileges(net_admin=True)
    except NotPermittedError:
        have = ", ".join(present) if present else "none of them"
        return _feature("capabilities", Support.UNSUPPORTED,
                        f"missing {', '.join(absent)}; has {have} (running as {who})")
    return _feature("capabilities", Support.SUPPORTED,
                    f"{', '.join(present)} (running as {who})" + (f"; lacks {', '.join(absent)}" if absent else ""))


def _lockdown() -> Feature:
    mode = _lockdown_mode()
    if mode == "none":
        return _feature("lockdown", Support.SUPPORTED, "none")
    if mode == "integrity":
        return _feature("lockdown", Support.SUPPORTED,
                        "integrity: blocks writing kernel memory and bpf_probe_write_user, nothing vnet uses")
    if mode == "confidentiality":
        return _feature("lockdown", Support.UNSUPPORTED,
                        "confidentiality: forbids BPF reads of kernel memory (bpf_probe_read_kernel: every "
                        "tracepoint and function probe), kprobes and fentry")
    if os.path.exists(LOCKDOWN):
        return _feature("lockdown", Support.INCONCLUSIVE, f"{LOCKDOWN} unreadable or unexpected")
    mounted = os.path.isdir("/sys/kernel/security") and bool(os.listdir("/sys/kernel/security"))
    if mounted:
        return _feature("lockdown", Support.SUPPORTED, "no lockdown LSM (securityfs has no lockdown file)")
    # securityfs is not mounted: whether a lockdown LSM runs is unreadable. What lockdown
    # would forbid (confidentiality: bpf_probe_read_kernel) is seen by the tracing probes.
    for name in ("raw_tp", "tp_btf"):
        if check(name).ok:
            return _feature("lockdown", Support.SUPPORTED,
                            f"not in confidentiality mode: a {name} program reading kernel memory loaded "
                            f"(securityfs not mounted, {LOCKDOWN} unreadable)")
    unreadable = f"securityfs not mounted ({LOCKDOWN} absent)"
    if any(check(n).detail.startswith(NEEDS_ROOT) for n in ("raw_tp", "tp_btf")):
        return _feature("lockdown", Support.INCONCLUSIVE, f"{NEEDS_ROOT}: {unreadable}, and a tracing program "
                        "that reads kernel memory would tell")
    return _feature("lockdown", Support.INCONCLUSIVE,
                    f"{unreadable}, and no tracing program loads here (confidentiality mode would explain that)")


def _libbpf() -> Feature:
    from vnet.binding import libbpf
    from vnet.binding._cdef import OPTIONAL_SYMBOLS

    try:
        version = libbpf.version()
    except LibbpfMissingError as e:
        return _feature("libbpf", Support.UNSUPPORTED, e.message)
    except UnsupportedError as e:
        return _feature("libbpf", Support.UNSUPPORTED, e.message)
    path = ""
    try:
        with open("/proc/self/maps") as f:
            path = next((line.split()[-1] for line in f if "/libbpf.so" in line), "")
    except OSError:
        pass
    optional = ", ".join(f"{s} {'yes' if libbpf.has(s) else 'no'}" for s in OPTIONAL_SYMBOLS)
    return _feature("libbpf", Support.SUPPORTED, f"{version}" + (f" ({path})" if path else "")
                    + (f"; optional: {optional}" if optional else ""))


def _libpcap() -> Feature:
    """Loads and compiles an expression: what `vnet trace EXPRESSION` does first."""
    from vnet.binding import pcap

    try:
        pcap.compile_classic("udp", pcap.DLT_EN10MB)
        return _feature("libpcap", Support.SUPPORTED, f"{pcap.version()}: tcpdump expressions compile")
    except UnsupportedError as e:
        return _feature("libpcap", Support.UNSUPPORTED, e.message)


def _btf() -> Feature:
    from vnet.binding import Btf
    from vnet.binding.libbpf import lib

    if not os.path.exists(VMLINUX_BTF):
        return _feature("btf", Support.UNSUPPORTED, f"{VMLINUX_BTF} is missing")
    try:
        with Btf.vmlinux() as btf:
            count = lib().btf__type_cnt(btf._ptr)
    except VnetError as e:
        return _feature("btf", Support.UNSUPPORTED, f"{VMLINUX_BTF} does not parse: {e.message}")
    return _feature("btf", Support.SUPPORTED, f"{VMLINUX_BTF} parsed ({count} types)")


def _ringbuf() -> Feature:
    from vnet.binding.libbpf import ffi, lib

    if (f := _needs_root("ringbuf")) is not None:
        return f
    ret = lib().libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, ffi.NULL)
    if ret == 1:
        return _feature("ringbuf", Support.SUPPORTED, "a BPF_MAP_TYPE_RINGBUF map was created")
    if ret == 0:
        return _feature("ringbuf", Support.UNSUPPORTED, "the kernel refused to create a BPF_MAP_TYPE_RINGBUF map")
    return _refused("ringbuf", "libbpf_probe_bpf_map_type(RINGBUF)", -ret)


def _udp_frame() -> bytes:
    """60 bytes: Ethernet, IPv4 (valid checksum), UDP 127.0.0.1:40000 -> 127.0.0.1:9, payload."""
    payload = b"vnet-probe" + bytes(8)
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                               bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])))
    s = sum(struct.unpack("!10H", bytes(ip)))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack("!H", ~s & 0xFFFF)
    eth = bytes(6) + bytes(6) + b"\x08\x00"
    return eth + bytes(ip) + udp


def _prog_test_run() -> Feature:
    from vnet.errors import BpfError

    if (f := _needs_root("prog_test_run")) is not None:
        return f
    frame = _udp_frame()
    with _open("tc_trace", "vnet_tc_ingress") as o:
        try:
            o.load()
        except BpfError as e:
            return _failed("prog_test_run", "loading the TC program", e)
        try:
            r = o.programs["vnet_tc_ingress"].test_run(frame)
        except BpfError as e:
            return _failed("prog_test_run", "BPF_PROG_TEST_RUN", e)
    retval = struct.unpack("=i", struct.pack("=I", r.retval))[0]
    return _feature("prog_test_run", Support.SUPPORTED,
                    f"ran vnet_tc_ingress on a {len(frame)}-byte UDP frame: retval {retval}")


def _tcx() -> Feature:
    from vnet.errors import BpfError

    if (f := _needs_root("tcx", net_admin=True)) is not None:
        return f
    with _open("tc_trace", "vnet_tc_ingress") as o:
        try:
            o.load()
        except BpfError as e:
            return _failed("tcx", "loading the TC program", e)
        try:
            # lo in this namespace; the program returns TCX_NEXT, so traffic is not altered.
            o.programs["vnet_tc_ingress"].attach_tcx(1, ingress=True).detach()
        except BpfError as e:
            return _failed("tcx", "tcx link on lo (BPF_TCX_INGRESS)", e)
    return _feature("tcx", Support.SUPPORTED, "a tcx link on lo ingress was created and removed")


def _tc_link() -> Feature:
    """TC's bpf_link form is tcx: the same answer, under the name callers ask for."""
    tcx = check("tcx")
    hint = HINTS["tc_link"] if tcx.support is Support.UNSUPPORTED else tcx.hint
    return Feature("tc_link", tcx.support, f"TC's bpf_link form is tcx: {tcx.detail}", REQUIRES["tc_link"], hint)


def _in_throwaway_netns(fn: Callable[[], Feature]) -> Feature:
    """Run fn on a new thread moved into a new, unnamed network namespace: nothing
    to delete afterwards, the namespace dies with the thread, even if vnet is killed."""
    import ctypes

    from vnet.netns import CLONE_NEWNET

    result: list = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            result.append(_feature("clsact", Support.INCONCLUSIVE,
                                   f"could not create a throwaway network namespace: {_describe(err)}"))
            return
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            result.append(e)

    t = threading.Thread(target=run, name="vnet-clsact-probe")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _clsact_here() -> Feature:
    """In the throwaway namespace: a veth pair if `ip` can make one, else its own lo."""
    import shutil  # here, not at the top: vnet trace imports this module and never runs this probe
    import socket
    import subprocess

    from vnet.errors import BpfError

    dev, ifindex = "lo", 1
    ip = shutil.which("ip")
    if ip and subprocess.run([ip, "link", "add", "vnetp0", "type", "veth", "peer", "name", "vnetp1"],
                             capture_output=True, timeout=10).returncode == 0:
        dev, ifindex = "veth vnetp0", socket.if_nametoindex("vnetp0")
    with _open("tc_trace", "vnet_tc_ingress") as o:
        try:
            o.load()
        except BpfError as e:
            return _failed("clsact", "loading the TC program", e)
        try:
            o.programs["vnet_tc_ingress"].attach_tc_filter(ifindex, ingress=True).detach()
        except BpfError as e:
            return _failed("clsact", f"clsact filter on {dev}", e)
    return _feature("clsact", Support.SUPPORTED,
                    f"a clsact direct-action filter was attached to {dev} in a throwaway network namespace")


def _clsact() -> Feature:
    if (f := _needs_root("clsact", sys_admin=True)) is not None:
        return f
    return _in_throwaway_netns(_clsact_here)


def _tracing(name: str, program: str, what: str, attach: Callable, *, config: dict | None = None,
             target: str | None = None, eperm_why: str = "",
             attach_refused: Callable[[int], str] | None = None) -> Feature:
    """Load `program` of skb_trace, attach it, detach, close. `attach_refused(errno)`
    may give a prefix for the detail of a refused attach."""
    from vnet.errors import BpfError

    if (f := _needs_root(name, perfmon=True)) is not None:
        return f
    with _open("skb_trace", program, config, target) as o:
        try:
            o.load()
        except BpfError as e:
            return _failed(name, "program load", e, eperm_why=eperm_why)
        try:
            attach(o.programs[program]).detach()
        except BpfError as e:
            prefix = attach_refused(_errno_of(e)) if attach_refused else ""
            return _failed(name, f"attach to {what}", e, eperm_why=eperm_why, prefix=prefix)
    return _feature(name, Support.SUPPORTED, f"loaded, attached to {what} and detached")


def _tp_btf() -> Feature:
    return _tracing("tp_btf", "vnet_tp_btf_skb", "tp_btf/netif_receive_skb", lambda p: p.attach_trace(),
                    config={"skb_arg": 1}, target="netif_receive_skb")


def _raw_tp() -> Feature:
    return _tracing("raw_tp", "vnet_raw_tp_skb", "raw_tp/netif_receive_skb",
                    lambda p: p.attach_raw_tracepoint("netif_receive_skb"), config={"skb_arg": 1})


def _tracepoint() -> Feature:
    events = tracefs_events()
    if events is None:
        return _feature("tracepoint", Support.UNSUPPORTED,
                        "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")
    cat, tp = PROBE_TRACEPOINT
    return _tracing("tracepoint", "vnet_tp_skb", f"tracepoint/{cat}/{tp}",
                    lambda p: p.attach_tracepoint(cat, tp))


def _fentry() -> Feature:
    return _tracing("fentry", "vnet_fentry_skb", "fentry/netif_receive_skb", lambda p: p.attach_trace(),
                    config={"skb_arg": 1}, target="netif_receive_skb",
                    eperm_why="function tracing is locked down?")


def _kprobe() -> Feature:
    fn = _probe_function()

    def attach_refused(err: int) -> str:
        if err not in (_errno.ENOENT, _errno.EOPNOTSUPP, ENOTSUPP):
            return ""
        if os.path.exists("/sys/bus/event_source/devices/kprobe"):
            return ""  # the kprobe PMU is there: the errno speaks for itself
        events = tracefs_events()
        legacy = ("tracefs not mounted" if events is None else "tracefs kprobe_events refused"
                  if os.path.exists(os.path.join(os.path.dirname(events), "kprobe_events")) else "no kprobe_events")
        return f"kprobes not available (no kprobe PMU, {legacy}): "

    return _tracing("kprobe", "vnet_kprobe_skb", f"kprobe/{fn}", lambda p: p.attach_kprobe(fn),
                    config={"skb_arg": 1}, attach_refused=attach_refused)


def _kprobe_multi() -> Feature:
    """Without a kprobe.multi program in the objects, ask link_create for a
    BPF_TRACE_KPROBE_MULTI link on the plain kprobe program: a kernel without
    CONFIG_FPROBE answers EOPNOTSUPP before it looks at the program; one with it
    answers EINVAL (wrong program), just as a kernel older than 5.18 does."""
    from vnet.binding.libbpf import ffi, lib
    from vnet.errors import BpfError

    if (f := _needs_root("kprobe_multi", perfmon=True)) is not None:
        return f
    with _open("skb_trace", "vnet_kprobe_skb", {"skb_arg": 1}) as o:
        try:
            o.load()
        except BpfError as e:
            return _failed("kprobe_multi", "kprobe program load", e)
        fd = lib().bpf_link_create(o.programs["vnet_kprobe_skb"].fd, 0, BPF_TRACE_KPROBE_MULTI, ffi.NULL)
    if fd >= 0:
        os.close(fd)
        return _feature("kprobe_multi", Support.SUPPORTED, "link_create(BPF_TRACE_KPROBE_MULTI) succeeded")
    err = -fd
    what = f"link_create(BPF_TRACE_KPROBE_MULTI) refused: {_describe(err)}"
    if err in (_errno.EOPNOTSUPP, ENOTSUPP):
        return _feature("kprobe_multi", Support.UNSUPPORTED, f"{what}: the kernel has no fprobe (CONFIG_FPROBE)")
    if err == _errno.EINVAL and kernel_version() < MIN_KERNEL["kprobe_multi"]:
        v = kernel_version()
        return _feature("kprobe_multi", Support.UNSUPPORTED, f"{what}; kernel {v[0]}.{v[1]} predates kprobe_multi")
    if err == _errno.EINVAL:
        return _feature("kprobe_multi", Support.INCONCLUSIVE,
                        f"{what}, as a kernel with kprobe_multi answers for a plain kprobe program; "
                        "vnet has no kprobe.multi program to try")
    return _refused("kprobe_multi", "link_create(BPF_TRACE_KPROBE_MULTI)", err)


def _gmac() -> Feature:
    """The session MAC agents and collectors agree on (vnet.protocol.channel.session_macs)."""
    from vnet.binding import crypto

    if crypto.available():
        return _feature("gmac", Support.SUPPORTED, f"{crypto.version()}: session frames tagged with GMAC")
    return _feature("gmac", Support.UNSUPPORTED, f"{crypto.why_not()}: session frames tagged with HMAC-SHA256")


def _libdeflate() -> Feature:
    """How the trace files' CRC-32 is computed (vnet.binding.checksum)."""
    from vnet.binding import checksum

    if checksum.available():
        return _feature("libdeflate", Support.SUPPORTED, "trace file checksums (CRC-32) with libdeflate")
    return _feature("libdeflate", Support.UNSUPPORTED, f"{checksum.why_not()}: trace file checksums with zlib")


# The parse_copy probe: PRUNE_DIAMONDS two-way branches, each leaving one stack slot either a
# spilled scalar or plain data; a verifier that prunes the one against the other walks them in
# ~20 instructions each, one that does not walks every combination (2^8 paths: ~7.7 k on 6.1).
PRUNE_DIAMONDS = 8
PRUNE_LINEAR_MAX = 1000  # verified instructions; 6.18 takes 160


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction, for the probes' own programs (vnet.tcpdump's assembler would cost
    `vnet trace` that package's import, ~30 ms, where no expression is given)."""
    return struct.pack("<BBhi", code, src << 4 | dst, off, imm)


def _prune_probe_insns() -> bytes:
    """The parse_copy probe."""
    call, exit_, ja, jset_k, mov64_x, mov64_k = 0x85, 0x95, 0x05, 0x45, 0xBF, 0xB7
    stx_dw, stx_b, ldx_dw, fp = 0x7B, 0x73, 0x79, 10
    out = [_insn(call, imm=7), _insn(mov64_x, 7, 0)]  # bpf_get_prandom_u32: bits unknown to the verifier
    for k in range(PRUNE_DIAMONDS):
        slot = -8 * (k + 1)
        out.append(_insn(jset_k, 7, imm=1 << k, off=2))  # to the plain-data way
        out.append(_insn(stx_dw, fp, 7, slot))  # walked first: the slot holds a spilled, imprecise scalar
        out.append(_insn(ja, off=8))
        out += [_insn(stx_b, fp, 7, slot + b) for b in range(8)]  # the same slot as plain data (STACK_MISC)
    out += [_insn(ldx_dw, 1, fp, -8 * (k + 1)) for k in range(PRUNE_DIAMONDS)]  # all read: live, compared
    out += [_insn(mov64_k, 0), _insn(exit_)]
    return b"".join(out)


def _parse_copy() -> Feature:
    """Whether kernel hooks parse from one copy of the packet (bpf/src/vnet_packet.bpf.h,
    parse_cfg). The copy is cheaper per event everywhere, but Linux 6.1's verifier walks it
    6-25x longer (docs/benchmarks.md): stack slots one path fills with a spilled value and
    another with plain bytes never merge there. Verifying the parser itself to find out
    would cost a trace's start that much; this small program shows the same pruning."""
    from vnet.binding.libbpf import ffi, lib
    from vnet.binding.object import program_info

    if (f := _needs_root("parse_copy", perfmon=True)) is not None:
        return f
    insns = _prune_probe_insns()
    fd = lib().bpf_prog_load(1, b"vnet_prune", b"Dual BSD/GPL", ffi.from_buffer(insns), len(insns) // 8,
                             ffi.NULL)  # BPF_PROG_TYPE_SOCKET_FILTER: loaded, never attached
    if fd < 0:
        return _refused("parse_copy", "loading the pruning probe (socket filter)", -fd)
    try:
        walked = program_info(fd).verified_insns
    finally:
        os.close(fd)
    if walked == 0:  # Linux < 5.16 does not say; older verifiers prune less, not more
        return _feature("parse_copy", Support.UNSUPPORTED, "the kernel does not report verified instructions")
    if walked <= PRUNE_LINEAR_MAX:
        return _feature("parse_copy", Support.SUPPORTED,
                        f"the pruning probe took {walked} verified instructions: kernel hooks parse from one copy")
    return _feature("parse_copy", Support.UNSUPPORTED,
                    f"the pruning probe took {walked} verified instructions (over {PRUNE_LINEAR_MAX}): "
                    "kernel hooks read each header")


BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP = 26, 23  # linux/bpf.h: a tp_btf program


def _parse_direct() -> Feature:
    """Whether typed kernel hooks read the packet in place (parse_cfg.direct): a verifier that
    types a load of skb->head (a pointer to bytes, in a struct it knows by BTF) as read-only
    untrusted memory lets the program load from it, each load guarded against faults as a
    probe read is, without the helper call or the copy. Older verifiers type it a plain
    number, and refuse the load: this program, as the parser does it, in five instructions."""
    from vnet.binding.btf import TYPEDEF, vmlinux_for_a_lookup
    from vnet.binding.libbpf import ffi, lib

    if (f := _needs_root("parse_direct", perfmon=True)) is not None:
        return f
    try:
        with vmlinux_for_a_lookup() as btf:  # ~10 ms where nothing parsed it yet (libbpf's own is freed)
            target = btf.find("btf_trace_netif_receive_skb", TYPEDEF)
            head_bits, _ = btf.member_bits("sk_buff")[1]["head"]
    except (KeyError, VnetError) as e:
        return _feature("parse_direct", Support.UNSUPPORTED, f"no tp_btf target to probe with: {e}")

    ldx_dw, ldx_b, mov64_k, exit_ = 0x79, 0x71, 0xB7, 0x95
    insns = b"".join([_insn(ldx_dw, 1, 1, 0),                # skb: the tracepoint's first argument
                      _insn(ldx_dw, 1, 1, head_bits // 8),   # skb->head
                      _insn(ldx_b, 0, 1, 0),                 # a byte of the packet's buffer
                      _insn(mov64_k, 0), _insn(exit_)])
    opts = ffi.new("struct bpf_prog_load_opts *")
    opts.sz = ffi.sizeof("struct bpf_prog_load_opts")
    opts.expected_attach_type = BPF_TRACE_RAW_TP
    opts.attach_btf_id = target
    fd = lib().bpf_prog_load(BPF_PROG_TYPE_TRACING, b"vnet_direct", b"Dual BSD/GPL", ffi.from_buffer(insns),
                             len(insns) // 8, opts)  # loaded, never attached
    if fd >= 0:
        os.close(fd)
        return _feature("parse_direct", Support.SUPPORTED,
                        "a tp_btf program may load from skb->head: typed kernel hooks read the packet in place")
    if -fd == _errno.EACCES:  # the verifier's answer: R1 invalid mem access 'scalar'
        return _feature("parse_direct", Support.UNSUPPORTED,
                        "the verifier refuses loads through skb->head: typed kernel hooks parse from a copy")
    return _refused("parse_direct", "loading the skb->head probe (tp_btf)", -fd, verifier=True)


_PROBES: dict[str, Callable[[], Feature]] = {
    "capabilities": _capabilities, "lockdown": _lockdown, "libbpf": _libbpf, "btf": _btf, "ringbuf": _ringbuf,
    "prog_test_run": _prog_test_run, "tcx": _tcx, "tc_link": _tc_link, "clsact": _clsact, "tp_btf": _tp_btf,
    "raw_tp": _raw_tp, "tracepoint": _tracepoint, "fentry": _fentry, "kprobe": _kprobe,
    "kprobe_multi": _kprobe_multi, "libpcap": _libpcap, "gmac": _gmac, "libdeflate": _libdeflate,
    "parse_copy": _parse_copy, "parse_direct": _parse_direct,
}
