"""The register decode (triton_kernels/nf4_asm.py): its prmt program, checked bit for bit on CPU by running the
program's own emulation; its plain-Triton twin under the interpreter; the compiled asm against the twin on a GPU."""

from __future__ import annotations

import random
import re

import pytest
import torch
from qlora_kernels import reference
from qlora_kernels.triton_kernels import decode_check
from qlora_kernels.triton_kernels import lora_linear as launch
from qlora_kernels.triton_kernels import lora_linear_tiles as tiles
from qlora_kernels.triton_kernels import nf4_asm

CODE = reference.nf4_code(torch.device("cpu"))


def expected_bits(nibble: int, absmax: float) -> int:
    """bf16(bf16(level) · bf16(absmax)) as a 16-bit pattern: what the program must produce."""
    level = CODE[nibble].to(torch.bfloat16).float()
    scale = torch.tensor(absmax, dtype=torch.float32).to(torch.bfloat16).float()
    return (level * scale).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF


def unpack(regs: dict[str, int]) -> tuple[list[int], list[int]]:
    """(high-nibble weights, low-nibble weights) of the 4 bytes, as 16-bit patterns, from the output registers:
    register $p<j> holds byte j's pair, the high nibble's weight (the even column) in its low half."""
    hi = [regs[f"$p{j}"] & 0xFFFF for j in range(4)]
    lo = [regs[f"$p{j}"] >> 16 for j in range(4)]
    return hi, lo


ABSMAX = [1.0, 0.0, 0.0123, 3.7e-5, 2.5, 1e30, 1.17e-38, 0.5 + 2**-12]


@pytest.mark.parametrize("position", range(4))
def test_program_decodes_every_byte_in_every_position(position):
    rng = random.Random(position)
    for byte in range(256):
        others = [rng.randrange(256) for _ in range(4)]
        others[position] = byte
        word = others[0] | others[1] << 8 | others[2] << 16 | others[3] << 24
        absmax = [rng.choice(ABSMAX) * rng.uniform(0.5, 1.0) for _ in range(4)]
        hi, lo = unpack(nf4_asm.emulate(word, absmax))
        for j in range(4):
            assert hi[j] == expected_bits(others[j] >> 4, absmax[j]), (byte, j, hex(hi[j]))
            assert lo[j] == expected_bits(others[j] & 0xF, absmax[j]), (byte, j, hex(lo[j]))


def test_program_keeps_each_weights_own_absmax():
    # The four weights of one call may come from different blocks (or rows): each gets its own absmax.
    word = 0xF7_80_1E_C3
    absmax = [0.25, 3.0, 1e-3, 7.5]
    hi, lo = unpack(nf4_asm.emulate(word, absmax))
    for j, byte in enumerate([0xC3, 0x1E, 0x80, 0xF7]):
        assert hi[j] == expected_bits(byte >> 4, absmax[j])
        assert lo[j] == expected_bits(byte & 0xF, absmax[j])


def test_codebook_words_are_the_bf16_levels():
    words = nf4_asm.codebook_words()
    for n in range(16):
        table = words[f"TL{n // 4}"], words[f"TH{n // 4}"]
        bits = ((table[0] >> (8 * (n % 4))) & 0xFF) | ((table[1] >> (8 * (n % 4))) & 0xFF) << 8
        assert bits == CODE[n].to(torch.bfloat16).view(torch.int16).item() & 0xFFFF, n


