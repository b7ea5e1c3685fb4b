"""eBPF instructions: encoding, a tiny assembler with labels, and a listing in
the kernel's verifier syntax (for `vnet trace --dump-filter`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Instruction classes, sizes, modes, operations (linux/bpf_common.h, linux/bpf.h).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
K, X = 0x00, 0x08
ADD, SUB, MUL, DIV, OR, AND, LSH, RSH, NEG, MOD, XOR, MOV, ARSH, END = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0)
JA, JEQ, JGT, JGE, JSET, JNE, JSGT, JSGE, CALL, EXIT, JLT, JLE = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0)
TO_BE = 0x08
PSEUDO_CALL = 1  # src_reg of a call to a BPF function (imm: relative offset)
PSEUDO_FUNC = 4  # src_reg of an ld_imm64 taking a BPF function's address (imm: relative offset)
SIZE_BYTES = {W: 4, H: 2, B: 1, DW: 8}
BYTES_SIZE = {v: k for k, v in SIZE_BYTES.items()}
FP = 10

# Helper ids (enum bpf_func_id; stable UAPI numbers).
HELPER_SKB_LOAD_BYTES = 26
HELPER_PROBE_READ_KERNEL = 113
HELPER_NAMES = {HELPER_SKB_LOAD_BYTES: "bpf_skb_load_bytes", HELPER_PROBE_READ_KERNEL: "bpf_probe_read_kernel"}


def s32(k: int) -> int:
    """A u32 as the signed imm field holds it (bit pattern preserved)."""
    k &= 0xFFFFFFFF
    return k - (1 << 32) if k & 0x80000000 else k


@dataclass(frozen=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)

    @classmethod
    def decode(cls, raw: bytes) -> "Insn":
        code, regs, off, imm = struct.unpack("<BBhi", raw)
        return cls(code, regs & 0xF, regs >> 4, off, imm)

    @property
    def cls(self) -> int:
        return self.code & 0x07


def encode(insns: list[Insn]) -> bytes:
    return b"".join(i.encode() for i in insns)


def decode(raw: bytes) -> list[Insn]:
    return [Insn.decode(raw[i:i + 8]) for i in range(0, len(raw), 8)]


class Asm:
    """Append instructions; jumps name a label, resolved by finish()."""

    def __init__(self) -> None:
        self.insns: list[Insn] = []
        self._targets: dict[int, str] = {}
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.insns)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name} defined twice")
        self._labels[name] = len(self.insns)

    def emit(self, insn: Insn, target: str | None = None) -> None:
        if target is not None:
            self._targets[len(self.insns)] = target
        self.insns.append(insn)

    # -- shorthands ------------------------------------------------------------------------------
    def mov32_imm(self, dst: int, k: int) -> None:
        self.emit(Insn(ALU | MOV | K, dst, imm=s32(k)))

    def mov32_reg(self, dst: int, src: int) -> None:
        self.emit(Insn(ALU | MOV | X, dst, src))

    def mov64_reg(self, dst: int, src: int) -> None:
        self.emit(Insn(ALU64 | MOV | X, dst, src))

    def mov64_imm(self, dst: int, k: int) -> None:
        self.emit(Insn(ALU64 | MOV | K, dst, imm=k))

    def add64_imm(self, dst: int, k: int) -> None:
        self.emit(Insn(ALU64 | ADD | K, dst, imm=k))

    def add64_reg(self, dst: int, src: int) -> None:
        self.emit(Insn(ALU64 | ADD | X, dst, src))

    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self.emit(Insn(LDX | MEM | size, dst, src, off))

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self.emit(Insn(STX | MEM | size, dst, src, off))

    def st_imm(self, size: int, dst: int, off: int, k: int) -> None:
        self.emit(Insn(ST | MEM | size, dst, off=off, imm=k))

    def call(self, helper: int) -> None:
        self.emit(Insn(JMP | CALL, imm=helper))

    def exit(self) -> None:
        self.emit(Insn(JMP | EXIT))

    def ja(self, target: str) -> None:
        self.emit(Insn(JMP | JA), target)

    def jmp_imm(self, op: int, dst: int, k: int, target: str, wide: bool = False) -> None:
        self.emit(Insn((JMP if wide else JMP32) | op | K, dst, imm=s32(k) if not wide else k), target)

    def jmp_reg(self, op: int, dst: int, src: int, target: str, wide: bool = False) -> None:
        self.emit(Insn((JMP if wide else JMP32) | op | X, dst, src), target)

    def finish(self) -> list[Insn]:
        out = list(self.insns)
        for idx, name in self._targets.items():
            if name not in self._labels:
                raise ValueError(f"jump to undefined label {name}")
            off = self._labels[name] - (idx + 1)
            if not -32768 <= off <= 32767:
                raise OverflowError("jump farther than eBPF's 16-bit offset")
            i = out[idx]
            out[idx] = Insn(i.code, i.dst, i.src, off, i.imm)
        return out


# -- listing ---------------------------------------------------------------------------------------
_ALU_SYM = {ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=", RSH: ">>=",
            MOD: "%=", XOR: "^=", MOV: "=", ARSH: "s>>="}
_JMP_SYM = {JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=", JLT: "<", JLE: "<=",
            0xC0: "s<", 0xD0: "s<="}
_SIZE_NAME = {W: "u32", H: "u16", B: "u8", DW: "u64"}


def format_insn(i: Insn) -> str:
    """One instruction in the verifier's syntax (as bpftool prints it)."""
    c, op = i.cls, i.code & 0xF0
    if c in (ALU, ALU64):
        r = "w" if c == ALU else "r"
        if op == NEG:
            return f"{r}{i.dst} = -{r}{i.dst}"
        if op == END:
            return f"r{i.dst} = {'be' if i.code & TO_BE else 'le'}{i.imm} r{i.dst}"
        rhs = f"{r}{i.src}" if i.code & X else str(i.imm)
        return f"{r}{i.dst} {_ALU_SYM.get(op, hex(op))} {rhs}"
    if c in (JMP, JMP32):
        if op == CALL:
            return f"call pc{i.imm:+d}" if i.src == PSEUDO_CALL else f"call {HELPER_NAMES.get(i.imm, i.imm)}#{i.imm}"
        if op == EXIT:
            return "exit"
        if op == JA:
            return f"goto pc{i.off:+d}"
        r = "w" if c == JMP32 else "r"
        rhs = f"{r}{i.src}" if i.code & X else str(i.imm)
        return f"if {r}{i.dst} {_JMP_SYM.get(op, hex(op))} {rhs} goto pc{i.off:+d}"
    size = _SIZE_NAME.get(i.code & 0x18, "?")
    if c == LDX:
        return f"r{i.dst} = *({size} *)(r{i.src} {i.off:+d})"
    if c == STX:
        return f"*({size} *)(r{i.dst} {i.off:+d}) = r{i.src}"
    if c == ST:
        return f"*({size} *)(r{i.dst} {i.off:+d}) = {i.imm}"
    if c == LD and i.code == (LD | IMM | DW):
        return f"r{i.dst} = {i.imm:#x} ll"
    return f"<code {i.code:#04x}>"


def listing(insns: list[Insn]) -> list[str]:
    return [f"{n:4d}: {format_insn(i)}" for n, i in enumerate(insns)]
