"""The static H200 model (triton_kernels/sass_model.py): SASS parsing, main-loop counting, bounds, the committed model.

Thresholds on real kernels are asserted in tests/test_sm90_compile.py, on the compile check's fresh output; here the
model's arithmetic is checked on hand-written SASS, and ``modelled_time_us`` on the committed model.
"""

from __future__ import annotations

import math

import pytest

from qlora_kernels.triton_kernels import sass_model as sm

# A kernel with a set-up loop (no MMA) and a main loop with two HGMMA (one with its A operand in registers).
SASS = """
        Function : _some_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   IADD3 R2, R0, 0x1, RZ ;
        /*0030*/               @P0 BRA 0x20 ;
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0050*/                   LDS.U8 R8, [R9] ;
        /*0060*/                   LDS.64 R10, [R9+0x10] ;
        /*0070*/                   LOP3.LUT R12, R8, 0xf, RZ, 0xc0, !PT ;
        /*0080*/                   FMUL R13, R12, R14 ;
        /*0090*/                   F2FP.BF16.F32.PACK_AB R15, R13, R13 ;
        /*00a0*/                   HGMMA.64x64x16.F32.BF16 R24, R64, gdesc[UR8], R24 ;
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*00c0*/                   UIADD3 UR4, UR4, 0x40, URZ ;
        /*00d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00e0*/              @!P1 BRA 0x40 ;
        /*00f0*/                   STG.E.U16 desc[UR4][R2.64], R15 ;
        /*0100*/                   EXIT ;
        /*0110*/                   BRA 0x110;
"""


def test_parser_reads_every_instruction_and_finds_the_loops():
    instrs = sm.parse_sass(SASS)
    assert [i.opcode for i in instrs][:4] == ["MOV", "S2R", "IADD3", "BRA"]
    assert len(instrs) == 18
    # (0x20 .. 0x30) and (0x40 .. 0xe0); "BRA 0x110" to itself is the end-of-kernel trap, not a loop.
    assert sm.loops(instrs) == [(2, 3), (4, 14)]