def test_ptx_text_matches_the_program_and_the_operand_list():
    text = nf4_asm.ptx()
    body = [line for line in text.splitlines() if line.endswith(";") and not line.startswith(".reg")]
    assert len(body) == nf4_asm.instruction_count() == len(nf4_asm.PROGRAM)
    operands = {int(m) for m in re.findall(r"\$(\d+)", text)}
    assert max(operands) < len(nf4_asm.CONSTRAINTS.split(","))
    # Every output register is written and every input read; the register words come in as operands.
    assert {0, 1, 2, 3} <= operands and 4 in operands
    for name in nf4_asm.REGISTER_WORDS:
        assert f"${nf4_asm.OPERANDS[name]}" in text
    # The other words are immediates with their values.
    for name, value in nf4_asm.codebook_words().items():
        if name not in nf4_asm.REGISTER_WORDS:
            assert str(value) in text, name
    # The word form (pack=1): the same instructions on other operand numbers - outputs $0-$3, the word $4, one
    # absmax $5 for the word's four bytes, one register per codebook word; nothing past the constraint list.
    word = nf4_asm.ptx(word_input=True)
    assert [re.sub(r"\$\d+", "$", x) for x in word.splitlines()] == [re.sub(r"\$\d+", "$", x) for x in text.splitlines()]
    constraints = nf4_asm.CONSTRAINTS_WORD.split(",")
    assert constraints == ["=r"] * 4 + ["r"] * 6
    assert {int(m) for m in re.findall(r"\$(\d+)", word)} == set(range(len(constraints)))
    assert sorted(nf4_asm.OPERANDS_WORD[n] for n in nf4_asm.REGISTER_WORDS) == [6, 7, 8, 9]


def test_code_table_carries_the_register_words():
    table = tiles.nf4_levels(torch.device("cpu"))
    assert table.dtype == torch.float32 and table.numel() == 16 + len(nf4_asm.REGISTER_WORDS)
    torch.testing.assert_close(table[:16], CODE, rtol=0, atol=0)
    words = table[16:].view(torch.int32).tolist()
    expected = [nf4_asm.codebook_words()[w] for w in nf4_asm.REGISTER_WORDS]
    assert [w & 0xFFFFFFFF for w in words] == expected


