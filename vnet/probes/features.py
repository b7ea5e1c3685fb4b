"""Feature probing, in one place: kernel version, privileges, hook availability."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

from vnet.errors import NotPermittedError, UnsupportedError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@lru_cache(maxsize=1)
def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
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
