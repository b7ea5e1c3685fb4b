"""Pure logic of the tcpdump-expression path, no kernel: instruction encoding,
the translator's output shape (no dead code, every jump inside the body, the
register and stack discipline), and the splice's offset fixing on a synthetic
relocated program (a fake program, not a kernel one: the real splice is
exercised by tests/kernel/test_tcpdump_*.py)."""

from __future__ import annotations

import struct

import pytest

from vnet.binding.pcap import ClassicInsn
from vnet.binding.splice import replace_function
from vnet.tcpdump import compile, ebpf, translate
from vnet.tcpdump.ebpf import Insn
from vnet.tcpdump.translate import TranslateError


def test_insn_roundtrip_and_listing():
    i = Insn(ebpf.JMP32 | ebpf.JGT | ebpf.K, 6, 0, -3, -1)
    assert Insn.decode(i.encode()) == i
    assert ebpf.format_insn(i) == "if w6 > -1 goto pc-3"
    assert ebpf.format_insn(Insn(ebpf.JMP | ebpf.CALL, imm=113)) == "call bpf_probe_read_kernel#113"
    assert ebpf.s32(0xFFFFFFFF) == -1 and ebpf.s32(5) == 5


def _reachable(insns: list[Insn]) -> set[int]:
    seen, todo = set(), [0]
    while todo:
        pc = todo.pop()
        if pc in seen:
            continue
        assert 0 <= pc < len(insns), f"control reaches {pc}, outside the body"
        seen.add(pc)
        i = insns[pc]
        if i.cls in (ebpf.JMP, ebpf.JMP32):
            op = i.code & 0xF0
            if op == ebpf.EXIT:
                continue
            if op == ebpf.JA:
                todo.append(pc + 1 + i.off)
                continue
            if op != ebpf.CALL:
                todo.append(pc + 1 + i.off)
        todo.append(pc + 1)
    return seen


@pytest.mark.parametrize("text", ["udp and dst port 53", "vlan 10 and tcp[tcpflags] & tcp-syn != 0",
                                  "ip[2:2] > 500 or ip6", "ether host 02:00:00:00:00:01", "len > 100"])
@pytest.mark.parametrize("mode", [translate.DIRECT, translate.PROBE])
def test_translation_has_no_dead_code_and_stays_in_bounds(text, mode):
    """The verifier refuses unreachable instructions and jumps out of a function."""
    expr = compile(text)
    body = translate.translate(mode, expr.ethernet, expr.raw)
    assert _reachable(body) == set(range(len(body)))
    assert body[-1].code == ebpf.JMP | ebpf.EXIT
    for i in body:
        # only r0-r9 and reads of the frame pointer; stack use within the stub's own slots
        assert i.dst <= 10 and i.src <= 10
        if i.cls in (ebpf.ST, ebpf.STX):
            assert i.dst == ebpf.FP and translate.mem_slot(translate.MEMWORDS - 1) <= i.off < 0
        if i.cls in (ebpf.JMP, ebpf.JMP32) and (i.code & 0xF0) == ebpf.CALL:
            assert i.imm in (ebpf.HELPER_SKB_LOAD_BYTES, ebpf.HELPER_PROBE_READ_KERNEL)
            assert i.imm == (ebpf.HELPER_SKB_LOAD_BYTES if mode == translate.DIRECT
                             else ebpf.HELPER_PROBE_READ_KERNEL)


def test_an_expression_that_cannot_apply_rejects_everything():
    body = translate.translate(translate.DIRECT, None)
    assert [ebpf.format_insn(i) for i in body[-2:]] == ["w0 = 0", "exit"]
    assert compile("vlan 10").raw is None and "VLAN" in compile("vlan 10").raw_error


@pytest.mark.parametrize("prog, why", [
    ([], "empty"),
    ([ClassicInsn(0x15, 5, 0, 1), ClassicInsn(0x06, 0, 0, 0)], "jumps out"),
    ([ClassicInsn(0x60, 0, 0, 16), ClassicInsn(0x06, 0, 0, 0)], r"M\[16\]"),
    ([ClassicInsn(0x0E, 0, 0, 0)], "unknown opcode"),  # ret x: not in libpcap's interpreter either
    ([ClassicInsn(0x00, 0, 0, 0)], "does not end"),
])
def test_bad_classic_programs_are_refused(prog, why):
    with pytest.raises(TranslateError, match=why):
        translate.translate(translate.DIRECT, prog)


# -- splice offsets on a synthetic program -------------------------------------------------------------

def _call(rel: int) -> bytes:
    return Insn(ebpf.JMP | ebpf.CALL, src=ebpf.PSEUDO_CALL, imm=rel).encode()


def _nop(n: int = 1) -> bytes:
    return Insn(ebpf.ALU64 | ebpf.MOV | ebpf.K, 0, imm=0).encode() * n


def _placeholder(n: int) -> bytes:  # what clang makes of a stub: r0 = K ...; exit
    return _nop(n - 1) + Insn(ebpf.JMP | ebpf.EXIT).encode()