def _decode(device, decode: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, cols = decode_check.ROWS, decode_check.COLS
    byte = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    pick = torch.randint(0, len(ABSMAX), (rows, cols), generator=g)
    absmax = torch.rand(rows, cols, generator=g) * torch.tensor(ABSMAX)[pick]
    hi, lo = decode_check.decode_pairs(byte.to(device), absmax.to(device), decode)
    return byte, absmax, hi.cpu(), lo.cpu()


def _to_bf16(x: torch.Tensor, truncate: bool) -> torch.Tensor:
    """float32 -> bf16, rounded to nearest even (a GPU) or truncated (Triton's interpreter, DESIGN.md)."""
    if not truncate:
        return x.to(torch.bfloat16)
    return ((x.view(torch.int32) >> 16).to(torch.int16)).view(torch.bfloat16)


def _expected(byte, absmax, truncate=False):
    b = byte.long()
    scale = _to_bf16(absmax, truncate).float()
    hi = _to_bf16(_to_bf16(CODE[b >> 4], truncate).float() * scale, truncate)
    lo = _to_bf16(_to_bf16(CODE[b & 0xF], truncate).float() * scale, truncate)
    return hi, lo


def test_twin_computes_the_programs_bits(triton_device):
    # The interpreter truncates where a GPU rounds (its one bf16 defect that matters here): on CPU the twin must give
    # the truncated bits exactly, on a GPU the rounded ones, and there the emulated program too.
    # (subnormal products differ too, between numpy and torch on CPU: those elements are compared on a GPU only).
    byte, absmax, hi, lo = _decode(triton_device, tiles.DECODE_REGISTERS_TWIN.value)
    interpreted = triton_device.type == "cpu"
    want_hi, want_lo = _expected(byte, absmax, truncate=interpreted)
    for got, want in ((hi, want_hi), (lo, want_lo)):
        tiny = torch.finfo(torch.float32).tiny
        normal = (absmax >= tiny) & ((want.float().abs() >= tiny) | (want == 0)) if interpreted else True
        assert torch.equal(torch.where(normal, got, 0).view(torch.int16), torch.where(normal, want, 0).view(torch.int16))
        assert not interpreted or normal.float().mean() > 0.6
    if interpreted:
        return
    flat_b, flat_a = byte.reshape(-1, 4), absmax.reshape(-1, 4)
    for i in range(0, flat_b.shape[0], 17):
        word = sum(int(flat_b[i, j]) << (8 * j) for j in range(4))
        regs_hi, regs_lo = unpack(nf4_asm.emulate(word, flat_a[i].tolist()))
        assert regs_hi == [v & 0xFFFF for v in hi.reshape(-1, 4)[i].view(torch.int16).tolist()]
        assert regs_lo == [v & 0xFFFF for v in lo.reshape(-1, 4)[i].view(torch.int16).tolist()]


@pytest.mark.gpu
def test_compiled_asm_matches_the_twin_bit_for_bit():
    # The one thing the CPU cannot check: how Triton hands packed operands to the inline asm and takes its outputs.
    device = torch.device("cuda")
    assert decode_check.register_decode_works(device)
    for seed in range(3):
        byte, absmax, hi, lo = _decode(device, tiles.DECODE_REGISTERS_ASM.value, seed=seed)
        _, _, twin_hi, twin_lo = _decode(device, tiles.DECODE_REGISTERS_TWIN.value, seed=seed)
        assert torch.equal(hi.view(torch.int16), twin_hi.view(torch.int16))
        assert torch.equal(lo.view(torch.int16), twin_lo.view(torch.int16))
        want_hi, want_lo = _expected(byte, absmax)
        assert torch.equal(hi.view(torch.int16), want_hi.view(torch.int16))


def test_decode_mode_follows_dtype_and_the_override(monkeypatch):
    monkeypatch.delenv("QLORA_KERNELS_NF4_DECODE", raising=False)
    registers = tiles.DECODE_REGISTERS_TWIN.value if launch.interpreting() else tiles.DECODE_REGISTERS_ASM.value
    assert launch.decode_mode(torch.bfloat16) == registers
    assert launch.decode_mode(torch.float16) == launch.decode_mode(torch.float32) == tiles.DECODE_GATHER.value
    monkeypatch.setenv("QLORA_KERNELS_NF4_DECODE", "gather")
    assert launch.decode_mode(torch.bfloat16) == tiles.DECODE_GATHER.value
    monkeypatch.setenv("QLORA_KERNELS_NF4_DECODE", "twin")
    assert launch.decode_mode(torch.bfloat16) == tiles.DECODE_REGISTERS_TWIN.value
    assert launch.decode_mode(torch.float16) == tiles.DECODE_GATHER.value
    monkeypatch.setenv("QLORA_KERNELS_NF4_DECODE", "asm-please")
    with pytest.raises(ValueError, match="QLORA_KERNELS_NF4_DECODE"):
        launch.decode_mode(torch.bfloat16)


@pytest.mark.parametrize("M", [1, 33])
def test_bf16_fused_forward_is_right_with_either_decode(triton_device, monkeypatch, M):
    # Both bf16 decodes against the float64 reference (DESIGN.md's bf16 tolerance), through the launcher.
    import qlora_kernels as qk
    from qlora_kernels import reference as ref

    N, K, r = 96, 192, 8
    w4 = qk.NF4Weight.quantize(torch.randn(N, K, dtype=torch.float32).to(triton_device) * K**-0.5)
    x = torch.randn(M, K, device=triton_device).to(torch.bfloat16)
    a = (torch.randn(r, K, device=triton_device) * K**-0.5).to(torch.bfloat16)
    b = (torch.randn(N, r, device=triton_device) * r**-0.5).to(torch.bfloat16)
    storage = w4.op_storage()
    want, _ = ref.nf4_lora_linear_fwd(x.double(), *storage, a.double(), b.double(), 2.0, None, 0.0, None)
    outs = {}
    for mode in ("gather", "twin"):
        monkeypatch.setenv("QLORA_KERNELS_NF4_DECODE", mode)
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=triton_device)
        outs[mode], _ = launch.nf4_lora_linear_fwd(x, *storage, a, b, 2.0, None, 0.0, None, out=out)
        err = ((outs[mode].double() - want).norm() / want.norm()).item()
        assert err < 1e-2, (mode, err)
        assert torch.isfinite(outs[mode]).all()


