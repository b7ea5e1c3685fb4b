"""Typed errors: raised at the lowest level, turned into one stderr line and an
exit code at the CLI boundary (vnet.cli.main)."""

from __future__ import annotations

import errno as _errno
import os


class VnetError(Exception):
    """Base of every error vnet reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class UsageError(VnetError):
    """Bad command-line input or spec."""

    exit_code = 2


class NotPermittedError(VnetError):
    """Not root / missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, or kernel lockdown."""

    exit_code = 3


class NoSuchInterfaceError(VnetError):
    exit_code = 4


class UnsupportedError(VnetError):
    """This kernel or libbpf lacks a feature: "X not supported (requires ...)"."""

    exit_code = 5


class ProbeUnavailableError(UnsupportedError):
    """A catalog probe none of whose hooks can run here; `reason` says why, without the probe's name."""

    def __init__(self, probe: str, reason: str):
        super().__init__(f"probe {probe} unavailable: {reason}",
                         hint="run 'vnet probes' to see what this kernel can trace")
        self.probe, self.reason = probe, reason


class LibbpfMissingError(VnetError):
    exit_code = 6


class BpfError(VnetError):
    """A libbpf/kernel operation failed; carries errno, the operation and the target."""

    exit_code = 7

    def __init__(self, op: str, err: int, target: str = "", *, hint: str | None = None, detail: str = ""):
        self.op = op
        self.errno = abs(err)
        self.target = target
        what = f"{op} {target}".strip()
        msg = f"{what} failed: {os.strerror(self.errno)} [errno {self.errno}]"
        if detail:
            msg += f": {detail}"
        super().__init__(msg, hint=hint if hint is not None else _hint_for(op, self.errno))


class VerifierError(BpfError):
    """The kernel verifier rejected a program; `log` holds the whole log."""

    exit_code = 8

    def __init__(self, op: str, err: int, target: str, log: str):
        self.log = log
        tail = " | ".join(line for line in log.strip().splitlines()[-3:])
        super().__init__(op, err, target, detail=f"verifier: {tail}" if tail else "",
                         hint="run with -v for the full verifier log")


class AttachError(BpfError):
    exit_code = 9


class BpfPermissionError(BpfError, NotPermittedError):
    exit_code = NotPermittedError.exit_code


class ResourceError(VnetError):
    """The process ran out of a system resource (open files): not the kernel's lack of a
    feature, and no reason to fall back to another hook."""

    exit_code = 14


class BpfResourceError(BpfError, ResourceError):
    exit_code = ResourceError.exit_code


RESOURCE_ERRNOS = (_errno.EMFILE, _errno.ENFILE)
FD_LIMIT_HINT = "raise the open-file limit (ulimit -n); each traced hook holds a few descriptors"


def resource_error(e: OSError, what: str) -> ResourceError:
    return ResourceError(f"{what}: {e.strerror or e}", hint=FD_LIMIT_HINT)


def _hint_for(op: str, err: int) -> str | None:
    if err in (_errno.EPERM, _errno.EACCES):
        return ("run as root (needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN); check kernel lockdown "
                "(/sys/kernel/security/lockdown) and kernel.unprivileged_bpf_disabled")
    if err == _errno.ENOENT and "attach" in op:
        return "the function or tracepoint is not present in this kernel"
    if err == _errno.EINVAL and "attach" in op:
        return "this kernel does not support this attach type"
    if err in (_errno.EMFILE, _errno.ENFILE):
        return "raise the open-file limit (ulimit -n); each traced hook holds a few descriptors"
    if err == _errno.ENOMEM:
        return "raise RLIMIT_MEMLOCK (ulimit -l) or use a kernel with memcg accounting (>= 5.11)"
    return None


def bpf_error(op: str, err: int, target: str = "", *, cls: type[BpfError] = BpfError, **kw) -> BpfError:
    """Build the most specific error for a failed libbpf call (err may be negative)."""
    if abs(err) in (_errno.EPERM, _errno.EACCES) and cls is BpfError:
        cls = BpfPermissionError
    elif abs(err) in (_errno.EMFILE, _errno.ENFILE):
        cls = BpfResourceError
    return cls(op, err, target, **kw)
