"""A once-per-device check of the register decode's inline asm against its plain-Triton twin, before the bf16 GEMMs
use it (issue 11: "nothing silently wrong").

The asm (``nf4_asm``) is checked bit for bit on CPU by emulating its program, but how Triton hands the packed
operands to the asm and takes its outputs can only be seen on a GPU. So the first bf16 GEMM launch on a CUDA device
decodes a fixed tile of every byte value with both (``_decode_pairs_kernel``: a few microseconds, two small
compiles) and compares the bits; likewise the word form of the asm that the forward's MMA-order tiles use
(``_decode_mma_tile_kernel``: the same bytes as 16 weight rows of 128, through ``load_nf4_tile_mma_order``). On a
mismatch the GEMMs fall back to the gather decode on that device, with a warning that says so;
``QLORA_KERNELS_NF4_DECODE`` (``lora_linear.decode_mode``) overrides either way.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from . import lora_linear_tiles as tiles

_VERIFIED: dict[torch.device, bool] = {}
ROWS, COLS = 16, 64  # 1024 bytes: every byte value four times, in every position of a packed word


@triton.jit
def _decode_pairs_kernel(byte_ptr, absmax_ptr, code_ptr, hi_ptr, lo_ptr, ROWS: tl.constexpr, COLS: tl.constexpr,
                         DECODE: tl.constexpr):
    # hi/lo [ROWS, COLS] bf16 = decode_nf4_pairs of the uint8 bytes and float32 absmax [ROWS, COLS].
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    byte = tl.load(byte_ptr + offs)
    absmax = tl.load(absmax_ptr + offs)
    words = tiles.nf4_register_words(code_ptr, DECODE)
    hi, lo = tiles.decode_nf4_pairs(byte, absmax, code_ptr, words, DECODE)
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


@triton.jit
def _decode_mma_tile_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr,
                            DECODE: tl.constexpr):
    # out [ROWS, 2·COLS] bf16 = load_nf4_tile_mma_order of ROWS weight rows of 2·COLS, packed [ROWS, COLS] bytes,
    # float32 absmax [ROWS, 2·COLS / 64] (one warp: WARPS = 1).
    words = tiles.nf4_register_words(code_ptr, DECODE)
    k0 = tl.program_id(0) * (2 * COLS)  # 0, as the GEMM's loop variable is: a value, not a constant
    w = tiles.load_nf4_tile_mma_order(
        packed_ptr, absmax_ptr, absmax_ptr, absmax_ptr, code_ptr, code_ptr, 0, k0, ROWS, 2 * COLS,
        ROWS, 2 * COLS, 1, 64, False, 256, DECODE, words,
    )
    offs = tl.arange(0, ROWS)[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    tl.store(out_ptr + offs, w)


def decode_mma_tile(byte: torch.Tensor, absmax: torch.Tensor, decode: int) -> torch.Tensor:
    """bf16 [ROWS, 2·COLS]: the [ROWS, COLS] uint8 tile as ROWS weight rows (blocks of 64, float32 ``absmax``
    [ROWS, 2·COLS / 64]) through the forward's MMA-order tile loader, by the ``decode`` mode; for checks and tests."""
    if byte.shape != (ROWS, COLS) or byte.dtype != torch.uint8:
        raise ValueError(f"byte must be uint8 [{ROWS}, {COLS}], got {byte.dtype} {tuple(byte.shape)}")
    blocks = (ROWS, 2 * COLS // 64)
    if absmax.shape != blocks or absmax.dtype != torch.float32 or absmax.device != byte.device:
        raise ValueError(f"absmax must be float32 {list(blocks)} on {byte.device}")
    out = torch.full((ROWS, 2 * COLS), float("nan"), dtype=torch.bfloat16, device=byte.device)
    _decode_mma_tile_kernel[(1,)](byte.contiguous(), absmax.contiguous(), tiles.nf4_levels(byte.device), out,
                                  ROWS=ROWS, COLS=COLS, DECODE=decode, num_warps=1)
    return out


def decode_pairs(byte: torch.Tensor, absmax: torch.Tensor, decode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) bf16 weights of a [ROWS, COLS] uint8 tile and its float32 absmax, by the ``decode`` mode
    (``lora_linear_tiles.DECODE_REGISTERS_*``): one program, for checks and tests."""
    if byte.shape != (ROWS, COLS) or byte.dtype != torch.uint8:
        raise ValueError(f"byte must be uint8 [{ROWS}, {COLS}], got {byte.dtype} {tuple(byte.shape)}")
    if absmax.shape != (ROWS, COLS) or absmax.dtype != torch.float32 or absmax.device != byte.device:
        raise ValueError(f"absmax must be float32 [{ROWS}, {COLS}] on {byte.device}")
    hi = torch.full((ROWS, COLS), float("nan"), dtype=torch.bfloat16, device=byte.device)
    lo = torch.full_like(hi, float("nan"))
    _decode_pairs_kernel[(1,)](byte.contiguous(), absmax.contiguous(), tiles.nf4_levels(byte.device), hi, lo,
                               ROWS=ROWS, COLS=COLS, DECODE=decode)
    return hi, lo


def check_tile(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed check input on ``device``: every byte value in every byte position of a word, absmax spanning
    1e-30 to 1e30."""
    byte = torch.arange(ROWS * COLS, dtype=torch.int64)
    byte = ((byte * 37 + (byte // 256)) % 256).to(torch.uint8).reshape(ROWS, COLS)
    exponent = torch.linspace(-30, 30, ROWS * COLS, dtype=torch.float64)
    absmax = (10.0**exponent).to(torch.float32).reshape(ROWS, COLS)
    return byte.to(device), absmax.to(device)


def register_decode_works(device: torch.device) -> bool:
    """Whether the inline asm decodes exactly like its twin on ``device`` (checked once per device, cached). A
    failure (different bits, or an error compiling or running the asm) warns and returns False. Inside CUDA-graph
    capture an unchecked device answers False without checking (a capture cannot synchronise)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _VERIFIED and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # no check inside CUDA-graph capture (it synchronises): the gather decode, until checked
    if device not in _VERIFIED:
        try:
            byte, absmax = check_tile(device)
            asm = decode_pairs(byte, absmax, tiles.DECODE_REGISTERS_ASM.value)
            twin = decode_pairs(byte, absmax, tiles.DECODE_REGISTERS_TWIN.value)
            blocks = absmax[:, ::32].contiguous()  # one absmax per block of 64 weights (32 bytes)
            asm += (decode_mma_tile(byte, blocks, tiles.DECODE_REGISTERS_ASM.value),)
            twin += (decode_mma_tile(byte, blocks, tiles.DECODE_REGISTERS_TWIN.value),)
            ok = all(torch.equal(a.view(torch.int16), t.view(torch.int16)) for a, t in zip(asm, twin))
            problem = "its weights differ from the plain-Triton twin's"
        except Exception as exc:  # noqa: BLE001 - any failure of the asm path means: do not use it
            ok, problem = False, f"it failed: {type(exc).__name__}: {exc}"
        if not ok:
            warnings.warn(
                f"qlora_kernels: the bf16 register decode (inline asm) is disabled on {device}: {problem}. The "
                "GEMMs use the gather decode there (correct, slower). Please report this with your GPU and Triton "
                f"version (triton {triton.__version__}).",
                RuntimeWarning,
                stacklevel=3,
            )
        _VERIFIED[device] = ok
    return _VERIFIED[device]
