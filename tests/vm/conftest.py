"""tests/vm run inside a throwaway VM booted on Debian's 6.1 kernel (kprobes,
fentry, openvswitch.ko): tools/vm/run_in_guest.py boots it once and runs this
directory there with VNET_IN_GUEST=1.

On the host (`make test`), each test here is replaced by one that reports the
guest's result for it: the first one boots the guest ONCE for the session and
runs the whole directory there; a failure in the guest fails the host test with
the guest's output. VNET_SKIP_VM=1 skips them instead (say why in your commit).

Inside the guest the host's root filesystem is shared read-only (same Python,
libbpf, .venv, checkout and committed bpf/build objects); /lib, /tmp, /var,
/etc are copy-on-write overlays, so modprobe and `ip netns` work.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_GUEST = os.environ.get("VNET_IN_GUEST") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: runs inside the VM booted by tools/vm/run_in_guest.py")


def pytest_collection_modifyitems(session, config, items):
    here = Path(__file__).resolve().parent
    for i, item in enumerate(items):
        if here not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.vm)
        if not IN_GUEST:
            items[i] = GuestResult.from_parent(item.parent, name=item.name, guest_key=_junit_key(item))
            items[i].add_marker(pytest.mark.vm)


def _junit_key(item) -> tuple[str, str]:
    """(classname, name) as pytest's JUnit XML in the guest names this test."""
    path, _, rest = item.nodeid.partition("::")
    parts = rest.split("::")
    classname = ".".join([path.removesuffix(".py").replace("/", "."), *parts[:-1]])
    return classname, parts[-1]


class GuestFailure(Exception):
    pass


class GuestResult(pytest.Item):
    """The guest's result for one tests/vm test, run there by tools/vm/run_in_guest.py."""

    def __init__(self, *, guest_key: tuple[str, str], **kw):
        super().__init__(**kw)
        self.guest_key = guest_key

    def runtest(self) -> None:
        if os.environ.get("VNET_SKIP_VM") == "1":
            pytest.skip("VNET_SKIP_VM=1: the VM suite was not run")
        if os.geteuid() != 0:
            pytest.skip("the VM suite needs root (qemu, the guest's modules)")
        results = _guest_results(self.config)
        kind, text = results["cases"].get(self.guest_key, ("missing", ""))
        if kind == "failure":
            raise GuestFailure(text)
        if kind == "skipped":
            pytest.skip(f"in the guest: {text}")
        if kind == "missing":
            raise GuestFailure(f"the guest reported no result for {self.guest_key} (exit {results['exit']});"
                               f" end of the guest's output:\n{results['log_tail']}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, GuestFailure):
            return f"failed in the 6.1 guest:\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"[6.1 guest] {self.name}"


def _guest_results(config) -> dict:
    """Boot the guest once per session, run tests/vm there, parse its JUnit XML."""
    cached = getattr(config, "_vnet_guest_results", None)
    if cached is not None:
        return cached
    import subprocess
    import sys
    import tempfile
    import xml.etree.ElementTree as ET

    results_dir = Path(tempfile.mkdtemp(prefix="vnet-vm-"))
    runner = ROOT / "tools" / "vm" / "run_in_guest.py"
    try:
        proc = subprocess.run([sys.executable, str(runner), "--results", str(results_dir), "--timeout", "1800"],
                              cwd=ROOT, capture_output=True, text=True, timeout=1860)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, output = 124, f"{e.stdout or ''}{e.stderr or ''}"
    cases: dict[tuple[str, str], tuple[str, str]] = {}
    junit = results_dir / "junit.xml"
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            key = (case.get("classname", ""), case.get("name", ""))
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            skipped = case.find("skipped")
            if bad is not None:
                cases[key] = ("failure", (bad.get("message") or "") + "\n" + (bad.text or ""))
            elif skipped is not None:
                cases[key] = ("skipped", skipped.get("message") or "")
            else:
                cases[key] = ("passed", "")
    config._vnet_guest_results = {"cases": cases, "exit": code,
                                  "log_tail": "\n".join(output.strip().splitlines()[-40:])}
    return config._vnet_guest_results


@pytest.fixture(scope="session")
def guest_modules():
    """The modules the catalog's function probes live in (6.1 has them as .ko)."""
    from vm_support import modprobe

    modprobe("veth", "tun", "bridge", "openvswitch", "vhost_net")
    _forget_kernel_caches()


def _forget_kernel_caches() -> None:
    """Module BTF and kallsyms were read (and cached) before the modules were
    loaded, maybe: forget every cached kernel lookup of the resolver and of
    feature probing (by duck typing: these private helpers move between versions)."""
    from vnet.probes import features
    from vnet.probes import resolve as resolver

    for mod in (resolver, features):
        for value in list(vars(mod).values()):
            if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", "") == mod.__name__:
                value.cache_clear()
