"""Run a function in a forked child and take back its (msgpack-able) result.

The agent answers a dispatcher's hello (feature probes, the probe catalog
resolved against this kernel) this way: libbpf parses the kernel's BTF for every
object it loads, the resolver keeps vmlinux's BTF, and glibc keeps the high
water of what was parsed. Done in a child, none of it enters the long-running
agent: its resident memory after a hello stays what it was before (~20 MiB
less; tools/bench/first_event.py); the agent keeps the answer, plain data. The child exits with os._exit: nothing of
the parent's (sockets, a running trace's objects) is closed or flushed by it.
"""

from __future__ import annotations

import os
import select
import signal
import time
from contextlib import ExitStack
from typing import Any, Callable

import msgpack

from vnet.errors import VnetError

CHILD_TIMEOUT_S = 120.0
MAX_RESULT_BYTES = 16 << 20


class ChildError(VnetError):
    """The child's VnetError, carried over (message, hint and exit code kept)."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = 1):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


def run_forked(fn: Callable[[], Any], *, locks=(), timeout: float = CHILD_TIMEOUT_S) -> Any:
    """fn() in a child process; its return value (plain data) or its VnetError here.

    `locks`: locks the child's work takes; they are held across the fork, so that no
    other thread of ours holds one in the child (it would never be released there)."""
    r, w = os.pipe()
    try:
        with ExitStack() as held:
            for lock in locks:
                held.enter_context(lock)
            pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.close(r)
                try:
                    out = {"ok": fn()}
                except VnetError as e:
                    out = {"error": e.message, "hint": e.hint, "exit_code": e.exit_code}
                except Exception as e:  # noqa: BLE001 - reported to the parent as a failure
                    out = {"error": f"{type(e).__name__}: {e}", "hint": None, "exit_code": 1}
                data = memoryview(msgpack.packb(out, use_bin_type=True))
                while data:
                    data = data[os.write(w, data):]
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        w = -1
        try:
            data = _read_all(r, pid, timeout)
        finally:
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    if not data:
        raise VnetError(f"the agent's worker process failed (wait status {status:#x})")
    out = msgpack.unpackb(data, raw=False)
    if "ok" in out:
        return out["ok"]
    raise ChildError(out["error"], hint=out.get("hint"), exit_code=int(out.get("exit_code") or 1))


def _readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): select refuses descriptors past 1023, and an agent holding
    many probes' programs, maps and links has them."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _read_all(fd: int, pid: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not _readable(fd, left):
            os.kill(pid, signal.SIGKILL)
            raise VnetError(f"the agent's worker process did not answer within {timeout:.0f} s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > MAX_RESULT_BYTES:
            os.kill(pid, signal.SIGKILL)
            raise VnetError("the agent's worker process answered with too much data")