def _ldfunc(rel: int) -> bytes:  # ld_imm64 r2 = <function>: two slots
    return Insn(ebpf.LD | ebpf.IMM | ebpf.DW, 2, ebpf.PSEUDO_FUNC, imm=rel).encode() + bytes(8)


def test_replace_function_fixes_calls_and_function_addresses():
    # main: 0 call stub(@10), 1 call after(@14), 2-3 ld func after, 4-9 nops
    # stub @10 (4 insns) -> replaced by 7; after @14: call stub, 2 nops
    main = _call(10 - 1) + _call(14 - 2) + _ldfunc(14 - 3) + _nop(6)
    stub = _placeholder(4)
    after = _call(10 - 15) + _nop(2)
    code = main + stub + after
    new_stub = _nop(7)
    new, remap, done = replace_function(code, [(0, "main"), (10, "stub"), (14, "after")], {"stub": new_stub})
    assert done == {"stub"} and len(new) == len(code) + 3 * 8
    insns = ebpf.decode(new)
    assert 1 + insns[0].imm == 10                   # still the stub's start
    assert 2 + insns[1].imm == 17                   # `after` moved by 3
    assert 3 + insns[2].imm == 17                   # the function address too
    assert 18 + insns[17].imm == 10                 # the call back from `after`
    assert remap(14) == 17 and remap(10) == 10 and remap(12, inside=None) is None
    with pytest.raises(ValueError):
        remap(11)


def _fix_calls_by_walking(code: bytes, first: int, last: int, remap) -> bytes:
    """The splice's offset fixing as one walk over every instruction (what splice._fix_calls
    finds with a byte scan instead)."""
    out = bytearray(code[first * 8:last * 8])
    i = first
    while i < last:
        op, src = code[i * 8], code[i * 8 + 1] >> 4
        if (op == 0x85 and src == 1) or (op == 0x18 and src == 4):
            imm = struct.unpack_from("<i", code, i * 8 + 4)[0]
            struct.pack_into("<i", out, (i - first) * 8 + 4, remap(i + 1 + imm) - (remap(i) + 1))
        i += 2 if op == 0x18 else 1
    return bytes(out)


def test_the_call_scan_finds_what_a_walk_finds():
    """Random programs full of lookalike bytes (0x85/0x18 in registers, offsets and immediates,
    LD_IMM64 of maps and of functions, helper calls): the same result as walking them."""
    import random

    from vnet.binding.splice import _fix_calls

    rng = random.Random(10)
    for _ in range(200):
        code = bytearray()
        n = 0
        while n < 300:
            kind = rng.randrange(6)
            if kind == 0:
                code += _call(rng.randrange(-n, 300 - n) if n else 1)
                n += 1
            elif kind == 1:
                code += bytes([0x18, rng.choice([0x41, 0x12, 0x04, 0x40]), 0x85, 0x18]) + rng.randbytes(4) + bytes(8)
                n += 2
            elif kind == 2:
                code += bytes([0x85, rng.choice([0x00, 0x20, 0x01])]) + rng.randbytes(6)  # helper calls, lookalikes
                n += 1
            else:
                code += bytes([rng.choice([0xb7, 0x07, 0x61, 0x15]), rng.choice([0x85, 0x18, 0x10, 0x41])]) + \
                    bytes(rng.choice([0x85, 0x18, 0x14, 0x44]) for _ in range(6))
                n += 1
        shift = rng.randrange(1, 5)
        remap = lambda old: old + (shift if old > 150 else 0)  # noqa: E731
        first = rng.choice([0, 1]) if code[8] != 0 else 0
        code = bytes(code)
        assert _fix_calls(code, first, n, remap) == _fix_calls_by_walking(code, first, n, remap)


def test_a_stub_the_compiler_put_work_into_is_refused():
    """clang once folded a constant argument into a stub (r4 = 1): replacing that body loses it."""
    code = _call(0) + Insn(ebpf.ALU64 | ebpf.MOV | ebpf.K, 4, imm=1).encode() + _placeholder(2)
    with pytest.raises(ValueError, match="not a placeholder"):
        replace_function(code, [(0, "main"), (1, "stub")], {"stub": _placeholder(1)})


def test_a_stub_whose_arguments_clang_zero_extends_is_still_a_placeholder():
    """clang -mcpu=v3 (LLVM 20's default) zero-extends 32-bit arguments in the callee (w2 = w2):
    the spliced body does that itself, so the stub is replaced; moving one register into
    another is work, and is refused."""
    def mov32(dst: int, src: int) -> bytes:
        return Insn(ebpf.ALU | ebpf.MOV | ebpf.X, dst, src).encode()

    stub = mov32(2, 2) + mov32(3, 3) + mov32(4, 4) + _placeholder(2)
    new, _, done = replace_function(_call(0) + stub, [(0, "main"), (1, "stub")], {"stub": _placeholder(1)})
    assert done == {"stub"} and len(new) == 2 * 8
    for work in (mov32(2, 3), mov32(0, 0)):
        with pytest.raises(ValueError, match="not a placeholder"):
            replace_function(_call(0) + work + _placeholder(2), [(0, "main"), (1, "stub")], {"stub": _placeholder(1)})


