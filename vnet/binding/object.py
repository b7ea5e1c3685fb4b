"""Owned handles over libbpf objects: BpfObject -> Program, Map, Link.

Lifetimes: a BpfObject owns the links made from its programs and the ring
buffers made from its maps; close() releases them (links first) and then the
object, so closing detaches everything. Use it as a context manager.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from vnet import netns as _netns
from vnet.errors import RESOURCE_ERRNOS, AttachError, BpfError, VerifierError, bpf_error

from . import libbpf, splice
from .btf import Btf, StructLayout
from .libbpf import ffi, lib

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BTF_TARGET_SECTIONS = ("tp_btf", "fentry", "fexit", "fmod_ret")
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
# Fixed handle so a restarted vnet replaces its own stale clsact filter instead of stacking one more.
VNET_TC_HANDLE = 0x766E  # "vn"
VNET_TC_PRIORITY = 0x766E


class Link:
    """Something attached; detach() is idempotent."""

    def __init__(self, description: str):
        self.description = description
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}{'' if self.attached else ' (detached)'}>"


class LibbpfLink(Link):
    def __init__(self, ptr, description: str):
        super().__init__(description)
        self._ptr = ptr

    @property
    def fd(self) -> int:
        return lib().bpf_link__fd(self._ptr)

    def _release(self) -> None:
        lib().bpf_link__destroy(self._ptr)
        self._ptr = None


class FdLink(Link):
    """A kernel bpf_link held only by its fd (e.g. tcx): it vanishes with the process."""

    def __init__(self, fd: int, description: str):
        super().__init__(description)
        self.fd = fd

    def _release(self) -> None:
        os.close(self.fd)


class _Clsact:
    """Reference counts of clsact qdiscs vnet created, so the last user removes it."""

    lock = threading.Lock()
    owned: dict[tuple[int, int], int] = {}  # (netns inode, ifindex) -> users

    @classmethod
    def acquire(cls, ifindex: int) -> None:
        hook = ffi.new("struct bpf_tc_hook *", {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                                                 "attach_point": BPF_TC_INGRESS})
        key = (_netns.current_inode(), ifindex)
        with cls.lock:
            err = lib().bpf_tc_hook_create(hook)
            if err == 0:
                cls.owned[key] = 0
            elif err != -errno.EEXIST:
                raise bpf_error("create clsact qdisc on", err, f"ifindex {ifindex}", cls=AttachError)
            if key in cls.owned:
                cls.owned[key] += 1

    @classmethod
    def release(cls, ifindex: int) -> None:
        key = (_netns.current_inode(), ifindex)
        with cls.lock:
            if key not in cls.owned:
                return  # someone else's qdisc: never remove it
            cls.owned[key] -= 1
            if cls.owned[key] == 0:
                del cls.owned[key]
                hook = ffi.new("struct bpf_tc_hook *", {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                                                         "attach_point": BPF_TC_INGRESS | BPF_TC_EGRESS})
                lib().bpf_tc_hook_destroy(hook)


class TcFilterLink(Link):
    """A direct-action BPF filter on a clsact qdisc (kernels without tcx). It
    survives the process, hence the fixed handle that a restart replaces."""

    def __init__(self, ifindex: int, point: int, description: str, netns: str | None, prog_id: int):
        super().__init__(description)
        self.ifindex = ifindex
        self.point = point
        self.netns = netns
        self.prog_id = prog_id
        self.qdisc_ours = False  # vnet created the clsact qdisc it sits on

    def left_behind(self) -> dict:
        """What a later agent needs to remove it if this process is killed (remove_left_tc_filter)."""
        return {"ifindex": self.ifindex, "point": self.point, "prog_id": self.prog_id, "netns": self.netns,
                "qdisc": self.qdisc_ours}

    def _release(self) -> None:
        with _netns.enter(self.netns):
            self._detach_here()

    def _detach_here(self) -> None:
        _detach_filter(self.ifindex, self.point, self.prog_id)
        _Clsact.release(self.ifindex)


def _detach_filter(ifindex: int, point: int, prog_id: int) -> bool:
    """Remove vnet's filter at `point` of `ifindex` (this thread's netns) if it still runs
    program `prog_id`: the handle is shared by every vnet, a newer one's filter stays.
    Whether it was removed."""
    hook = ffi.new("struct bpf_tc_hook *", {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                                             "attach_point": point})
    opts = ffi.new("struct bpf_tc_opts *", {"sz": ffi.sizeof("struct bpf_tc_opts"), "handle": VNET_TC_HANDLE,
                                             "priority": VNET_TC_PRIORITY})
    if lib().bpf_tc_query(hook, opts) != 0 or opts.prog_id != prog_id:
        return False
    opts.prog_id = opts.flags = opts.prog_fd = 0
    return lib().bpf_tc_detach(hook, opts) == 0


def remove_left_tc_filter(ifindex: int, point: int, prog_id: int, netns: str | None, qdisc: bool) -> bool:
    """A clsact filter a killed vnet left running (a filter is no link: it outlives its
    process): removed if it still runs that program (prog_id; a newer vnet's is left),
    and the clsact qdisc too when that vnet had created it and no filter is left on it.
    Whether the filter was there."""
    with _netns.enter(netns):
        removed = _detach_filter(ifindex, point, prog_id)
        if qdisc and not _tc_filters_on(ifindex):
            lib().bpf_tc_hook_destroy(ffi.new("struct bpf_tc_hook *", {
                "sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                "attach_point": BPF_TC_INGRESS | BPF_TC_EGRESS}))
    return removed


def _tc_filters_on(ifindex: int) -> bool:
    """Any filter on the clsact qdisc of `ifindex` (this thread's netns), anyone's."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for parent in (0xFFFFFFF2, 0xFFFFFFF3):  # clsact ingress, egress
            try:
                if any(f.get_attr("TCA_KIND") for f in ipr.get_filters(index=ifindex, parent=parent)):
                    return True
            except Exception:  # noqa: BLE001 - the device or qdisc went meanwhile: nothing to keep
                pass
    return False


@dataclass
class TestRunResult:
    retval: int
    duration_ns: int
    data_out: bytes


def prog_test_run(fd: int, data: bytes | None, repeat: int = 1, ctx: bytes | None = None,
             data_out_size: int | None = None, what: str = "program") -> TestRunResult:
    """BPF_PROG_TEST_RUN of the program `fd`. data=None: a context-only run, as
    raw_tp programs take it (the kernel runs them once, reports no duration and
    refuses a repeat count: give repeat=1)."""
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    if data is not None:
        out_size = data_out_size if data_out_size is not None else len(data) + 256
        data_in = ffi.from_buffer(data)
        out = ffi.new("char[]", max(out_size, 1))
        opts.data_in = data_in
        opts.data_size_in = len(data)
        opts.data_out = out
        opts.data_size_out = out_size
        opts.repeat = repeat
    elif repeat != 1:
        raise BpfError("test-run", errno.EINVAL, f"{what}: a context-only run takes no repeat count")
    if ctx is not None:
        ctx_in = ffi.from_buffer(ctx)
        opts.ctx_in = ctx_in
        opts.ctx_size_in = len(ctx)
    err = lib().bpf_prog_test_run_opts(fd, opts)
    if err:
        raise bpf_error("test-run", err, what)
    data_out = ffi.buffer(out, opts.data_size_out)[:] if data is not None else b""
    return TestRunResult(opts.retval, opts.duration, data_out)


@dataclass(frozen=True)
class ProgramInfo:
    """What the kernel says about a loaded program (struct bpf_prog_info)."""

    id: int
    name: str              # the kernel's (at most 15 characters)
    type: int              # enum bpf_prog_type
    verified_insns: int    # instructions the verifier processed (Linux >= 5.16; 0 before)
    xlated_insns: int      # the program after the verifier's rewrites, in instructions
    jited_bytes: int       # native code size (0 without the JIT)
    run_time_ns: int       # total run time while run-time statistics were on (run_time_stats())
    run_cnt: int           # runs counted meanwhile
    recursion_misses: int  # runs skipped because the program was already running on that CPU


def possible_cpus() -> int:
    """How many values a per-CPU map holds for a key. libbpf reads it from
    /sys/devices/system/cpu/possible on the first call and keeps it; a first call
    that fails (no descriptor left to open the file) returns -errno, which is an
    error here rather than a negative buffer size. Trace.start asks while
    descriptors are still free."""
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise bpf_error("count", n or -errno.EINVAL, "the possible CPUs (/sys/devices/system/cpu/possible)")
    return n


def program_info(fd: int) -> ProgramInfo:
    """bpf_prog_info of the program `fd` (bpf_obj_get_info_by_fd)."""
    info = ffi.new("struct bpf_prog_info *")
    size = ffi.new("uint32_t *", ffi.sizeof("struct bpf_prog_info"))
    err = lib().bpf_obj_get_info_by_fd(fd, info, size)
    if err:
        raise bpf_error("get info of", err, f"program fd {fd}")
    return ProgramInfo(info.id, ffi.string(info.name).decode(errors="replace"), info.type, info.verified_insns,
                       info.xlated_prog_len // 8, info.jited_prog_len, info.run_time_ns, info.run_cnt,
                       info.recursion_misses)


BPF_STATS_RUN_TIME = 0


class run_time_stats:
    """While open, the kernel counts every program's runs and run time
    (BPF_ENABLE_STATS, as sysctl kernel.bpf_stats_enabled=1 does, but held by
    an fd: closed with it, even when the process dies; other holders keep it on).
    Costs the programs two clock reads per run."""

    def __init__(self):
        fd = lib().bpf_enable_stats(BPF_STATS_RUN_TIME)
        if fd < 0:
            raise bpf_error("enable", fd, "BPF run-time statistics")
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "run_time_stats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Program:
    def __init__(self, obj: "BpfObject", ptr):
        self._obj = obj
        self._ptr = ptr
        self.name = ffi.string(lib().bpf_program__name(ptr)).decode()
        self.section = ffi.string(lib().bpf_program__section_name(ptr)).decode()
        self.target: str | None = None  # set_attach_target's, if called

    def __repr__(self) -> str:
        return f"<Program {self.name} SEC({self.section})>"

    @property
    def fd(self) -> int:
        fd = lib().bpf_program__fd(self._ptr)
        if fd < 0:
            raise BpfError("get fd of", fd, f"program {self.name} (not loaded?)")
        return fd

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        err = lib().bpf_program__set_autoload(self._ptr, bool(value))
        if err:
            raise bpf_error("set autoload of", err, f"program {self.name}")

    def set_attach_target(self, name: str) -> None:
        """Before load: the kernel function (fentry) or tracepoint (tp_btf) to
        verify against; libbpf also searches loaded modules' BTF."""
        err = lib().bpf_program__set_attach_target(self._ptr, 0, name.encode())
        if err:
            raise bpf_error("set attach target of", err, f"program {self.name} to {name}")
        self.target = name

    # -- attach ---------------------------------------------------------------
    def _libbpf_link(self, ptr, op: str, what: str) -> LibbpfLink:
        if ptr == ffi.NULL:
            raise bpf_error(op, ffi.errno, f"{self.name} to {what}", cls=AttachError)
        return self._obj._own(LibbpfLink(ptr, f"{self.name} -> {what}"))

    def attach(self) -> LibbpfLink:
        """Attach where the section names (tp_btf/, fentry/, raw_tp/, tracepoint/, kprobe/).
        Done here, not by libbpf: vnet's section handlers (splice.py) replace libbpf's."""
        kind, _, where = self.section.partition("/")
        if kind in BTF_TARGET_SECTIONS:
            return self.attach_trace()
        if kind == "raw_tp" and where:
            return self.attach_raw_tracepoint(where)
        if kind == "tracepoint" and "/" in where:
            return self.attach_tracepoint(*where.split("/", 1))
        if kind == "kprobe" and where:
            return self.attach_kprobe(where)
        return self._libbpf_link(lib().bpf_program__attach(self._ptr), "attach", self.section)

    def attach_tracepoint(self, category: str, name: str) -> LibbpfLink:
        ptr = lib().bpf_program__attach_tracepoint(self._ptr, category.encode(), name.encode())
        return self._libbpf_link(ptr, "attach tracepoint", f"{category}:{name}")

    def attach_raw_tracepoint(self, name: str) -> LibbpfLink:
        return self._libbpf_link(lib().bpf_program__attach_raw_tracepoint(self._ptr, name.encode()),
                                 "attach raw tracepoint", name)

    def attach_kprobe(self, func: str, retprobe: bool = False) -> LibbpfLink:
        ptr = lib().bpf_program__attach_kprobe(self._ptr, retprobe, func.encode())
        return self._libbpf_link(ptr, "attach kretprobe" if retprobe else "attach kprobe", func)

    def attach_trace(self) -> LibbpfLink:
        """fentry/fexit/fmod_ret/tp_btf to the target named in the section."""
        return self._libbpf_link(lib().bpf_program__attach_trace(self._ptr), "attach trace", self.section)

    def attach_tcx(self, ifindex: int, ingress: bool) -> FdLink:
        """A tcx link (kernel >= 6.6) made with the low-level bpf_link_create, which
        libbpf 1.1 already has; the link dies with the process."""
        where = f"ifindex {ifindex} tcx/{'ingress' if ingress else 'egress'}"
        fd = lib().bpf_link_create(self.fd, ifindex, BPF_TCX_INGRESS if ingress else BPF_TCX_EGRESS, ffi.NULL)
        if fd < 0:
            raise bpf_error("attach tcx link", fd, f"{self.name} to {where}", cls=AttachError)
        return self._obj._own(FdLink(fd, f"{self.name} -> {where}"))

    def attach_tc_filter(self, ifindex: int, ingress: bool, netns: str | None = None) -> TcFilterLink:
        """A clsact direct-action filter with vnet's fixed handle (replaces a stale one).
        Call it inside `netns`; detaching enters that namespace again."""
        point = BPF_TC_INGRESS if ingress else BPF_TC_EGRESS
        where = f"ifindex {ifindex} clsact/{'ingress' if ingress else 'egress'}"
        _Clsact.acquire(ifindex)
        hook = ffi.new("struct bpf_tc_hook *", {"sz": ffi.sizeof("struct bpf_tc_hook"), "ifindex": ifindex,
                                                 "attach_point": point})
        opts = ffi.new("struct bpf_tc_opts *", {"sz": ffi.sizeof("struct bpf_tc_opts"), "prog_fd": self.fd,
                                                 "flags": BPF_TC_F_REPLACE, "handle": VNET_TC_HANDLE,
                                                 "priority": VNET_TC_PRIORITY})
        err = lib().bpf_tc_attach(hook, opts)
        if err:
            _Clsact.release(ifindex)
            raise bpf_error("attach tc filter", err, f"{self.name} to {where}", cls=AttachError)
        link = TcFilterLink(ifindex, point, f"{self.name} -> {where}", netns, opts.prog_id)
        link.qdisc_ours = (_netns.current_inode(), ifindex) in _Clsact.owned
        return self._obj._own(link)

    # -- run ------------------------------------------------------------------
    def test_run(self, data: bytes | None, repeat: int = 1, ctx: bytes | None = None,
                 data_out_size: int | None = None) -> TestRunResult:
        """BPF_PROG_TEST_RUN: run the loaded program on `data` in the kernel
        (data=None: on `ctx` alone, see prog_test_run())."""
        return prog_test_run(self.fd, data, repeat, ctx, data_out_size, what=f"program {self.name}")

    def info(self) -> ProgramInfo:
        """The kernel's facts about the loaded program: verifier work, size, run-time statistics."""
        return program_info(self.fd)


class Map:
    def __init__(self, obj: "BpfObject", ptr):
        self._obj = obj
        self._ptr = ptr
        self.name = ffi.string(lib().bpf_map__name(ptr)).decode()

    def __repr__(self) -> str:
        return f"<Map {self.name}>"

    @property
    def fd(self) -> int:
        fd = lib().bpf_map__fd(self._ptr)
        if fd < 0:
            raise BpfError("get fd of", fd, f"map {self.name} (not loaded?)")
        return fd

    @property
    def type(self) -> int:
        return lib().bpf_map__type(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        err = lib().bpf_map__set_max_entries(self._ptr, n)
        if err:
            raise bpf_error("resize", err, f"map {self.name}")

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self._ptr)

    @property
    def per_cpu(self) -> bool:
        return self.type in _PERCPU_TYPES

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        """The value for key; for per-CPU maps, one value per possible CPU."""
        vsize = self.value_size
        ncpu = 1
        if self.per_cpu:
            vsize = (vsize + 7) & ~7
            ncpu = possible_cpus()
        buf = ffi.new("char[]", vsize * ncpu)
        err = lib().bpf_map_lookup_elem(self.fd, ffi.from_buffer(key), buf)
        if err == -errno.ENOENT:
            return None
        if err:
            raise bpf_error("look up in", err, f"map {self.name}")
        raw = ffi.buffer(buf)[:]
        if not self.per_cpu:
            return raw
        return [raw[i * vsize:i * vsize + self.value_size] for i in range(ncpu)]

    def keys(self) -> list[bytes]:
        """Every key, by bpf_map_get_next_key (a snapshot: entries may come and go meanwhile)."""
        out, cur = [], ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        for _ in range(self.max_entries + 1):  # bounded even if the map churns
            if lib().bpf_map_get_next_key(self.fd, cur, nxt) != 0:
                break
            out.append(ffi.buffer(nxt)[:])
            cur = ffi.new("char[]", out[-1])
        return out

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        err = lib().bpf_map_update_elem(self.fd, ffi.from_buffer(key), ffi.from_buffer(value), flags)
        if err:
            raise bpf_error("update", err, f"map {self.name}")

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None:
        """Several entries in one call (BPF_MAP_UPDATE_BATCH): a map of maps waits for an RCU grace
        period (~8 ms here) after each update, after a batch once at most."""
        n = ffi.new("uint32_t *", len(keys))
        err = lib().bpf_map_update_batch(self.fd, ffi.from_buffer(b"".join(keys)), ffi.from_buffer(b"".join(values)),
                                         n, ffi.NULL)
        if err:
            raise bpf_error("update", err, f"map {self.name} ({n[0]} of {len(keys)} entries updated)")

    def pin(self, path: str | os.PathLike) -> None:
        """Keep the map on bpffs at `path` beyond this process (read with PinnedMap, gone with unlink)."""
        _pin(self.fd, path, self.name)

    def share(self, other: "Map") -> None:
        """Before load: use `other`'s kernel map instead of creating one (one ring
        and one set of counters for many object instances)."""
        err = lib().bpf_map__reuse_fd(self._ptr, other.fd)
        if err:
            raise bpf_error("share", err, f"map {self.name} with {other.name}")

    def initial_value(self):
        """The writable pre-load image of a global data map (.rodata/.data/.bss)."""
        size = ffi.new("size_t *")
        ptr = lib().bpf_map__initial_value(self._ptr, size)
        if ptr == ffi.NULL:
            raise BpfError("get initial value of", errno.EINVAL, f"map {self.name}")
        return ffi.buffer(ffi.cast("char *", ptr), size[0])


def _pin(fd: int, path: str | os.PathLike, name: str) -> None:
    err = lib().bpf_obj_pin(fd, os.fsencode(path))
    if err:
        raise bpf_error("pin", err, f"map {name} at {path}")


class CreatedMap:
    """A map made outside any object (bpf_map_create), owned by one (BpfObject.create_map):
    its descriptor closes with that object, as the object's own maps do."""

    def __init__(self, obj: "BpfObject", map_type: int, name: str, max_entries: int,
                 key_size: int = 0, value_size: int = 0):
        fd = lib().bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, ffi.NULL)
        if fd < 0:
            raise bpf_error("create", fd, f"map {name} ({max_entries} entries)")
        self._obj = obj
        self._fd = fd
        self.name = name
        self.type = map_type
        self.max_entries = max_entries

    def __repr__(self) -> str:
        return f"<CreatedMap {self.name}>"

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise BpfError("get fd of", errno.EBADF, f"map {self.name} (closed with its object)")
        return self._fd

    def pin(self, path: str | os.PathLike) -> None:
        """As Map.pin."""
        _pin(self.fd, path, self.name)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PinnedMap:
    """A map pinned on bpffs, by path: its process may be gone (no libbpf object behind it).
    The layout comes from the caller (the pinning process recorded it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        fd = lib().bpf_obj_get(os.fsencode(path))
        if fd < 0:
            raise bpf_error("open pinned map", fd, self.path)
        self.fd = fd
        self.name = os.path.basename(self.path)
        self._facts: dict[str, int] | None = None

    def _fact(self, name: str) -> int:
        """One of the kernel's facts about the map, from its fd's fdinfo (map_type, max_entries,
        ...): text the kernel writes, so no struct layout is copied here."""
        if self._facts is None:
            facts = {}
            with open(f"/proc/self/fdinfo/{self.fd}") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if v.strip().isdigit():
                        facts[k.strip()] = int(v)
            self._facts = facts
        try:
            return self._facts[name]
        except KeyError:
            raise BpfError("read fdinfo of", errno.EINVAL, f"pinned map {self.path} (no {name})") from None

    @property
    def type(self) -> int:
        return self._fact("map_type")

    @property
    def max_entries(self) -> int:
        return self._fact("max_entries")

    def lookup_per_cpu(self, key: bytes, value_size: int) -> list[bytes] | None:
        """A per-CPU map's values for key, one per possible CPU (None: no such key)."""
        stride = (value_size + 7) & ~7
        ncpu = possible_cpus()
        buf = ffi.new("char[]", stride * ncpu)
        err = lib().bpf_map_lookup_elem(self.fd, ffi.from_buffer(key), buf)
        if err == -errno.ENOENT:
            return None
        if err:
            raise bpf_error("look up in", err, f"pinned map {self.path}")
        raw = ffi.buffer(buf)[:]
        return [raw[i * stride:i * stride + value_size] for i in range(ncpu)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PinnedMap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BpfObject:
    """An opened (then loaded) .bpf.o. Configure between open and load:
    set_config(), keep_programs(), map resizes; then load()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        splice.ensure_registered()  # libbpf binds each program to a section handler at open
        ptr = lib().bpf_object__open_file(str(self.path).encode(), ffi.NULL)
        if ptr == ffi.NULL:
            raise bpf_error("open BPF object", ffi.errno, str(self.path))
        self._ptr = ptr
        self.loaded = False
        self._owned: list = []
        self._bodies: dict[str, bytes] = {}
        self.name = ffi.string(lib().bpf_object__name(ptr)).decode()
        self.programs: dict[str, Program] = {}
        p = lib().bpf_object__next_program(ptr, ffi.NULL)
        while p != ffi.NULL:
            prog = Program(self, p)
            self.programs[prog.name] = prog
            p = lib().bpf_object__next_program(ptr, p)
        self.maps: dict[str, Map] = {}
        m = lib().bpf_object__next_map(ptr, ffi.NULL)
        while m != ffi.NULL:
            mp = Map(self, m)
            self.maps[mp.name] = mp
            m = lib().bpf_object__next_map(ptr, m)
        self.btf = Btf(lib().bpf_object__btf(ptr), owned=False, label=self.path.name)
        self._finalizer = weakref.finalize(self, BpfObject._release, ptr, self._owned)

    def __repr__(self) -> str:
        return f"<BpfObject {self.name} {'loaded' if self.loaded else 'opened'}>"

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _own(self, thing):
        self._owned.append(thing)
        return thing

    def _data_map(self, section: str) -> Map:
        for name, m in self.maps.items():
            if name.endswith(section):
                return m
        raise KeyError(f"{self.path.name} has no {section} section")

    def create_map(self, map_type: int, name: str, max_entries: int, key_size: int = 0,
                   value_size: int = 0) -> CreatedMap:
        """A map of no section of this object that lives as long as it does (e.g. more
        rings for a map-in-map slot, which the programs find there at run time)."""
        return self._own(CreatedMap(self, map_type, name, max_entries, key_size, value_size))

    def config_layout(self, var: str, section: str = ".rodata") -> StructLayout:
        return self.btf.variable(section, var)[1]

    def set_config(self, var: str, values: dict, section: str = ".rodata") -> None:
        """Write a `const volatile` config struct before load (offsets from BTF)."""
        if self.loaded:
            raise BpfError("set config", errno.EBUSY, f"{var} of {self.name} (already loaded)")
        offset, layout = self.btf.variable(section, var)
        image = self._data_map(section).initial_value()
        data = layout.encode(values)
        image[offset:offset + len(data)] = data

    def config_fields(self, var: str, section: str = ".rodata") -> list[str]:
        """The field names of a config struct, as this object's BTF has them."""
        return self.btf.variable(section, var)[1].names

    def config(self, var: str, section: str = ".rodata") -> dict:
        offset, layout = self.btf.variable(section, var)
        return layout.decode(self._data_map(section).initial_value(), offset)

    def keep_programs(self, names) -> None:
        """Load only these programs (fallback twins: the loader keeps one)."""
        names = set(names)
        unknown = names - set(self.programs)
        if unknown:
            raise KeyError(f"{self.path.name} has no program(s) {sorted(unknown)}")
        for name, prog in self.programs.items():
            prog.autoload = name in names

    def replace_functions(self, bodies: dict[str, bytes]) -> None:
        """Before load: in every program that calls them, give these no-inline
        functions new bodies (encoded eBPF instructions; see splice.py)."""
        self._bodies.update(bodies)

    def load(self) -> None:
        marker = libbpf.mark_log()
        progs = [p for p in self.programs.values() if p.autoload]
        for prog in progs:
            kind, _, target = prog.section.partition("/")
            if kind in BTF_TARGET_SECTIONS and target and prog.target is None:
                prog.set_attach_target(target)  # what libbpf's own handler would resolve at load
            if self._bodies:
                splice.request(prog._ptr, self.btf, self._bodies)
        err = lib().bpf_object__load(self._ptr)
        failures = [e for e in (splice.forget(p._ptr) for p in progs) if e is not None]
        if failures:
            raise failures[0]
        if err:
            lines = libbpf.messages_since(marker)
            # Debug lines name every program (CO-RE relos): only a failure line names the culprit.
            failing = [p.name for p in self.programs.values()
                       if any(f"prog '{p.name}': " in ln and "fail" in ln for ln in lines)]
            target = f"{self.path.name}" + (f" program {failing[0]}" if failing else "")
            if any("BEGIN PROG LOAD LOG" in ln for ln in lines) and abs(err) not in RESOURCE_ERRNOS:
                # (out of descriptors: the verifier may have accepted it; its log is no cause)
                start = max(i for i, ln in enumerate(lines) if "BEGIN PROG LOAD LOG" in ln)
                name = lines[start].split("prog '", 1)[-1].split("'", 1)[0]
                if name in self.programs:
                    target = f"{self.path.name} program {name}"
                # The verifier's output only: libbpf's own lines follow END.
                end = next((i for i in range(start + 1, len(lines)) if "END PROG LOAD LOG" in lines[i]), len(lines))
                body = lines[start + 1:end]
                if end < len(lines) and not lines[end].startswith("-- END PROG LOAD LOG"):
                    body.append(lines[end].split("-- END PROG LOAD LOG", 1)[0])  # log without final newline
                raise VerifierError("load", err, target, "\n".join(body))
            # The cause, not libbpf's closing "failed to load object" line that always follows it.
            causes = [ln for ln in lines if "failed to load object" not in ln] or lines
            detail = causes[-1].removeprefix("libbpf: ") if causes else ""
            raise bpf_error("load", err, target, detail=detail)
        self.loaded = True

    @staticmethod
    def _release(ptr, owned: list) -> None:
        for thing in reversed(owned):
            if isinstance(thing, Link):
                thing.detach()
            else:
                thing.close()
        owned.clear()
        lib().bpf_object__close(ptr)

    def close(self) -> None:
        """Detach every link, free ring buffers, close the object. Idempotent."""
        self._finalizer()
        self.loaded = False