def test_check_tile_holds_every_byte_in_every_word_position():
    byte, absmax = decode_check.check_tile(torch.device("cpu"))
    words = byte.reshape(-1, 4)
    for position in range(4):
        assert set(words[:, position].tolist()) == set(range(256)), position
    assert absmax.min() > 0 and absmax.max() < 1e31 and torch.isfinite(absmax).all()


@pytest.mark.parametrize("outcome", ["same", "different", "different tile", "error"])
def test_first_use_check_disables_a_wrong_asm_with_a_warning(monkeypatch, outcome):
    # Both checks (the byte form's pairs, the word form's MMA-order tile) must agree for the asm to be used.
    calls = []

    def fake(byte, absmax, decode):
        calls.append(decode)
        if outcome == "error":
            raise RuntimeError("ptxas failed")
        hi = torch.zeros(byte.shape, dtype=torch.bfloat16)
        if outcome == "different" and decode == tiles.DECODE_REGISTERS_ASM.value:
            hi[3, 5] = 1.0
        return hi, hi.clone()

    def fake_tile(byte, absmax, decode):
        calls.append(decode)
        assert absmax.shape == (decode_check.ROWS, 2 * decode_check.COLS // 64)
        tile = torch.zeros(decode_check.ROWS, 2 * decode_check.COLS, dtype=torch.bfloat16)
        if outcome == "different tile" and decode == tiles.DECODE_REGISTERS_ASM.value:
            tile[7, 100] = -2.0
        return tile

    monkeypatch.setattr(decode_check, "decode_pairs", fake)
    monkeypatch.setattr(decode_check, "decode_mma_tile", fake_tile)
    monkeypatch.setattr(decode_check, "_VERIFIED", {})
    device = torch.device("cpu")
    if outcome == "same":
        assert decode_check.register_decode_works(device)
    else:
        with pytest.warns(RuntimeWarning, match="register decode .* disabled"):
            assert not decode_check.register_decode_works(device)
    n = len(calls)
    assert decode_check.register_decode_works(device) == (outcome == "same")  # cached: checked once per device
    assert len(calls) == n


def test_mma_tile_check_decodes_like_the_pairs_check():
    # The word form's check tile holds the pairs check's bytes: its twin weights are theirs, with one absmax per
    # block, in MMA order.
    byte, absmax = decode_check.check_tile(torch.device("cpu"))
    blocks = absmax[:, ::32].contiguous()
    tile = decode_check.decode_mma_tile(byte, blocks, tiles.DECODE_REGISTERS_TWIN.value)
    hi, lo = decode_check.decode_pairs(byte, blocks.repeat_interleave(32, dim=1), tiles.DECODE_REGISTERS_TWIN.value)
    row_major = torch.stack([hi, lo], dim=2).reshape(decode_check.ROWS, 2 * decode_check.COLS)
    cols = torch.tensor([c for k0 in range(0, 2 * decode_check.COLS, 128) for c in _mma_columns(k0, 128)])
    assert torch.equal(tile.view(torch.int16), row_major[:, cols].view(torch.int16))
    with pytest.raises(ValueError, match="absmax"):
        decode_check.decode_mma_tile(byte, absmax, tiles.DECODE_REGISTERS_TWIN.value)


def _mma_columns(k0: int, block_k: int) -> list:
    # lora_linear_tiles.mma_order_columns, in Python: slot s = 16j + 8h + 2t + e <- k0 + (block_k/4)t + 4j + 2h + e.
    return [k0 + block_k // 4 * ((s // 2) % 4) + 4 * (s // 16) + 2 * ((s // 8) % 2) + s % 2 for s in range(block_k)]


def test_decode_pairs_refuses_wrong_tiles():
    byte, absmax = decode_check.check_tile(torch.device("cpu"))
    with pytest.raises(ValueError, match="byte"):
        decode_check.decode_pairs(byte[:8], absmax, tiles.DECODE_REGISTERS_TWIN.value)
    with pytest.raises(ValueError, match="absmax"):
        decode_check.decode_pairs(byte, absmax.double(), tiles.DECODE_REGISTERS_TWIN.value)