def test_replace_function_without_the_function_changes_nothing():
    code = _call(0) + _nop(2)
    new, remap, done = replace_function(code, [(0, "main"), (1, "x")], {"stub": _nop(1)})
    assert new == code and not done and remap(2) == 2


def test_replace_function_refuses_partial_instructions():
    with pytest.raises(ValueError):
        replace_function(_nop(1) + _placeholder(1), [(0, "main"), (1, "stub")], {"stub": b"\0" * 5})


def test_func_info_records_are_what_the_splice_reads():
    """struct bpf_func_info is {insn_off, type_id}: both u32 (linux/bpf.h)."""
    assert struct.calcsize("<II") == 8


@pytest.mark.parametrize("obj", ["skb_trace", "drop", "tc_trace"])
def test_the_probe_window_agrees_with_the_programs(obj):
    """The translator reads the first PROBE_WINDOW bytes from the copy vnet_pcap_probe is handed:
    the C side copies VNET_PCAP_WINDOW bytes, read from each object's BTF."""
    from vnet.binding import Btf
    from vnet.objects import object_path

    with Btf.from_file(str(object_path(obj))) as btf:
        assert btf.enum("vnet_pcap")["VNET_PCAP_WINDOW"] == translate.PROBE_WINDOW


@pytest.mark.parametrize("text", ["udp and dst port 53", "ip[200] = 1", "tcp[tcpflags] & tcp-syn != 0"])
def test_probe_loads_inside_the_window_read_the_copy_and_the_rest_call_the_helper(text):
    """Constant loads within the window are plain loads (no helper call); an indexed load tests
    the bound and keeps one helper call for past it; a constant load past it is a helper call."""
    classic = compile(text).ethernet
    body = translate.translate(translate.PROBE, classic, None)
    size = {0x00: 4, 0x08: 2, 0x10: 1}
    indexed = sum(1 for i in classic if i.code & 0x07 == 0x00 and i.code & 0xE0 == 0x40)
    past = sum(1 for i in classic if i.code & 0x07 in (0x00, 0x01) and i.code & 0xE0 in (0x20, 0xA0)
               and i.k + size[i.code & 0x18] > translate.PROBE_WINDOW)
    calls = [i for i in body if i.cls == ebpf.JMP and (i.code & 0xF0) == ebpf.CALL]
    assert len(calls) == indexed + past
    assert any(i.cls == ebpf.LDX and i.src == ebpf.FP and i.off == translate.SLOT_WIN for i in body)
    if text == "ip[200] = 1":
        assert past == 1


def test_without_a_window_every_probe_load_is_a_helper_call():
    """Objects built before the window (a four-argument stub) get a body that never reads r5."""
    classic = compile("udp and dst port 53").ethernet
    body = translate.translate(translate.PROBE, classic, None, window=0)
    loads = sum(1 for i in classic if i.code & 0x07 in (0x00, 0x01) and i.code & 0xE0 in (0x20, 0x40, 0xA0))
    assert sum(1 for i in body if i.cls == ebpf.JMP and (i.code & 0xF0) == ebpf.CALL) == loads
    assert not any(i.src == 5 or i.off == translate.SLOT_WIN for i in body if i.cls in (ebpf.LDX, ebpf.STX))


def _stack_depth(body: list[Insn]) -> int:
    """The deepest frame-pointer access: stores through dst, loads through src."""
    stores = [-i.off for i in body if i.cls in (ebpf.ST, ebpf.STX) and i.dst == ebpf.FP]
    loads = [-i.off for i in body if i.cls == ebpf.LDX and i.src == ebpf.FP]
    return max(stores + loads, default=0)


@pytest.mark.parametrize("mode", [translate.DIRECT, translate.PROBE])
def test_the_stub_takes_only_the_stack_its_expression_uses(mode):
    """On Linux 6.1 the stub's stack and its caller's share 512 bytes, and a kernel hook's program
    takes up to 448: the scratch words M[] cost stack only where the expression uses them, the
    first ones nearest (the verifier counts a frame as deep as its deepest access)."""
    plain = compile("udp and dst port 53")
    assert _stack_depth(translate.translate(mode, plain.ethernet, plain.raw)) <= 32
    assert translate.mem_slot(0) == -36 and translate.mem_slot(7) == -64  # M[0..7]: a 64-byte frame
    ins = [ClassicInsn(0x00, 0, 0, 7), ClassicInsn(0x02, 0, 0, 1), ClassicInsn(0x60, 0, 0, 1),
           ClassicInsn(0x16, 0, 0, 0)]  # A = 7; M[1] = A; A = M[1]; return A
    assert _stack_depth(translate.translate(mode, ins, ins)) == 40
