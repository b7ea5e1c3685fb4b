"""The cffi cdef (vnet/binding/_cdef.py) against the real libbpf and kernel headers.

ABI mode means cffi never sees the headers: a wrong size or offset in the cdef
would silently corrupt memory. So compile a C program that prints what the
compiler thinks (sizeof/offsetof of every field the cdef declares) and compare.
Nothing is faked: the real headers, the real compiler, the loaded libbpf.so.1.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import cffi
import pytest

from vnet.binding import libbpf
from vnet.binding._cdef import CDEF, OPTIONAL_SYMBOLS

HEADERS = ("stddef.h", "stdio.h", "bpf/libbpf.h", "bpf/bpf.h", "linux/btf.h")
# Where the cdef names a field differently from the header (C name -> header name).
RENAMED = {("btf_type", "size_or_type"): "size"}  # the header's `union { __u32 size; __u32 type; }`


def _cdef_ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    return ffi


def _cdef_structs() -> list[str]:
    """Every struct the cdef defines (with a body), in order."""
    return re.findall(r"^\s*struct\s+(\w+)\s*\{", CDEF, re.M)


def _unavailable(why: str) -> None:
    """Missing tools: a skip on a developer box, a failure in CI (where they must be installed)."""
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must install them (apt-get install gcc libbpf-dev linux-libc-dev)")
    pytest.skip(why)


_FIRST_BIT = r"""static void first_bit(const void *p, size_t size, const char *key)
{
    const unsigned char *b = p;
    size_t first = 0, width = 0;

    for (size_t i = 0; i < size * 8; i++)
        if (b[i / 8] >> (i % 8) & 1) {
            if (!width)
                first = i;
            width++;
        }
    printf("%s %zu %zu\n", key, width, first);
}
"""


def _field_layout(ffi: cffi.FFI, ctype, fname: str, field) -> tuple[int, int]:
    """(size, offset) in bytes; for a bit-field (width, first bit) in bits (little-endian hosts)."""
    if field.bitsize >= 0:
        return field.bitsize, field.offset * 8 + field.bitshift
    return ffi.sizeof(field.type), ffi.offsetof(ctype, fname)


def _c_program(ffi: cffi.FFI, structs: list[str] | None = None,
               headers: tuple[str, ...] = HEADERS) -> tuple[str, list[tuple[str, str | None]]]:
    """C source printing `key size offset` lines, and the keys in order. A
    bit-field has no offsetof: its line gives its width and first bit instead,
    found by setting every bit of it in a zeroed struct."""
    lines = [f"#include <{h}>" for h in headers] + ["#include <string.h>", "", _FIRST_BIT, "int main(void) {"]
    keys: list[tuple[str, str | None]] = []
    for name in _cdef_structs() if structs is None else structs:
        lines.append(f'  printf("{name} %zu 0\\n", sizeof(struct {name}));')
        keys.append((name, None))
        for fname, field in ffi.typeof(f"struct {name}").fields:
            cname = RENAMED.get((name, fname), fname)
            if field.bitsize >= 0:
                lines.append(f"  {{ struct {name} v; memset(&v, 0, sizeof(v)); v.{cname}--; "
                             f'first_bit(&v, sizeof(v), "{name}.{fname}"); }}')
            else:
                lines.append(f'  printf("{name}.{fname} %zu %zu\\n", sizeof(((struct {name} *)0)->{cname}), '
                             f"offsetof(struct {name}, {cname}));")
            keys.append((name, fname))
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n", keys


@pytest.fixture(scope="module")
def compiled_layout(tmp_path_factory) -> dict[str, tuple[int, int]]:
    return _compile_layout(tmp_path_factory, _cdef_ffi())


def _compile_layout(tmp_path_factory, ffi: cffi.FFI, structs: list[str] | None = None,
                    headers: tuple[str, ...] = HEADERS) -> dict[str, tuple[int, int]]:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        _unavailable("no C compiler (cc) to check the cdef layouts against the headers")
    source, _ = _c_program(ffi, structs, headers)
    tmp = tmp_path_factory.mktemp("cdef_layout")
    (tmp / "layout.c").write_text(source)
    build = subprocess.run([cc, "-Wall", "-o", str(tmp / "layout"), str(tmp / "layout.c")],
                           capture_output=True, text=True)
    if build.returncode != 0:
        missing = re.search(r"fatal error: (\S+): No such file", build.stderr)
        if missing:
            _unavailable(f"header {missing.group(1)} not installed (libbpf-dev / linux-libc-dev / libpcap0.8-dev)")
        pytest.fail(f"the cdef does not compile against the real headers (a field the cdef declares "
                    f"is missing or renamed there):\n{build.stderr}")
    run = subprocess.run([str(tmp / "layout")], capture_output=True, text=True, check=True)
    out = {}
    for line in run.stdout.splitlines():
        key, size, offset = line.split()
        out[key] = (int(size), int(offset))
    return out


def test_cdef_declares_the_expected_structs():
    assert set(_cdef_structs()) >= {"bpf_tc_hook", "bpf_tc_opts", "bpf_test_run_opts", "btf_type", "btf_member",
                                    "btf_enum", "btf_enum64", "btf_array", "btf_var_secinfo", "bpf_prog_info"}


@pytest.mark.parametrize("struct", _cdef_structs())
def test_struct_layout_matches_headers(compiled_layout, struct):
    ffi = _cdef_ffi()
    ctype = ffi.typeof(f"struct {struct}")
    assert ffi.sizeof(ctype) == compiled_layout[struct][0], f"sizeof(struct {struct})"
    assert ctype.fields, f"struct {struct} has no fields in the cdef"
    for fname, field in ctype.fields:
        assert _field_layout(ffi, ctype, fname, field) == compiled_layout[f"{struct}.{fname}"], \
            f"struct {struct}.{fname}: cdef (size, offset) differs from the header (bits for a bit-field)"


def test_every_cdef_struct_field_was_compared(compiled_layout):
    _, keys = _c_program(_cdef_ffi())
    expected = {name if field is None else f"{name}.{field}" for name, field in keys}
    assert set(compiled_layout) == expected


def _loaded_libbpf_path() -> str:
    libbpf.lib()  # make sure the binding has dlopen()ed it
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libbpf.so" in line}
    assert len(paths) == 1, f"expected exactly one libbpf mapped, found {paths}"
    return paths.pop()


def _cdef_functions() -> set[str]:
    # A fresh FFI over the cdef alone (no libc declarations): dir() lists what it declares.
    names = set(dir(_cdef_ffi().dlopen(_loaded_libbpf_path())))
    assert {"bpf_object__open_file", "bpf_prog_test_run_opts", "btf__parse", "ring_buffer__new"} <= names
    return names


def test_every_declared_function_is_exported_by_the_loaded_libbpf():
    so = ctypes.CDLL(_loaded_libbpf_path())
    required = _cdef_functions() - set(OPTIONAL_SYMBOLS)
    missing = sorted(name for name in required if not hasattr(so, name))
    assert not missing, (f"{_loaded_libbpf_path()} (libbpf {libbpf.version()}) does not export {missing}: "
                         "move them to OPTIONAL_SYMBOLS and probe with has(), or drop them")


def test_optional_symbols_are_declared_and_probed_truthfully():
    so = ctypes.CDLL(_loaded_libbpf_path())
    assert set(OPTIONAL_SYMBOLS) <= _cdef_functions()
    for name in OPTIONAL_SYMBOLS:
        assert libbpf.has(name) == hasattr(so, name), name
    with pytest.raises(KeyError):
        libbpf.has("bpf_object__open_file")  # not optional: never probed


def test_libbpf_is_at_least_the_minimum_version():
    major, minor = (int(x) for x in libbpf.version().lstrip("v").split(".")[:2])
    assert (major, minor) >= libbpf.MIN_VERSION


def test_libpcap_cdef_matches_pcap_h(tmp_path_factory):
    """The libpcap binding (vnet/binding/pcap.py) against <pcap/pcap.h>, the same way."""
    from vnet.binding import pcap

    structs = re.findall(r"^\s*struct\s+(\w+)\s*\{", pcap.CDEF, re.M)
    assert set(structs) == {"bpf_insn", "bpf_program", "timeval", "pcap_pkthdr"}
    layout = _compile_layout(tmp_path_factory, pcap.ffi, structs, ("stddef.h", "stdio.h", "pcap/pcap.h"))
    for name in structs:
        ctype = pcap.ffi.typeof(f"struct {name}")
        assert pcap.ffi.sizeof(ctype) == layout[name][0], f"sizeof(struct {name})"
        for fname, field in ctype.fields:
            assert _field_layout(pcap.ffi, ctype, fname, field) == layout[f"{name}.{fname}"], f"struct {name}.{fname}"


# Structs the kernel fills in: checked against the running kernel's own BTF too
# (its UAPI may be newer than the installed headers; a longer kernel struct is fine).
KERNEL_STRUCTS = ("bpf_prog_info",)


@pytest.mark.parametrize("struct", KERNEL_STRUCTS)
def test_kernel_filled_struct_matches_the_running_kernels_btf(struct):
    from vnet.binding import Btf

    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        _unavailable("no kernel BTF (/sys/kernel/btf/vmlinux)")
    ffi = _cdef_ffi()
    ctype = ffi.typeof(f"struct {struct}")
    with Btf.vmlinux() as btf:
        size, members = btf.member_bits(struct)
    assert ffi.sizeof(ctype) <= size, f"sizeof(struct {struct}): cdef {ffi.sizeof(ctype)} > kernel {size}"
    for fname, field in ctype.fields:
        width, first = _field_layout(ffi, ctype, fname, field)
        if field.bitsize < 0:
            width, first = width * 8, first * 8
        assert fname in members, f"struct {struct}.{fname}: not in the kernel's BTF"
        assert (first, width) == members[fname], \
            f"struct {struct}.{fname}: cdef (first bit, bits) {(first, width)} != kernel BTF {members[fname]}"
    # Every kernel member that fits in the cdef's size is declared (nothing skipped by mistake).
    covered = {n for n, (first, width) in members.items() if first + width <= 8 * ffi.sizeof(ctype)}
    assert covered == {n for n, _ in ctype.fields}
