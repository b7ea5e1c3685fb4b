"""Replace the body of a no-inline BPF function in a program right before the
kernel sees it, after libbpf has relocated everything (CO-RE, maps, the
subprograms appended to the main program).

libbpf calls a section handler's prepare-load callback at exactly that point;
vnet registers one handler per section kind its objects use (same program and
attach types as libbpf's own), and the callback applies whatever was asked for
that program with `replace_function`. Everything the splice moves is fixed:
BPF-to-BPF call offsets, function-address loads, func_info and line_info.
"""

from __future__ import annotations

import errno
import logging
import re
import struct
import threading

from vnet.errors import BpfError

from .libbpf import ffi, lib

log = logging.getLogger("vnet.splice")

# Every section kind vnet's objects use; the bare names are retargeted at run time.
SECTIONS = ("tc", "tp_btf", "raw_tp", "tracepoint", "fentry", "kprobe")
_EXAMPLES = {"tc": "tc", "tp_btf": "tp_btf/x", "raw_tp": "raw_tp/x", "tracepoint": "tracepoint/x/y",
             "fentry": "fentry/x", "kprobe": "kprobe/x"}
INSN_SIZE = 8
CALL = 0x85       # BPF_JMP | BPF_CALL
LD_IMM64 = 0x18   # BPF_LD | BPF_IMM | BPF_DW (two slots)
PSEUDO_CALL = 1
PSEUDO_FUNC = 4

_lock = threading.Lock()
_registered = False
_pending: dict[int, tuple[object, dict[str, bytes]]] = {}  # program pointer -> (btf, name -> body)
_errors: dict[int, BaseException] = {}
_keepalive: dict[int, list] = {}  # arrays libbpf reads during the load


def _key(prog) -> int:
    return int(ffi.cast("uintptr_t", prog))


@ffi.callback("int(struct bpf_program *, struct bpf_prog_load_opts *, long)", error=-errno.EFAULT)
def _prepare(prog, opts, cookie):
    key = _key(prog)
    todo = _pending.pop(key, None)
    if todo is None:
        return 0
    btf, bodies = todo
    try:
        _splice(prog, opts, btf, bodies)
    except BaseException as exc:  # never unwind through libbpf: hand it to the caller of load()
        _errors[key] = exc
        return -errno.EINVAL
    return 0


def ensure_registered() -> None:
    """Register vnet's handlers once per process, before any object is opened
    (libbpf picks a program's handler when it opens the object)."""
    global _registered
    with _lock:
        if _registered:
            return
        bpf = lib()
        opts = ffi.new("struct libbpf_prog_handler_opts *", {"sz": ffi.sizeof("struct libbpf_prog_handler_opts"),
                                                              "prog_prepare_load_fn": _prepare})
        for sec in SECTIONS:
            ptype, atype = ffi.new("int *"), ffi.new("int *")
            # The same types libbpf gives the section, asked of libbpf itself.
            if bpf.libbpf_prog_type_by_name(_EXAMPLES[sec].encode(), ptype, atype):
                raise BpfError("look up the program type of section", errno.ENOENT, sec)
            pattern = sec if sec == "tc" else sec + "+"
            handler = bpf.libbpf_register_prog_handler(pattern.encode(), ptype[0], atype[0], opts)
            if handler < 0:
                raise BpfError("register a libbpf section handler for", handler, pattern)
        _registered = True


def request(prog_ptr, btf, bodies: dict[str, bytes]) -> None:
    """At this program's load, replace each named function's body with the given instructions."""
    _pending[_key(prog_ptr)] = (btf, dict(bodies))


def forget(prog_ptr) -> BaseException | None:
    """After the load: drop what was not used, return the splice's error if it failed."""
    key = _key(prog_ptr)
    _pending.pop(key, None)
    _keepalive.pop(key, None)
    return _errors.pop(key, None)


def _records(ptr, count: int, size: int) -> list[bytearray]:
    if count and ptr == ffi.NULL:
        raise BpfError("splice into", errno.ENOTSUP, "program", detail="no BTF func_info from libbpf")
    raw = ffi.buffer(ffi.cast("char *", ptr), count * size)[:] if count else b""
    return [bytearray(raw[i * size:(i + 1) * size]) for i in range(count)]


