"""The committed pre-parsed cffi modules (vnet/binding/_libbpf_ffi.py, _pcap_ffi.py, _crypto_ffi.py, _deflate_ffi.py) are what
tools/gen_ffi.py makes of today's vnet/binding/_cdef.py, the bindings use them, and a missing or
stale one falls back to parsing the declarations in-line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vnet.binding import _ffi

HERE = Path(_ffi.__file__).parent


@pytest.mark.parametrize("name", sorted(_ffi.MODULES))
def test_committed_module_is_current(name):
    assert (HERE / f"{name}.py").read_text() == _ffi.source(name), f"run 'make ffi' and commit {name}.py"


def test_bindings_start_without_pycparser():
    code = ("import sys; import vnet.binding.libbpf as l, vnet.binding.pcap as p, vnet.binding.crypto as c; "
            "import vnet.binding.checksum as d; "
            "print('pycparser' in sys.modules, 'cffi.api' in sys.modules, type(l.ffi).__module__, "
            "type(c.ffi).__module__, type(d.ffi).__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "_cffi_backend", "_cffi_backend", "_cffi_backend"], r.stdout


@pytest.mark.parametrize("name", sorted(_ffi.MODULES))
def test_same_declarations_either_way(name):
    pre = _ffi.load(name)
    parsed = _ffi.inline(_ffi.MODULES[name])
    for text in _ffi.MODULES[name]:
        for struct in re.findall(r"^\s*struct\s+(\w+)\s*\{", text, re.M):
            a, b = pre.typeof(f"struct {struct}"), parsed.typeof(f"struct {struct}")
            assert pre.sizeof(a) == parsed.sizeof(b)
            fields = lambda t: [(f, x.type.cname, x.offset, x.bitshift, x.bitsize) for f, x in t.fields]  # noqa: E731
            assert fields(a) == fields(b), struct


def test_stale_or_missing_module_falls_back(monkeypatch):
    monkeypatch.setitem(_ffi.MODULES, "_pcap_ffi", (_ffi.MODULES["_pcap_ffi"][0] + "\nint pcap_snapshot(pcap_t *p);\n",))
    ffi = _ffi.load("_pcap_ffi")  # the committed module's CRC no longer matches
    assert type(ffi).__module__ != "_cffi_backend"
    ffi.typeof("int(*)(pcap_t *)")
    monkeypatch.setitem(_ffi.MODULES, "_no_such_ffi", _ffi.MODULES["_libbpf_ffi"])
    assert type(_ffi.load("_no_such_ffi")).__module__ != "_cffi_backend"