def test_main_loop_is_the_loop_with_the_mma_and_is_counted_by_class():
    st = sm.loop_stats(SASS)
    assert st["scope"] == "loop" and st["loop_first_address"] == 0x40
    assert st["instructions"] == 11 and st["mma"] == 2 and st["non_mma"] == 9
    by = st["by_class"]
    assert (by["global_load"], by["shared_load"], by["integer"], by["fp"], by["convert"]) == (1, 2, 1, 1, 1)
    assert (by["uniform"], by["sync"], by["branch"]) == (1, 1, 1)
    # LDS.U8 moves 32 bytes a warp, LDS.64 256; HGMMA 64x64x16: B = 64·16·2 bytes, A (second one only) the same,
    # a warp's quarter of the warpgroup's.
    assert st["shared_bytes_per_warp"] == 32 + 256 + (2048 // 4) + (4096 // 4)
    # Shared memory serves a 128-byte wavefront a clock: the 1-byte LDS.U8 takes a whole one, LDS.64 two, the
    # HGMMA operand reads their bytes / 128.
    assert st["shared_wavefronts_per_warp"] == 1 + 2 + (2048 // 4) / 128 + (4096 // 4) / 128


def test_ldsm_counts_its_matrices():
    # SASS spells ldmatrix .x4 as LDSM.16.M88.4 (and the transposed LDSM.16.MT88.4): four 8x8 16-bit matrices.
    for mods, nbytes in ((".16.M88.4", 512), (".16.MT88.4", 512), (".16.M88.2", 256), (".16.M88", 128)):
        ins = sm.Instruction(0, "LDSM", mods, "R4, [R2]")
        assert sm._shared_bytes_per_warp(ins) == nbytes, mods
        assert sm._shared_wavefronts_per_warp(ins) == nbytes // 128, mods


def test_loopless_kernel_is_counted_whole():
    st = sm.loop_stats("""
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0010*/                   FMUL R3, R2, R2 ;
        /*0020*/                   STG.E desc[UR4][R4.64], R3 ;
        /*0030*/                   EXIT ;
        /*0040*/                   NOP ;
""")
    assert st["scope"] == "kernel" and st["instructions"] == 4 and st["loops"] == 0


def _result(non_mma: int, mma: int, bm: int, bn: int, bk: int, warps: int, family: str = "fwd_large_m",
            integer: int = 0, imad: int = 0, fp: int = 0, wavefronts: float = 0) -> dict:
    return {"family": family, "num_warps": warps, "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            "main_loop": {"non_mma": non_mma, "mma": mma, "shared_bytes_per_warp": 128 * wavefronts,
                          "shared_wavefronts_per_warp": wavefronts,
                          "by_class": {"integer": integer, "imad": imad, "fp": fp}}}


def test_closed_form_of_issue_over_tensor():
    # The issue's forward figure: 376 non-MMA instructions a warp, 8 warps, 128x128x64 -> 11.75 lane-instructions
    # per weight and issue / tensor = 16 · c / 128 rows = 1.47.
    fig = sm.per_iteration(_result(376, 32, 128, 128, 64, 8))
    assert fig["lane_instr_per_element"] == pytest.approx(11.75)
    assert fig["tensor_clocks"] == 512
    assert fig["issue_over_tensor"] == pytest.approx(16 * 11.75 / 128)


def test_integer_pipe_runs_at_half_the_issue_rate():
    # 64 INT32 lanes per SM: a warp's integer instruction holds its scheduler's share for 2 clocks.
    fig = sm.per_iteration(_result(376, 32, 128, 128, 64, 8, integer=300))
    assert fig["int_clocks"] == 300 * 8 * 32 / 64
    assert fig["int_over_tensor"] == pytest.approx(fig["int_clocks"] / 512)
    assert fig["int_lane_instr_per_element"] == pytest.approx(300 * 8 * 32 / (128 * 64))
    # An integer-heavy loop is bound by that pipe, not by issue.
    b = sm.gemm_bounds("fwd", _result(376, 32, 128, 128, 64, 8, integer=300), 4096, 4096, 4096, 16)
    assert b["bound"] == "int" and b["time_us"] == b["int_us"] > b["issue_us"]


def test_fma_pipe_takes_imad_at_half_rate():
    # FP32 / packed-half instructions one FMA-pipe slot each, IMAD (ptxas' shifts and moves) two.
    fig = sm.per_iteration(_result(376, 32, 128, 128, 64, 8, imad=100, fp=150))
    assert fig["fma_clocks"] == (2 * 100 + 150) * 8 / 4
    b = sm.gemm_bounds("fwd", _result(376, 32, 128, 128, 64, 8, imad=300, fp=100), 4096, 4096, 4096, 16)
    assert b["bound"] == "fma" and b["fma_us"] > max(b["issue_us"], b["int_us"], b["tensor_us"])
    # The classes: IMAD is its own, the logic / permute / add instructions the ALU's.
    assert sm.Instruction(0, "IMAD", ".MOV.U32", "R1, RZ, RZ, R2").op_class == "imad"
    assert sm.Instruction(0, "PRMT", "", "R1, R2, 0x7351, R3").op_class == "integer"
    assert sm.Instruction(0, "HMUL2", ".BF16_V2", "R1, R2, R3").op_class == "fp"


def test_bounds_take_waves_and_bytes_into_account():
    r = _result(100, 16, 128, 128, 64, 8, integer=80)
    b = sm.gemm_bounds("fwd", r, 4096, 4096, 4096, 16)
    programs = 32 * 32
    assert b["programs"] == programs and b["iterations"] == 64
    per_sm = math.ceil(programs / 132)
    assert b["tensor_us"] == pytest.approx(per_sm * 64 * 512 / 1.98e9 * 1e6)
    assert b["issue_us"] == pytest.approx(per_sm * 64 * 200 / 1.98e9 * 1e6)
    nbytes = sm.gemm_bytes("fwd", 4096, 4096, 4096, 16)
    assert nbytes > 4096 * 4096 // 2 + 2 * 2 * 4096 * 4096
    assert b["memory_us"] == pytest.approx(nbytes / 4.3e12 * 1e6)
    assert b["int_us"] == pytest.approx(per_sm * 64 * (80 * 8 * 32 / 64) / 1.98e9 * 1e6)
    assert b["time_us"] == max(b["tensor_us"], b["issue_us"], b["int_us"], b["fma_us"], b["shared_us"],
                               b["memory_us"])
    assert b["splits"] == 1


def test_split_capable_decode_configurations_split_as_their_launch_does():
    # M = 1 through 4096 x 4096 on 16x64x256 tiles: 64 output tiles, 16 reduction steps; the launch's rule
    # (_common.split_count / split_limit) splits 4 ways: 256 programs of 4 steps, the partial sums' bytes added.
    r = _result(100, 16, 16, 64, 256, 4, integer=80)
    unsplit = sm.gemm_bounds("fwd", r, 1, 4096, 4096, 16)
    assert unsplit["splits"] == 1 and unsplit["programs"] == 64 and unsplit["iterations"] == 16
    r["constexprs"]["SPLIT_K"] = True
    b = sm.gemm_bounds("fwd", r, 1, 4096, 4096, 16)
    assert b["splits"] == 4 and b["programs"] == 256 and b["iterations"] == 4
    assert b["issue_us"] == pytest.approx(unsplit["issue_us"] / 2)  # 2 programs per SM, a quarter of the steps
    nbytes = sm.gemm_bytes("fwd", 1, 4096, 4096, 16) + 2 * 4 * 4 * 1 * 4096
    assert b["memory_us"] == pytest.approx(nbytes / 4.3e12 * 1e6)
    # dX at M = 16: the partial sums' traffic allows two splits only.
    b16 = sm.gemm_bounds("dx", r, 16, 4096, 4096, 16)
    assert b16["splits"] == 2


def test_shared_memory_bound():
    # 100 wavefronts a warp and iteration, 8 warps: 800 clocks of the SM's shared memory against 512 tensor clocks.
    r = _result(100, 16, 128, 128, 64, 8, wavefronts=100)
    assert sm.per_iteration(r)["shared_clocks"] == 800
    b = sm.gemm_bounds("fwd", r, 4096, 4096, 4096, 16)
    per_sm = math.ceil(32 * 32 / 132)
    assert b["shared_us"] == pytest.approx(per_sm * 64 * 800 / 1.98e9 * 1e6)
    assert b["bound"] == "shared" and b["time_us"] == b["shared_us"] > b["tensor_us"]


def test_a_program_with_fewer_warps_than_schedulers_leaves_them_idle():
    # A warp stays on one of the SM's four schedulers: a 2-warp program alone on its SM (128 programs) gets half
    # the SM's issue slots, ALU, FMA pipe and tensor cores; two of them per SM (256 programs) get all of it.
    r2, r4 = (_result(200, 16, 16, 32, 256, w, family="fwd_small_m", integer=100, fp=50) for w in (2, 4))
    alone, full = sm.gemm_bounds("fwd", r2, 1, 4096, 4096, 16), sm.gemm_bounds("fwd", r4, 1, 4096, 4096, 16)
    assert alone["programs"] == full["programs"] == 128
    # Same instructions per warp, half the warps per program: with every scheduler busy that would halve the time.
    for key in ("issue_us", "int_us", "fma_us"):
        assert alone[key] == pytest.approx(full[key]), key
    # The same MMA work per program (the tile), on two of the four tensor cores.
    assert alone["tensor_us"] == pytest.approx(2 * full["tensor_us"])
    # Twice the rows in 256 programs of 2 warps: as many warp-instructions per SM as the 4-warp programs at N = 4096,
    # now on all four schedulers, so the same time.
    two_per_sm = sm.gemm_bounds("fwd", r2, 1, 8192, 4096, 16)
    assert two_per_sm["programs"] == 256
    assert two_per_sm["issue_us"] == pytest.approx(full["issue_us"])


def test_modelled_time_from_the_committed_model():
    model = sm._committed_model()
    assert model is not None, "no triton_kernels/sass_model.json: python -m qlora_kernels.triton_kernels.sass_model"
    assert model["triton"].startswith("3.6")
    for kind in ("fwd", "fwd_bwd"):
        for M in (1, 16, 4096):
            t = sm.modelled_time_us(kind, M, 4096, 4096, 16)
            assert t is not None and t > 0
    # Larger problems take longer; the backward adds to the forward; the floor is the weight's bytes.
    assert sm.modelled_time_us("fwd", 4096, 14336, 4096, 16) > sm.modelled_time_us("fwd", 4096, 4096, 4096, 16)
    assert sm.modelled_time_us("fwd_bwd", 4096, 4096, 4096, 16) > sm.modelled_time_us("fwd", 4096, 4096, 4096, 16)
    assert sm.modelled_time_us("fwd", 1, 4096, 4096, 16) >= 4096 * 4096 / 2 / 4.3e12 * 1e6
    assert sm.modelled_time_us("fwd", 1, 4096, 4096, 8) is None  # the model holds r = 16 only
    assert sm.modelled_time_us("fwd", 1, 4096, 4100, 16) is None  # per-element decode path: not modelled
    with pytest.raises(ValueError, match="kind"):
        sm.modelled_time_us("bwd", 1, 4096, 4096, 16)