def _splice(prog, opts, btf, bodies: dict[str, bytes]) -> None:
    bpf = lib()
    name = ffi.string(bpf.bpf_program__name(prog)).decode()
    count = bpf.bpf_program__insn_cnt(prog)
    code = ffi.buffer(ffi.cast("char *", bpf.bpf_program__insns(prog)), count * INSN_SIZE)[:]
    funcs = _records(opts.func_info, opts.func_info_cnt, opts.func_info_rec_size)
    lines = _records(opts.line_info, opts.line_info_cnt, opts.line_info_rec_size)
    starts = [struct.unpack_from("<II", f) for f in funcs]  # (insn_off, btf type id)
    new_code, remap, replaced = replace_function(code, [(off, btf.name_of(tid)) for off, tid in starts], bodies)
    missing = set(bodies) - replaced
    if missing:
        log.debug("%s: no function %s to splice (not called by this program)", name, ", ".join(sorted(missing)))

    for f in funcs:
        struct.pack_into("<I", f, 0, remap(struct.unpack_from("<I", f)[0]))
    kept = []
    for ln in lines:  # a replaced body has no source lines past its first instruction
        new = remap(struct.unpack_from("<I", ln)[0], inside=None)
        if new is not None:
            struct.pack_into("<I", ln, 0, new)
            kept.append(ln)
    keep = _keepalive.setdefault(_key(prog), [])
    if funcs:
        arr = ffi.new("char[]", b"".join(funcs))
        keep.append(arr)
        opts.func_info = arr
    if lines:
        arr = ffi.new("char[]", b"".join(kept) or b"\0")
        keep.append(arr)
        opts.line_info = arr
        opts.line_info_cnt = len(kept)
    buf = ffi.new("char[]", new_code)
    err = bpf.bpf_program__set_insns(prog, buf, len(new_code) // INSN_SIZE)
    if err:
        raise BpfError("set instructions of", err, f"program {name}")
    log.debug("%s: spliced %s (%d -> %d instructions)", name, ", ".join(sorted(replaced)), count,
              len(new_code) // INSN_SIZE)


def replace_function(code: bytes, functions: list[tuple[int, str]], bodies: dict[str, bytes]):
    """Pure logic: `code` (a relocated program, functions starting at the given
    instruction offsets) with the named functions' bodies replaced.
    Returns (new code, remap, names replaced); remap(old offset) gives the new
    offset of an instruction outside the replaced bodies (a body's first
    instruction maps to the new body's first; the rest to `inside`)."""
    n = len(code) // INSN_SIZE
    bounds = sorted(functions)
    spans = []  # (start, end, new body) in order
    for idx, (start, fname) in enumerate(bounds):
        if fname in bodies:
            end = bounds[idx + 1][0] if idx + 1 < len(bounds) else n
            _check_placeholder(fname, code[start * INSN_SIZE:end * INSN_SIZE])
            body = bodies[fname]
            if len(body) % INSN_SIZE or not body:
                raise ValueError(f"body for {fname} is not whole instructions")
            spans.append((start, end, body))

    def remap(old: int, inside: int | None | str = "error") -> int | None:
        delta = 0
        for start, end, body in spans:
            if old < start:
                break
            if old == start:
                return old + delta
            if old < end:
                if inside == "error":
                    raise ValueError(f"instruction {old} lies inside a replaced function")
                return inside
            delta += len(body) // INSN_SIZE - (end - start)
        return old + delta

    out = bytearray()
    pos = 0
    for start, end, body in spans:
        out += _fix_calls(code, pos, start, remap)
        out += body
        pos = end
    out += _fix_calls(code, pos, n, remap)
    return bytes(out), remap, {fname for start, fname in bounds if fname in bodies}


MOV_K = (0xB7, 0xB4)  # r0 = K, w0 = K
MOV32_X = 0xBC        # wN = wM
EXIT = 0x95


def _harmless(insn: bytes) -> bool:
    """r0 = K, or an argument zero-extended in place (wN = wN, N 1-5): what clang with
    32-bit ALU (-mcpu=v3, LLVM 20's default) makes of a 32-bit argument in the callee.
    The spliced bodies zero-extend such arguments themselves (vnet/tcpdump/translate.py)."""
    dst, src = insn[1] & 0xF, insn[1] >> 4
    if insn[0] in MOV_K:
        return insn[1] == 0
    return insn[0] == MOV32_X and dst == src and 1 <= dst <= 5 and not any(insn[2:])


def _check_placeholder(name: str, old: bytes) -> None:
    """A replaced function must have done nothing but return a value: had the
    compiler moved work into it (a constant argument folded in, say), replacing
    the body would lose that work without a word."""
    insns = [old[i:i + INSN_SIZE] for i in range(0, len(old), INSN_SIZE)]
    ok = bool(insns) and insns[-1][0] == EXIT and all(_harmless(i) for i in insns[:-1])
    if not ok:
        raise ValueError(f"function {name} is not a placeholder (only 'r0 = K; exit'): the compiler moved code "
                         f"into it ({len(insns)} instructions); keep its arguments opaque at the call site")


# An instruction whose offset needs fixing: a BPF-to-BPF call (src_reg PSEUDO_CALL) or a
# function-address load (LD_IMM64, src_reg PSEUDO_FUNC); the opcode byte and the regs byte
# (src_reg in its high nibble). A lookahead, so that matches may overlap.
_MOVABLE = re.compile(rb"(?=\x85[\x10-\x1f]|\x18[\x40-\x4f])")


def _fix_calls(code: bytes, first: int, last: int, remap) -> bytes:
    """Instructions first..last-1, with BPF-to-BPF call and function-address
    offsets (relative to the next instruction) pointing where their targets moved."""
    out = bytearray(code[first * INSN_SIZE:last * INSN_SIZE])
    # Only byte offsets that are multiples of 8 start an instruction. The second slot of an
    # LD_IMM64 has opcode 0, so it never matches: the scan needs no walk over every instruction
    # (a tc program has ~6000; walking them in Python was ~4 ms of each load).
    for m in _MOVABLE.finditer(code, first * INSN_SIZE, last * INSN_SIZE):
        pos = m.start()
        if pos % INSN_SIZE:
            continue
        i = pos // INSN_SIZE
        imm = struct.unpack_from("<i", code, pos + 4)[0]
        target = remap(i + 1 + imm)
        struct.pack_into("<i", out, pos - first * INSN_SIZE + 4, target - (remap(i) + 1))
    return bytes(out)
