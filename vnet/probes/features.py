"""Feature probing, in one place. Each probe answers supported / unsupported
(with the minimum it needs) / inconclusive; inconclusive answers are not cached."""

from __future__ import annotations

import enum
import os
import platform
from functools import lru_cache

from vnet.binding.libbpf import ffi, lib
from vnet.errors import NotPermittedError

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FUNC_get_netns_cookie = 122
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


class Support(enum.Enum):
    SUPPORTED = "supported"
    UNSUPPORTED = "unsupported"
    INCONCLUSIVE = "inconclusive"


@lru_cache(maxsize=1)
def kernel_version() -> tuple[int, int]:
    release = platform.release()
    major, minor = release.split(".")[:2]
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
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    bpf = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    if not bpf or (net_admin and not (has(CAP_NET_ADMIN) or has(CAP_SYS_ADMIN))):
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        raise NotPermittedError(
            f"tracing needs CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; running as {who} without them",
            hint="run with sudo",
        )


_cache: dict[str, Support] = {}


def _cached(name: str, probe) -> Support:
    if name in _cache:
        return _cache[name]
    result = probe()
    if result is not Support.INCONCLUSIVE:
        _cache[name] = result
    return result


def netns_cookie_in_tc() -> Support:
    """bpf_get_netns_cookie() callable from tc programs (Linux >= 6.14)."""
    def probe():
        rc = lib().libbpf_probe_bpf_helper(BPF_PROG_TYPE_SCHED_CLS, BPF_FUNC_get_netns_cookie, ffi.NULL)
        return Support.SUPPORTED if rc == 1 else Support.UNSUPPORTED if rc == 0 else Support.INCONCLUSIVE
    return _cached("netns_cookie_in_tc", probe)


def tcx_expected() -> bool:
    """tcx links exist from Linux 6.6; attach still falls back on EINVAL."""
    return kernel_version() >= (6, 6)
