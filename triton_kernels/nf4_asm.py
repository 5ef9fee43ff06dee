"""NF4 decode in registers for the bf16 GEMMs: a 16-entry codebook lookup by ``prmt``, no memory access (issue 11).

The GEMM loops spent most of their issue slots on the codebook: ``tl.load(code_ptr + nibble)`` is a gather that
the software pipeliner turns into one 4-byte ``cp.async`` per weight, with 64-bit address arithmetic for each (11-16
lane-instructions per decoded weight in the sm_90 SASS). Here the codebook lives in the instruction stream and a
packed 32-bit word of 8 NF4 codes becomes 8 bf16 weights ``bf16(bf16(level) · bf16(absmax))`` in 30 PTX
instructions (ptxas shares the absmax conversions of equal blocks: about 27 in SASS, 3.4 per weight), all on
registers. The decode is bound by the SM's ALU (64 INT32 lanes, half the FP32 lanes: every prmt and lop3 runs
there), so the upper half-word's selectors come from ``mul.hi.u32 w, 2^16`` (IMAD.HI, on the FMA pipe, which has
room) rather than from a shift: 20 ALU instructions per word instead of 22.

How one ``prmt`` looks up 4 codes at once. ``prmt.b32 d, a, b, c`` builds each byte of d from the 8 bytes of {b, a}:
the low 3 bits of the selector nibble pick the byte, its bit 3 asks for that byte's sign (msb) replicated instead.
The low 16 bits of a packed word are exactly 4 selector nibbles [l0, h0, l1, h1] (byte j holds the high nibble h_j,
weight 2j, and the low nibble l_j, weight 2j+1). A bf16 level is two bytes, so the 16 levels are four 8-byte
tables: low bytes of levels 0-7 and 8-15, high bytes of levels 0-7 and 8-15. For each half-word:

- ``pa = prmt(T[0:8], s)`` is right for codes 0-7; ``pb = prmt(T[8:16], s ^ 0x8888)`` for codes 8-15 (the flipped
  bit 3 turns 8-15 into plain picks 0-7);
- ``x = prmt(w, w << 4, sel)`` in sign mode is 0xFF in every byte whose code has bit 3 set: byte j of w has h_j's
  bit 3 as its msb, byte j of ``w << 4`` has l_j's, and ``sel`` puts them in [l0, h0, l1, h1] order;
- ``lop3(pa, pb, x)`` with LUT 0xD8 is ``x ? pb : pa``, once for the low bytes and once for the high bytes;
- two byte permutes interleave those into one bf16 pair per byte: [w(h_j), w(l_j)], the two adjacent columns of
  the tile, already in the order the MMA operand wants (an output per nibble instead cost one more permute per
  pair when Triton joined them).

The absmax of each weight's block (float32) is rounded to bf16 and multiplied in (``mul.rn.bf16x2``: the product of
two bf16 values is exact in float32, so this is float32 multiply, then one rounding). Compared with the reference's
``bf16(level · absmax)`` (float32 product, one rounding) the level and the absmax are each rounded to bf16 first:
within the bf16 tolerance of DESIGN.md. The plain-Triton twin (``lora_linear_tiles``, used under the interpreter)
computes exactly this, and ``emulate`` below runs this very program on integers, so the tests check the lookup
tables, selectors and LUTs bit for bit on CPU; a ``gpu`` test checks the compiled asm against the twin.

The program is written once, as data (``PROGRAM``), and both ``ptx`` and ``emulate`` read it. bf16 only: in fp16 the
absmax would lose range and precision when rounded to fp16 first, so fp16 keeps the gather decode.
"""

from __future__ import annotations

import functools
import struct
from typing import Sequence

import torch

from qlora_kernels import reference

