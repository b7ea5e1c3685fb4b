#!/usr/bin/env python3
"""Boot Debian's 6.1 kernel ONCE under qemu (software emulation, no KVM) with
virtme-ng and run pytest inside it; exit with pytest's exit code.

The guest shares the host's root filesystem read-only (so it sees the same
Python, libbpf, .venv and checkout); only RESULTS is writable. Output is
streamed. Inside the guest, VNET_IN_GUEST=1 is set (tests/vm skip without it).

    tools/vm/run_in_guest.py                              # the whole tests/vm suite
    tools/vm/run_in_guest.py -- tests/vm/test_guest_basics.py -k fentry -x
    tools/vm/run_in_guest.py --shell-cmd 'python -m vnet doctor'   # any command instead of pytest

Exit codes: pytest's (0 passed, 1 failed, 2 interrupted, 5 no tests, ...), the
command's with --shell-cmd; 124 the guest timed out (qemu killed); 125 the
guest never got to run the command (boot failure: see the output).
Results: RESULTS/junit.xml (pytest's JUnit XML), RESULTS/exitcode, RESULTS/guest.log.

Needs root and tools/vm/setup.sh (qemu-system-x86, linux-image-amd64,
busybox-static, virtme-ng in tools/vm/.venv).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_RESULTS = HERE / "results"
NO_RESULT = 125
TIMED_OUT = 124


def find_kernel(pattern: str) -> str:
    """The newest /boot/vmlinuz matching pattern that has its /lib/modules."""
    def version_key(path: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]

    for path in sorted(glob.glob(pattern), key=version_key, reverse=True):
        release = os.path.basename(path).removeprefix("vmlinuz-")
        if os.path.isdir(f"/lib/modules/{release}"):
            return path
    sys.exit(f"run_in_guest: no kernel matching {pattern} with its /lib/modules (run tools/vm/setup.sh)")


def find_vng(given: str | None) -> str:
    for cand in (given, str(HERE / ".venv" / "bin" / "vng"), shutil.which("vng")):
        if cand and os.access(cand, os.X_OK):
            return cand
    sys.exit("run_in_guest: vng (virtme-ng) not found (run tools/vm/setup.sh)")


def guest_script(args, results: Path) -> str:
    """The shell command the guest runs; it records the exit code in RESULTS/exitcode."""
    env = {"VNET_IN_GUEST": "1", "PYTHONDONTWRITEBYTECODE": "1", "VNET_VM_RESULTS": str(results),
           "PYTHONUNBUFFERED": "1"}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    if args.shell_cmd:
        cmd = args.shell_cmd
        path = f"PATH={shlex.quote(str(Path(args.python).parent))}:$PATH"
        exports += " " + path
    else:
        junit = results / "junit.xml"
        pytest_args = args.pytest_args or ["tests/vm"]
        cmd = " ".join(shlex.quote(a) for a in [args.python, "-m", "pytest", "-p", "no:cacheprovider", "-ra",
                                                 f"--junitxml={junit}", *pytest_args])
    ec = shlex.quote(str(results / "exitcode"))
    return (f"cd {shlex.quote(str(ROOT))} && echo 'vnet-vm: guest up' && uname -r && "
            f"export {exports} && {{ {cmd} ; }}; echo $? > {ec}")


def boot(cmd: list[str], vng: str, log_path: Path, timeout: float, tag: str) -> tuple[int | None, bool, float]:
    """Run a vng command line: stream its output (and save it to log_path), kill
    the whole group (vng, virtme-run, qemu) after `timeout` s. Returns (vng's
    exit code, timed out?, seconds)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(vng).parent}:{env.get('PATH', '/usr/bin:/bin')}"  # vng runs virtme-run from PATH
    start = time.monotonic()
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)

    def pump() -> None:
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"\n{tag}: timed out after {timeout:.0f} s: killing qemu", flush=True)
    except KeyboardInterrupt:
        timed_out = True
    finally:
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=5)
        log.close()
    return proc.returncode, timed_out, time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="/boot/vmlinuz-6.1.*-amd64", help="guest kernel (a glob: newest wins)")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--cpus", default="2")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for boot + run; qemu is killed after")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="writable dir shared with the guest")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="python inside the guest")
    ap.add_argument("--vng", default=None, help="virtme-ng's vng (default: tools/vm/.venv/bin/vng)")
    ap.add_argument("--shell-cmd", default=None, help="run this shell command instead of pytest")
    ap.add_argument("--net-tap", default=None, metavar="TAP",
                    help="give the guest a virtio NIC on this (existing) host tap device; run this script "
                         "inside the tap's network namespace")
    ap.add_argument("--dry-run", action="store_true", help="print the vng command and exit")
    ap.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: tests/vm)")
    args = ap.parse_args()

    if os.geteuid() != 0 and not args.dry_run:
        sys.exit("run_in_guest: needs root (the guest runs as the invoking user; eBPF needs root)")
    kernel = find_kernel(args.kernel)
    vng = find_vng(args.vng)
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    for stale in ("junit.xml", "exitcode", "guest.log"):
        (results / stale).unlink(missing_ok=True)

    cmd = [vng, "--disable-kvm", "--disable-microvm", "--memory", args.memory, "--cpus", args.cpus,
           "--run", kernel, "--rwdir", str(results), "--cwd", str(ROOT),
           "--exec", guest_script(args, results)]
    if args.net_tap:
        cmd[1:1] = [f"--qemu-opts=-netdev tap,id=n1,ifname={args.net_tap},script=no,downscript=no "
                    f"-device virtio-net-pci,netdev=n1"]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"vnet-vm: booting {kernel} (no KVM, {args.memory}, {args.cpus} CPUs), results in {results}", flush=True)
    returncode, timed_out, elapsed = boot(cmd, vng, results / "guest.log", args.timeout, "vnet-vm")
    ec_file = results / "exitcode"
    if timed_out:
        code = TIMED_OUT
    elif ec_file.is_file() and ec_file.read_text().strip().lstrip("-").isdigit():
        code = int(ec_file.read_text().strip())
    else:
        code = NO_RESULT
        print(f"vnet-vm: the guest did not report an exit code (vng exit {returncode})", flush=True)
    print(f"vnet-vm: guest finished in {elapsed:.0f} s, exit code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
