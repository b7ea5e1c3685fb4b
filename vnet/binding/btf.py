"""Read type layouts from BTF (an object's, or the running kernel's) through libbpf.

This is how the Python side learns the event record, config structs and enums:
from the compiled objects themselves, never from offsets copied by hand.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from dataclasses import dataclass, field

from vnet.errors import BpfError, UnsupportedError, bpf_error

from .libbpf import ffi, lib

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_INT_SIGNED = 1
_UNSIGNED_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED_FMT = {1: "b", 2: "h", 4: "i", 8: "q"}


@dataclass(frozen=True)
class Field:
    name: str
    offset: int          # bytes from the start of the struct
    size: int            # bytes
    fmt: str             # struct-module code of one element ("" when not a plain scalar/array)
    count: int = 1       # array length (1 for scalars)
    is_bytes: bool = False


@dataclass
class StructLayout:
    """A C struct as BTF describes it, with a decoder/encoder built from it."""

    name: str
    size: int
    fields: list[Field]
    _codec: struct.Struct | None = field(default=None, repr=False)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"struct {self.name} has no field {name!r}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def codec(self) -> struct.Struct:
        """One struct.Struct for the whole record; padding becomes 'x'."""
        if self._codec is None:
            fmt, pos = "=", 0
            for f in self.fields:
                if not f.fmt:
                    raise UnsupportedError(f"field {self.name}.{f.name} cannot be decoded (not an int or int array)")
                if f.offset > pos:
                    fmt += f"{f.offset - pos}x"
                fmt += f"{f.size}s" if f.is_bytes else (f"{f.count}{f.fmt}" if f.count > 1 else f.fmt)
                pos = f.offset + f.size
            if self.size > pos:
                fmt += f"{self.size - pos}x"
            self._codec = struct.Struct(fmt)
        return self._codec

    def decode(self, buf, offset: int = 0) -> dict:
        values = iter(self.codec().unpack_from(buf, offset))
        out = {}
        for f in self.fields:
            out[f.name] = tuple(next(values) for _ in range(f.count)) if f.count > 1 and not f.is_bytes else next(values)
        return out

    def encode(self, values: dict) -> bytes:
        unknown = set(values) - set(self.names)
        if unknown:
            raise KeyError(f"struct {self.name} has no field(s) {sorted(unknown)}")
        flat = []
        for f in self.fields:
            v = values.get(f.name)
            if f.is_bytes:
                flat.append(bytes(v or b""))
            elif f.count > 1:
                flat.extend(v if v is not None else [0] * f.count)
            else:
                flat.append(int(v or 0))
        return self.codec().pack(*flat)


class Btf:
    """A BTF blob; owns it (frees on close) unless it belongs to a bpf_object."""

    def __init__(self, ptr, *, owned: bool, label: str):
        self._ptr = ptr
        self._owned = owned
        self.label = label

    @classmethod
    def from_file(cls, path: str) -> "Btf":
        ptr = lib().btf__parse(str(path).encode(), ffi.NULL)
        if ptr == ffi.NULL:
            raise bpf_error("parse BTF of", ffi.errno, str(path))
        return cls(ptr, owned=True, label=str(path))

    @classmethod
    def module(cls, name: str, base: "Btf") -> "Btf":
        """A loaded kernel module's BTF (/sys/kernel/btf/NAME), split on vmlinux's."""
        ptr = lib().btf__load_module_btf(name.encode(), base._ptr)
        if ptr == ffi.NULL:
            raise bpf_error("load BTF of module", ffi.errno, name)
        return cls(ptr, owned=True, label=name)

    @classmethod
    def vmlinux(cls) -> "Btf":
        ptr = lib().btf__load_vmlinux_btf()
        if ptr == ffi.NULL:
            raise UnsupportedError("kernel BTF not supported (requires CONFIG_DEBUG_INFO_BTF, /sys/kernel/btf/vmlinux)")
        return cls(ptr, owned=True, label="vmlinux")

    def close(self) -> None:
        if self._owned and self._ptr is not None:
            lib().btf__free(self._ptr)
        self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw access ---------------------------------------------------------
    def _type(self, type_id: int):
        t = lib().btf__type_by_id(self._ptr, type_id)
        if t == ffi.NULL:
            raise BpfError("look up BTF type", 2, f"#{type_id} in {self.label}")
        return t

    def _name(self, off: int) -> str:
        return ffi.string(lib().btf__name_by_offset(self._ptr, off)).decode()

    @staticmethod
    def _kind(t) -> int:
        return (t.info >> 24) & 0x1F

    @staticmethod
    def _vlen(t) -> int:
        return t.info & 0xFFFF

    def name_of(self, type_id: int) -> str:
        """The name of a type (e.g. the function a func_info record names)."""
        return self._name(self._type(type_id).name_off)

    def find(self, name: str, kind: int) -> int:
        tid = lib().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        if tid < 0:
            raise KeyError(f"no BTF type {name!r} (kind {kind}) in {self.label}")
        return tid

    def has(self, name: str, kind: int) -> bool:
        return lib().btf__find_by_name_kind(self._ptr, name.encode(), kind) >= 0

    def _strip(self, type_id: int) -> int:
        while self._kind(self._type(type_id)) in _MODIFIERS:
            type_id = self._type(type_id).size_or_type
        return type_id

    # -- layouts ------------------------------------------------------------
    def struct(self, name: str) -> StructLayout:
        return self.layout(self.find(name, STRUCT))

    def layout(self, type_id: int) -> StructLayout:
        type_id = self._strip(type_id)
        t = self._type(type_id)
        if self._kind(t) not in (STRUCT, UNION):
            raise KeyError(f"BTF type #{type_id} in {self.label} is not a struct")
        members = ffi.cast("struct btf_member *", t + 1)
        kflag = t.info >> 31
        fields = []
        for i in range(self._vlen(t)):
            m = members[i]
            bit_off = m.offset & 0xFFFFFF if kflag else m.offset
            if kflag and (m.offset >> 24):
                raise UnsupportedError(f"bitfield {self._name(m.name_off)} in {self._name(t.name_off)}")
            name, offset = self._name(m.name_off), bit_off // 8
            member = self._strip(m.type)
            if self._kind(self._type(member)) == STRUCT:
                # A nested header struct: its members become fields of this one.
                fields.extend(Field(f.name, offset + f.offset, f.size, f.fmt, f.count, f.is_bytes)
                              for f in self.layout(member).fields)
            else:
                fields.append(self._field(name, offset, m.type))
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise UnsupportedError(f"struct {self._name(t.name_off)} repeats a field name once flattened")
        return StructLayout(self._name(t.name_off), t.size_or_type, fields)

    def member_bits(self, name: str) -> tuple[int, dict[str, tuple[int, int]]]:
        """Size in bytes of `struct name` and, per named member, (first bit,
        width in bits): bit-fields included, nothing flattened (for checking
        declarations such as the cdef's against the kernel's own BTF)."""
        t = self._type(self._strip(self.find(name, STRUCT)))
        members = ffi.cast("struct btf_member *", t + 1)
        kflag = t.info >> 31
        out = {}
        for i in range(self._vlen(t)):
            m = members[i]
            if not m.name_off:
                continue  # anonymous padding
            bit_off, width = (m.offset & 0xFFFFFF, m.offset >> 24) if kflag else (m.offset, 0)
            member = self._type(self._strip(m.type))
            if not kflag and self._kind(member) == INT:  # older encoding: the width is the int's
                enc = ffi.cast("uint32_t *", member + 1)[0]
                bit_off, width = bit_off + (enc >> 16 & 0xFF), enc & 0xFF
            out[self._name(m.name_off)] = (bit_off, width or 8 * lib().btf__resolve_size(self._ptr, m.type))
        return t.size_or_type, out

    def _field(self, name: str, offset: int, type_id: int) -> Field:
        type_id = self._strip(type_id)
        t = self._type(type_id)
        kind = self._kind(t)
        size = lib().btf__resolve_size(self._ptr, type_id)
        if kind == INT:
            enc = ffi.cast("uint32_t *", t + 1)[0] >> 24
            table = _SIGNED_FMT if enc & _INT_SIGNED else _UNSIGNED_FMT
            return Field(name, offset, size, table.get(size, ""))
        if kind in (ENUM, ENUM64):
            return Field(name, offset, size, _UNSIGNED_FMT.get(size, ""))
        if kind == ARRAY:
            arr = ffi.cast("struct btf_array *", t + 1)
            elem = self._field(name, offset, arr.type)
            if elem.size == 1 and elem.count == 1:
                return Field(name, offset, size, "s", count=arr.nelems, is_bytes=True)
            if elem.count == 1 and elem.fmt:
                return Field(name, offset, size, elem.fmt, count=arr.nelems)
        return Field(name, offset, size, "")

    def enum(self, name: str) -> dict[str, int]:
        """Enumerator names to values, e.g. a kernel's `enum skb_drop_reason`."""
        tid = lib().btf__find_by_name_kind(self._ptr, name.encode(), ENUM)
        if tid < 0:
            tid = self.find(name, ENUM64)
        t = self._type(tid)
        out = {}
        if self._kind(t) == ENUM:
            vals = ffi.cast("struct btf_enum *", t + 1)
            signed = t.info >> 31
            for i in range(self._vlen(t)):
                v = vals[i].val
                out[self._name(vals[i].name_off)] = v if signed else v & 0xFFFFFFFF
        else:
            vals = ffi.cast("struct btf_enum64 *", t + 1)
            for i in range(self._vlen(t)):
                out[self._name(vals[i].name_off)] = vals[i].val_hi32 << 32 | vals[i].val_lo32
        return out

    def variable(self, section: str, var: str) -> tuple[int, StructLayout]:
        """Offset of global `var` inside data section `section` (e.g. .rodata) and its layout."""
        sec = self._type(self.find(section, DATASEC))
        infos = ffi.cast("struct btf_var_secinfo *", sec + 1)
        for i in range(self._vlen(sec)):
            v = self._type(infos[i].type)
            if self._name(v.name_off) == var:
                return infos[i].offset, self.layout(v.size_or_type)
        raise KeyError(f"no variable {var!r} in section {section} of {self.label}")


_shared: Btf | None = None
_shared_lock = threading.RLock()  # held while a lookup uses the shared parse: no release under it


def shared_vmlinux() -> Btf:
    """The running kernel's BTF, parsed once (~6 MiB, ~12 ms here) for every part of this
    process that looks something up in it (the probe resolver, features' probes); its
    users never close it: release_shared_vmlinux() does, and the next call parses again."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Btf.vmlinux()
        return _shared


@contextlib.contextmanager
def vmlinux_for_a_lookup():
    """shared_vmlinux()'s BTF where this process has it parsed already, else a parse of
    its own freed after the block: a one-off lookup (a feature probe) does not keep the
    ~6 MiB resident in a process that never needed them (an idle agent)."""
    with _shared_lock:
        if _shared is not None:
            yield _shared
            return
    with Btf.vmlinux() as own:
        yield own


def release_shared_vmlinux() -> None:
    """Free shared_vmlinux()'s BTF (after the module BTF split on it)."""
    global _shared
    with _shared_lock:
        btf, _shared = _shared, None
    if btf is not None:
        btf.close()