# Operands: "$w" the packed word (4 bytes = 8 codes), "$a0".."$a3" the four bytes' absmax (float32), "$p0".."$p3"
# the bf16 pair of byte 0..3 (high-nibble weight in the low half); "T.." the codebook words; anything else a
# temporary.
def _half_word(selector: str, flipped: str, sign_select: int, first: int) -> tuple[tuple, ...]:
    # Four codes [l, h, l', h'] of one half-word (``selector``; ``flipped`` = selector ^ 0x8888): the sign-mode
    # mask, the two 8-entry lookups of the low and of the high bytes merged by it, then bytes ``first`` and
    # ``first`` + 1 of the word as bf16 pairs, times their absmax.
    p, q = f"$p{first}", f"$p{first + 1}"
    return (
        ("prmt", "x", "$w", "w4", sign_select),
        ("prmt", "pa", "TL0", "TL1", selector),
        ("prmt", "pb", "TL2", "TL3", flipped),
        ("lop3", "lb", "pa", "pb", "x", 0xD8),
        ("prmt", "pa", "TH0", "TH1", selector),
        ("prmt", "pb", "TH2", "TH3", flipped),
        ("lop3", "hb", "pa", "pb", "x", 0xD8),
        ("prmt", p, "lb", "hb", 0x4051),
        ("prmt", q, "lb", "hb", 0x6273),
        ("mul_bf16x2", p, p, f"am{first}"),
        ("mul_bf16x2", q, q, f"am{first + 1}"),
    )


PROGRAM: tuple[tuple, ...] = (
    ("shl", "w4", "$w", 4),
    ("xor", "sf", "$w", 0x88888888),
    ("mulhi", "shi", "$w", 0x10000),
    ("mulhi", "sfhi", "sf", 0x10000),
    *(("cvt_bf16x2", f"am{j}", f"$a{j}", f"$a{j}") for j in range(4)),
    *_half_word("$w", "sf", 0x9D8C, 0),  # bytes 0-1: codes [l0, h0, l1, h1]
    *_half_word("shi", "sfhi", 0xBFAE, 2),  # bytes 2-3: codes [l2, h2, l3, h3]
)



# inline_asm_elementwise operand numbering with pack=4: the outputs' registers first (one int32 per byte: its bf16
# pair), then the inputs' (the 4 bytes in one register, the 4 float32 absmax values, then the four codebook words
# that arrive as runtime values, 4 registers each - one is read).
OPERANDS = {"$p0": 0, "$p1": 1, "$p2": 2, "$p3": 3, "$w": 4, "$a0": 5, "$a1": 6, "$a2": 7, "$a3": 8,
            "TL0": 9, "TL2": 13, "TH0": 17, "TH2": 21}
CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * 21)
PACK = 4
# The word form (``ptx(word_input=True)``, pack=1): the packed word arrives as one int32 (4 bytes of one weight row,
# in memory order, so Triton never re-packs bytes from several rows into the asm's input register), with one float32
# absmax for its 4 bytes (they lie in one block) and the four codebook words one register each; four int32 outputs,
# the bf16 pairs of bytes 0..3.
OPERANDS_WORD = {"$p0": 0, "$p1": 1, "$p2": 2, "$p3": 3, "$w": 4, "$a0": 5, "$a1": 5, "$a2": 5, "$a3": 5,
                 "TL0": 6, "TL2": 7, "TH0": 8, "TH2": 9}
CONSTRAINTS_WORD = ",".join(["=r"] * 4 + ["r"] * 6)
# The codebook words a prmt takes from a register (its first table operand; the second is an immediate): they are
# loaded once per program, before the main loop, and passed in, so they stay in registers. As immediates, ptxas
# re-materialised them at every use (one IMAD per lookup, a quarter of the program's cost).
REGISTER_WORDS = ("TL0", "TL2", "TH0", "TH2")


