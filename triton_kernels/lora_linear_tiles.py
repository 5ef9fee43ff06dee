"""Device functions shared by the fused NF4 + LoRA kernels: NF4 weight tiles, the dropout hash, dot-operand casts.

Nothing here launches. The kernels in ``lora_linear_gemm`` and ``lora_linear_thin`` inline these ``@triton.jit``
functions. The NF4 arithmetic is the reference's (``qlora_kernels.reference.dequantize_nf4``): ``level · absmax`` in
float32, the double-quantized absmax decoded as ``nested_code[q] · nested_absmax[b >> 8] + offset`` (kernels that
use these functions are compiled with FMA contraction off so that this stays two roundings, as in bitsandbytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_kernels import reference

from . import nf4_asm


_DEVICE_CODES: dict[torch.device, torch.Tensor] = {}


# Entries of the GEMMs' code table: the 16 float32 NF4 levels, then nf4_asm's register words (int32 bits).
CODE_TABLE_WORDS = tl.constexpr(16)


def nf4_levels(device: torch.device) -> torch.Tensor:
    """The GEMMs' code table on ``device`` (cached): float32 [20], the 16 NF4 levels (the gather decode reads
    these 64 bytes) and, as int32 bit patterns, the four ``nf4_asm.REGISTER_WORDS`` that the register decode loads
    once per program."""
    device = torch.device(device)
    if device not in _DEVICE_CODES:
        words = nf4_asm.codebook_words()
        bits = torch.tensor([words[w] for w in nf4_asm.REGISTER_WORDS], dtype=torch.int64)
        bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
        _DEVICE_CODES[device] = torch.cat([reference.nf4_code(torch.device("cpu")), bits]).to(device)
    return _DEVICE_CODES[device]


@triton.jit
def to_dot_operand(t, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """Round ``t`` to the operand dtype; under the interpreter (or for float32) widen to float32 afterwards, because
    the interpreter's ``tl.dot`` is wrong on bfloat16 (the rounding to DTYPE is kept, so results match a GPU's)."""
    t = t.to(DTYPE)
    if DOT_FP32:
        t = t.to(tl.float32)
    return t


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr):
    """``acc + a · b`` on the tensor cores; full float32 precision (no TF32) when the operands are float32."""
    if DOT_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fmix32(h):
    # MurmurHash3's 32-bit finalizer, on uint32 (wrapping multiplications, logical shifts).
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(index, seed_ptr, threshold):
    """bool tile: whether dropout keeps the elements at flat ``index`` (int64, row · K + column) under the int64
    seed at ``seed_ptr``. Bit for bit ``reference.dropout_hash(index, seed) >> 8 >= threshold``."""
    seed = tl.load(seed_ptr)
    key = _fmix32((seed & 0xFFFFFFFF).to(tl.uint32))
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    h = _fmix32(_fmix32(lo ^ key) ^ (hi + seed_hi))
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def _block_absmax(
    block, mask, absmax_ptr, nested_absmax_ptr, offset_ptr, nested_code_ptr,
    HAS_DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
):
    # float32 absmax of the NF4 blocks ``block`` (any shape); 0 where masked off.
    if HAS_DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + q) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return absmax


# How the aligned path decodes (the DECODE constexpr of the GEMM kernels, chosen by the launcher):
DECODE_GATHER = tl.constexpr(0)  # float32 levels gathered from ``code_ptr``, times the float32 absmax (fp16, fp32; per element)
DECODE_REGISTERS_TWIN = tl.constexpr(1)  # bf16: the register decode's numerics in plain Triton (the interpreter runs this)
DECODE_REGISTERS_ASM = tl.constexpr(2)  # bf16: the register decode, ``nf4_asm``'s prmt program (compiled GPU code only)
_NF4_DECODE_PTX = tl.constexpr(nf4_asm.ptx())


@triton.jit
def nf4_register_words(code_ptr, DECODE: tl.constexpr):
    """The register decode's four codebook words (int32 scalars, ``nf4_asm.REGISTER_WORDS`` order), read from the
    code table once, before the main loop; zeros for the other decode modes."""
    if DECODE == DECODE_REGISTERS_ASM:
        words_ptr = code_ptr.to(tl.pointer_type(tl.int32)) + CODE_TABLE_WORDS
        return tl.load(words_ptr), tl.load(words_ptr + 1), tl.load(words_ptr + 2), tl.load(words_ptr + 3)
    return 0, 0, 0, 0


@triton.jit
def _split_pairs(pair):
    # int32 bf16 pairs (the asm's outputs) -> (low halves, high halves) as bf16, by a register move that ptxas
    # elides: the halves stay where they are, so the callers' join costs nothing.
    return tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pair], (tl.bfloat16, tl.bfloat16), True, 1)


@triton.jit
def decode_nf4_pairs(byte, absmax, code_ptr, words, DECODE: tl.constexpr):
    """bf16 (w_hi, w_lo): the weights of the high and the low nibble of each uint8 ``byte``, times its block's
    float32 ``absmax`` (same shape), as bf16(bf16(level) · bf16(absmax)) (``nf4_asm``). DECODE_REGISTERS_ASM runs
    the prmt lookup (no memory access); DECODE_REGISTERS_TWIN computes the same bits with a gather, for the
    interpreter, which cannot run inline asm."""
    if DECODE == DECODE_REGISTERS_ASM:
        # One int32 per byte, its bf16 pair.
        pair = tl.inline_asm_elementwise(
            _NF4_DECODE_PTX, nf4_asm.CONSTRAINTS, [byte, absmax, words[0], words[1], words[2], words[3]],
            tl.int32, True, nf4_asm.PACK,
        )
        w_hi, w_lo = _split_pairs(pair)
    else:
        b = byte.to(tl.int32)
        scale = absmax.to(tl.bfloat16).to(tl.float32)
        w_hi = (tl.load(code_ptr + (b >> 4)).to(tl.bfloat16).to(tl.float32) * scale).to(tl.bfloat16)
        w_lo = (tl.load(code_ptr + (b & 0xF)).to(tl.bfloat16).to(tl.float32) * scale).to(tl.bfloat16)
    return w_hi, w_lo


@triton.jit
def load_nf4_tile(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
    offs_n, k0, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr, ALIGNED_ROWS: tl.constexpr, HAS_DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    DECODE: tl.constexpr, words,
):
    """[BLOCK_N, BLOCK_K]: deq(W)[offs_n, k0 : k0 + BLOCK_K] of the NF4 weight W [N, K]; float32, or bf16 when
    the aligned path decodes in registers (DECODE_REGISTERS_*: ``decode_nf4_pairs``).

    Out-of-range elements come back finite (the caller masks them out of its product or its store). Element (n, k)
    is flat index n·K + k: its byte is index // 2 (high nibble when the index is even), its block index // BLOCKSIZE.

    ALIGNED_ROWS (K % BLOCKSIZE == 0, so K is even and every row starts a byte and a block): the tile is read as
    [BLOCK_N, BLOCK_K / 2] contiguous bytes per row (wide loads), one absmax per row and run of
    GROUP = min(BLOCK_K, BLOCKSIZE) columns. Otherwise (a row may start mid-byte or mid-block): one byte, nibble and
    absmax gather per element - correct for any K, slower. ``k0`` is a multiple of BLOCK_K.

    The levels come from a gather in the 16-entry float32 table ``code_ptr``: 64 bytes, so a warp's 32 lookups
    touch one cache line (a 256-entry table of level pairs halves the gathers but spreads each warp's lookups over
    ~14 lines of L1).
    """
    mask_n = offs_n < N
    if ALIGNED_ROWS:
        GROUP: tl.constexpr = min(BLOCK_K, BLOCKSIZE)
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        PAIRS: tl.constexpr = GROUP // 2
        # Bytes per row written so that the compiler sees a multiple of BLOCKSIZE / 2 >= 16 (16-byte row starts,
        # hence 16-byte loads); likewise the tile's first byte column, a multiple of BLOCK_K / 2.
        row_bytes = (K // BLOCKSIZE) * (BLOCKSIZE // 2)
        first_pair = tl.multiple_of(k0 // 2, BLOCK_K // 2)
        offs_g = tl.arange(0, GROUPS)
        col_pair = first_pair + offs_g[:, None] * PAIRS + tl.arange(0, PAIRS)[None, :]  # [GROUPS, PAIRS]
        byte_ptrs = packed_ptr + offs_n[:, None, None] * row_bytes + col_pair[None, :, :]
        mask_byte = mask_n[:, None, None] & (col_pair < row_bytes)[None, :, :]
        byte = tl.load(byte_ptrs, mask=mask_byte, other=0)
        col_group = k0 + offs_g * GROUP
        block = offs_n[:, None] * (K // BLOCKSIZE) + (col_group // BLOCKSIZE)[None, :]
        mask_block = mask_n[:, None] & (col_group < K)[None, :]
        absmax = _block_absmax(
            block, mask_block, absmax_ptr, nested_absmax_ptr, offset_ptr, nested_code_ptr, HAS_DOUBLE_QUANT, NESTED
        )[:, :, None]
        if DECODE == DECODE_GATHER:
            byte = byte.to(tl.int32)
            w_hi = tl.load(code_ptr + (byte >> 4)) * absmax
            w_lo = tl.load(code_ptr + (byte & 0xF)) * absmax
        else:
            w_hi, w_lo = decode_nf4_pairs(byte, tl.broadcast_to(absmax, byte.shape), code_ptr, words, DECODE)
        # [BLOCK_N, GROUPS, PAIRS, 2] -> [BLOCK_N, BLOCK_K]: column g·GROUP + 2p + j, j = 0 for the high nibble.
        w = tl.reshape(tl.join(w_hi, w_lo), [BLOCK_N, BLOCK_K])
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        index = offs_n[:, None] * K + offs_k[None, :]
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        byte = tl.load(packed_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> (4 - 4 * (index & 1)).to(tl.int32)) & 0xF
        absmax = _block_absmax(
            index // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, offset_ptr, nested_code_ptr,
            HAS_DOUBLE_QUANT, NESTED,
        )
        w = tl.load(code_ptr + nibble) * absmax
    return w


# ------------------------------------------------------------------------------- MMA-order tiles (no round trip)
#
# wgmma takes its left operand from registers in a fixed layout: lane (g = lane / 4, t = lane % 4) of warp w holds,
# per 16-column step j, rows 16w + g and 16w + g + 8 and columns 2t, 2t + 1, 2t + 8, 2t + 9. Decoded from a row-major
# tile those values sit in other threads (4 bytes apart in memory), so Triton converts the decoded tile through
# shared memory: a store and a read back of every weight (issue 11; the largest shared-memory user of the forward
# GEMMs in the static model). A dot product does not care in which order it sums, so the forward GEMM may give the
# MMA its K columns in any order, as long as x's columns follow the same one. In "MMA order" the tile's slot
# s = 16j + 8h + 2t + e (j the 16-column step, h the half, t the lane's column pair, e the nibble) holds column
# (BLOCK_K / 4)·t + 4j + 2h + e: the bytes that lane t of a row decodes are then BLOCK_K / 8 contiguous ones
# (one 16-byte load at BLOCK_K = 128), and the tile comes out of the decode already in the operand's layout
# (no shared memory; Triton 3.6, the H200's, compiles it so: compile_check shows no STS / LDSM in the loop).


@triton.jit
def mma_order_columns(k0, BLOCK_K: tl.constexpr):
    """[BLOCK_K]: the column of the weight (and of x) that each slot of an MMA-order tile starting at column ``k0``
    holds (slot s = 16j + 8h + 2t + e <- k0 + (BLOCK_K / 4)·t + 4j + 2h + e)."""
    s = tl.arange(0, BLOCK_K)
    return k0 + (BLOCK_K // 4) * ((s // 2) % 4) + 4 * (s // 16) + 2 * ((s // 8) % 2) + (s % 2)


_NF4_DECODE_WORD_PTX = tl.constexpr(nf4_asm.ptx(word_input=True))
_NF4_DECODE_WORD_CONSTRAINTS = tl.constexpr(nf4_asm.CONSTRAINTS_WORD)


@triton.jit
def _word_bytes_last(b0, b1, b2, b3, WARPS: tl.constexpr, REP: tl.constexpr, C: tl.constexpr):
    # [t, g, w, i, rep, q] x 4 (byte j of each word) -> [t, g, w, i, rep, c], byte j of word q at c = 4q + j:
    # registers side by side, no data movement.
    v = tl.join(tl.join(b0, b1), tl.join(b2, b3))  # [..., q, j % 2, j // 2]
    v = tl.permute(v, [0, 1, 2, 3, 4, 5, 7, 6])
    return tl.reshape(v, [4, 8, WARPS, 2, REP, C])


@triton.jit
def load_nf4_tile_mma_order(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr,
    n0, k0, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARPS: tl.constexpr,
    BLOCKSIZE: tl.constexpr, HAS_DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    DECODE: tl.constexpr, words,
):
    """[BLOCK_N, BLOCK_K] bf16: rows n0 .. n0 + BLOCK_N of deq(W), columns ``mma_order_columns(k0, BLOCK_K)`` in
    that order, decoded in registers (DECODE_REGISTERS_*; the block-aligned path, K % BLOCKSIZE == 0, the packed
    bytes 16-byte aligned: they are read as int32 words). Needs BLOCK_N a multiple of 16·WARPS, BLOCK_K a power of
    two from 32 to 4·BLOCKSIZE (a lane's bytes of a row then lie in one block). WARPS (the launch's warps) decides
    which rows each warp loads: the operand layout's; another value gives the same numbers, through Triton's
    conversion. Out-of-range elements come back finite."""
    REP: tl.constexpr = BLOCK_N // (16 * WARPS)
    C: tl.constexpr = BLOCK_K // 8  # bytes a lane decodes per row and tile
    Q: tl.constexpr = C // 4  # as int32 words: the asm's input stays one word of one row (no byte re-packing)
    # Dimensions [t, g, w, i, rep, q], in the order Triton gives lanes (t, then g) and warps (w) to a row-major load:
    # row n0 + 16·(rep·WARPS + w) + 8·i + g, word column k0 / 8 + Q·t + q.
    t = tl.arange(0, 4)[:, None, None, None, None, None]
    g = tl.arange(0, 8)[None, :, None, None, None, None]
    w = tl.arange(0, WARPS)[None, None, :, None, None, None]
    i = tl.arange(0, 2)[None, None, None, :, None, None]
    rep = tl.arange(0, REP)[None, None, None, None, :, None]
    q = tl.arange(0, Q)[None, None, None, None, None, :]
    row = n0 + 16 * (rep * WARPS + w) + 8 * i + g
    mask_row = row < N
    row_words = (K // BLOCKSIZE) * (BLOCKSIZE // 8)  # a multiple of BLOCKSIZE / 8: 16-byte row starts
    col = tl.multiple_of(k0 // 8, BLOCK_K // 8) + Q * t + q
    word_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    word = tl.load(word_ptr + row * row_words + col, mask=mask_row & (col < row_words), other=0)
    first = k0 + (BLOCK_K // 4) * t  # a lane's columns of a row: one block
    block = row * (K // BLOCKSIZE) + first // BLOCKSIZE
    absmax = _block_absmax(
        block, mask_row & (first < K), absmax_ptr, nested_absmax_ptr, offset_ptr, nested_code_ptr,
        HAS_DOUBLE_QUANT, NESTED,
    )
    if DECODE == DECODE_REGISTERS_ASM:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            _NF4_DECODE_WORD_PTX, _NF4_DECODE_WORD_CONSTRAINTS,
            [word, tl.broadcast_to(absmax, word.shape), words[0], words[1], words[2], words[3]],
            (tl.int32, tl.int32, tl.int32, tl.int32), True, 1,
        )
        pair = _word_bytes_last(p0, p1, p2, p3, WARPS, REP, C)  # [t, g, w, i, rep, c]: byte c of the lane's run
        w_hi, w_lo = _split_pairs(pair)
    else:
        byte = _word_bytes_last(
            word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF, (word >> 24) & 0xFF, WARPS, REP, C
        )
        w_hi, w_lo = decode_nf4_pairs(
            byte.to(tl.uint8), tl.broadcast_to(absmax, byte.shape), code_ptr, words, DECODE
        )
    tile = tl.join(w_hi, w_lo)  # [t, g, w, i, rep, c, e]
    tile = tl.reshape(tile, [4, 8, WARPS, 2, REP, C // 2, 2, 2])  # c = 2j + h
    tile = tl.permute(tile, [4, 2, 3, 1, 5, 6, 0, 7])  # [rep, w, i, g, j, h, t, e]
    return tl.reshape(tile, [BLOCK_N, BLOCK_K])
