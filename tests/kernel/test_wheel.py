"""The wheel is all a machine needs: build it from this checkout, install it into a
fresh venv, and trace a live veth with the installed copy, with no C compiler on
PATH and from outside the checkout. The precompiled CO-RE object inside the wheel
is the committed bpf/build/ one, byte for byte.

Needs root (a real trace), network access to the package index (build isolation
fetches hatchling; pip fetches the dependencies). Takes 30-60 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vnet
from kernel_support import (
    ROOT,
    VnetProcess,
    assert_nothing_on,
    parse_event_line,
    udp_stream,
    veth_pair,
    wait_released,
)
from vnet.binding import libbpf

pytestmark = pytest.mark.kernel

COMPILERS = ("cc", "gcc", "clang", "c89", "c99", "tcc")
STEP_TIMEOUT = 600  # a slow package index; not a performance assertion


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, **kw)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def compiler_free_path(venv: Path) -> str:
    """The venv's bin and the sbin directories: nothing there compiles C."""
    path = os.pathsep.join([str(venv / "bin"), "/usr/sbin", "/sbin"])
    for name in COMPILERS:
        assert shutil.which(name, path=path) is None, f"{name} is on {path}"
    for d in path.split(os.pathsep):
        if os.path.isdir(d):
            offenders = [f for f in os.listdir(d) if re.fullmatch(r"(.*-)?(gcc|clang|cc)(-[\d.]+)?", f)]
            assert offenders == [], f"compilers in {d}: {offenders}"
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)], cwd=ROOT)
    wheels = list(out.glob("vnet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_the_committed_objects(wheel):
    objects = sorted((ROOT / "bpf" / "build").glob("*.bpf.o"))
    assert objects, "no committed object in bpf/build/"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for obj in objects:
            inside = f"vnet/_bpf/{obj.name}"
            assert inside in names, f"{inside} not in {wheel.name}"
            assert z.read(inside) == obj.read_bytes(), f"{inside} differs from {obj}"
        assert "vnet/_bpf/tc_trace.bpf.o" in names
        assert not [n for n in names if n.endswith(".bpf.c") or n.endswith(".h")]  # objects only


def test_installed_wheel_traces_without_a_compiler(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    path = compiler_free_path(venv)
    # A minimal environment: nothing points back at the checkout.
    env = {"PATH": path, "HOME": str(tmp_path), "LC_ALL": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1"}
    # Installing needs no compiler either: every dependency comes as a wheel or pure Python.
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path, env=env)
    python, vnet_bin = str(venv / "bin" / "python"), str(venv / "bin" / "vnet")

    where = run([python, "-c", "import vnet, vnet.objects as o; print(vnet.__file__); "
                               "print(o.object_path('tc_trace'))"], cwd=tmp_path, env=env).stdout.split()
    site = venv.resolve()
    module, obj = map(lambda p: Path(p).resolve(), where)
    assert module.is_relative_to(site) and obj.is_relative_to(site), where
    assert obj.parent.name == "_bpf" and obj.read_bytes() == (ROOT / "bpf/build/tc_trace.bpf.o").read_bytes()

    version = run([vnet_bin, "--version"], cwd=tmp_path, env=env).stdout.strip()
    assert re.fullmatch(rf"vnet {re.escape(vnet.__version__)} \(libbpf v?\d+\.\d+(\.\d+)?\)", version), version
    assert version == f"vnet {vnet.__version__} (libbpf {libbpf.version()})"  # the system's libbpf.so.1

    with veth_pair(subnet=78) as net:
        with VnetProcess(argv=[vnet_bin, "trace", "-i", net.spec1, "-c", "4", "--json"], env=env, cwd=tmp_path) as p:
            p.wait_started()
            ids = p.bpf_ids()
            with udp_stream(net.ns1, net.ip2, 5400):
                rc = p.wait(30)
        assert rc == 0, p.stderr
        events = [parse_event_line(line) for line in p.stdout]
        assert len(events) == 4
        assert all(e["probe"].startswith(f"dev:{net.spec1}:") for e in events)
        assert p.summary()["printed"] == 4
        left = wait_released(ids)
        assert ids.progs and not left.progs and not left.links
        assert_nothing_on(net.ns1, net.if1)