@functools.lru_cache(maxsize=None)
def codebook_words(dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """The 16 NF4 levels rounded to ``dtype``, as the eight 32-bit prmt tables TL0-TL3 (low bytes of levels 0-3,
    4-7, 8-11, 12-15) and TH0-TH3 (high bytes)."""
    bits = reference.nf4_code(torch.device("cpu")).to(dtype).view(torch.int16).tolist()
    bits = [b & 0xFFFF for b in bits]
    lo, hi = [b & 0xFF for b in bits], [b >> 8 for b in bits]

    def word(b: Sequence[int]) -> int:
        return b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24

    words = {}
    for name, table in (("TL", lo), ("TH", hi)):
        for i in range(4):
            words[f"{name}{i}"] = word(table[4 * i: 4 * i + 4])
    return words


def _operand(name, temps: set, operands: dict) -> str:
    if isinstance(name, int):
        return f"0x{name:X}"
    if name in operands:
        return f"${operands[name]}"
    if name.startswith(("TL", "TH")):  # the immediates
        return str(codebook_words()[name])
    temps.add(name)
    return f"q_{name}"


def ptx(word_input: bool = False) -> str:
    """The program as the PTX body of ``tl.inline_asm_elementwise`` (a braced scope with its own registers):
    ``OPERANDS`` / ``CONSTRAINTS`` (4 uint8 inputs packed in one register, pack=4, an absmax each), or with
    ``word_input`` ``OPERANDS_WORD`` / ``CONSTRAINTS_WORD`` (one int32 word and one absmax, pack=1)."""
    operands = OPERANDS_WORD if word_input else OPERANDS
    temps: set = set()
    lines = []
    for op, dst, *src in PROGRAM:
        d = _operand(dst, temps, operands)
        s = [_operand(x, temps, operands) for x in src]
        if op == "shl":
            lines.append(f"shl.b32 {d}, {s[0]}, {src[1]};")
        elif op == "mulhi":
            lines.append(f"mul.hi.u32 {d}, {s[0]}, {src[1]};")
        elif op == "xor":
            lines.append(f"xor.b32 {d}, {s[0]}, {s[1]};")
        elif op == "cvt_bf16x2":
            lines.append(f"cvt.rn.bf16x2.f32 {d}, {s[0]}, {s[1]};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {d}, {s[0]}, {s[1]}, {s[2]};")
        elif op == "lop3":
            lines.append(f"lop3.b32 {d}, {s[0]}, {s[1]}, {s[2]}, 0x{src[3]:X};")
        elif op == "mul_bf16x2":
            lines.append(f"mul.rn.bf16x2 {d}, {s[0]}, {s[1]};")
        else:  # pragma: no cover - a typo in PROGRAM
            raise ValueError(f"unknown op {op!r}")
    regs = ", ".join(f"q_{t}" for t in sorted(temps))
    return "{\n.reg .b32 " + regs + ";\n" + "\n".join(lines) + "\n}"


# ------------------------------------------------------------------------------------------------ emulation


def _prmt(a: int, b: int, c: int) -> int:
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = pool[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        index = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def _f32_to_bf16_bits(x: float) -> int:
    return torch.tensor([x], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF


def _bf16_bits_to_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _mul_bf16x2(a: int, b: int) -> int:
    out = 0
    for half in range(2):
        x = _bf16_bits_to_f32(a >> (16 * half))
        y = _bf16_bits_to_f32(b >> (16 * half))
        product = torch.tensor([x], dtype=torch.float32) * torch.tensor([y], dtype=torch.float32)  # exact
        out |= (product.to(torch.bfloat16).view(torch.int16).item() & 0xFFFF) << (16 * half)
    return out


def emulate(word: int, absmax: Sequence[float]) -> dict[str, int]:
    """Run ``PROGRAM`` on integers, as the GPU would: the packed ``word`` (4 bytes) and the 4 bytes' float32
    absmax give the output registers {"$p0", .., "$p3"} (byte j's two bf16 bit patterns, the high nibble's low)."""
    regs: dict = {"$w": word & 0xFFFFFFFF}
    for i, value in enumerate(absmax):
        regs[f"$a{i}"] = float(value)
    regs.update(codebook_words())

    def val(x):
        return x if isinstance(x, int) else regs[x]

    for op, dst, *src in PROGRAM:
        if op == "shl":
            r = (val(src[0]) << src[1]) & 0xFFFFFFFF
        elif op == "mulhi":
            r = (val(src[0]) * src[1]) >> 32
        elif op == "xor":
            r = val(src[0]) ^ val(src[1])
        elif op == "cvt_bf16x2":
            r = _f32_to_bf16_bits(val(src[0])) << 16 | _f32_to_bf16_bits(val(src[1]))
        elif op == "prmt":
            r = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "lop3":
            r = _lop3(val(src[0]), val(src[1]), val(src[2]), src[3])
        elif op == "mul_bf16x2":
            r = _mul_bf16x2(val(src[0]), val(src[1]))
        else:  # pragma: no cover
            raise ValueError(op)
        regs[dst] = r
    return {k: regs[k] for k in ("$p0", "$p1", "$p2", "$p3")}


def instruction_count() -> int:
    """PTX instructions per packed word (8 weights)."""
    return len(PROGRAM)
