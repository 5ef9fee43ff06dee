"""A static H200 model of every kernel, from its sm_90 SASS main loop: a MODEL, never a measurement.

    python -m qlora_kernels.triton_kernels.sass_model [--report compile_check.json] [--json OUT] [--quick]

Without ``--report`` it runs the compile check (``compile_check.py``) first. For each kernel configuration it finds
the main loop in the SASS (the back-branch whose loop body holds the most MMA instructions, else the longest loop;
kernels without a loop are counted whole, per program) and counts, per warp and iteration: instructions by class,
MMA instructions, lane-instructions per element the iteration produces (a decoded weight for the GEMMs and the
dequantize kernel, an activation element for the thin passes, a weight for quantize), and shared-memory bytes moved.
From those and the tile sizes it bounds the time of each benchmark shape on an H200:

    tensor = programs_per_SM · iterations · BM·BN·BK / MMA_MACS_PER_CLOCK / CLOCK
    issue  = programs_per_SM · iterations · (non-MMA instructions per warp · warps) / SCHEDULERS / CLOCK
    int    = programs_per_SM · iterations · (integer-class instructions per warp · warps · 32) / INT_LANES / CLOCK
    fma    = programs_per_SM · iterations · ((2 · IMAD + FP32/packed-half instructions) per warp · warps) / SCHEDULERS
             / CLOCK
    shared = programs_per_SM · iterations · shared-memory wavefronts per CTA-iteration / CLOCK
    memory = compulsory bytes / HBM_BYTES_PER_S
    modelled time = max(tensor, issue, int, fma, shared, memory)   (perfect overlap; prologue and epilogue not
    counted)

``int`` is the ALU pipe: an SM has half as many INT32 lanes as FP32 lanes, so a loop of integer, logic and
byte-permute instructions (the NF4 decode) cannot run at the issue rate; each takes two clocks of its scheduler's
ALU. ``fma`` is the FMA pipe, which runs FP32 and packed-half arithmetic at one warp-instruction a clock and IMAD
(ptxas turns shifts and moves into IMAD.SHL / IMAD.MOV to take them off the ALU) at half that rate.
``shared`` is the SM's shared memory, which serves one 128-byte wavefront a clock (128 bytes a clock): a warp's
cp.async write, LDS, LDSM or STS takes ceil(bytes / 128) wavefronts, at least one (the layout conversions of the
decoded tile are among them), and wgmma reads its shared-memory operands once per warpgroup, bytes / 128.
A warp runs on one of the SM's four schedulers, each with its own ALU, FMA pipe and tensor core: where fewer warps
than schedulers are resident on an SM (programs_per_SM · warps < 4: a 2-warp program alone on its SM), the tensor,
issue, int and fma bounds scale up by 4 / (programs_per_SM · warps).
What the model leaves out, and the first GPU run must confirm: latencies and occupancy (it assumes every scheduler
in use finds a ready warp, and that a wave's programs are resident together), shared-memory bank conflicts, the
rates of other pipes (conversions, shuffles), L2 behaviour.

with programs_per_SM = ceil(programs / SMS) (wave quantisation). The assumptions are the constants in ``H200``.
The decode configurations (SPLIT_K) split the reduction as their launch does (``_common.split_count`` and
``split_limit``): programs =
output tiles · splits, iterations = reduction steps / splits, and the float32 partial sums (written by the splits,
read by ``_split_sum_kernel``, whose launch is not counted) add 8 · splits · M · out bytes to the memory bound.
``modelled_time_us(kind, M, N, K, r)`` answers from the committed ``sass_model.json`` (made by this tool under
Triton 3.6, the H200's) for the configuration the launcher's autotuning should find: the candidate with the least
modelled time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
from typing import Any, Optional

from ._common import split_count, split_limit


@dataclasses.dataclass(frozen=True)
class Machine:
    """Every assumption of the model, in one place."""

    name: str = "H200 (modelled)"
    sms: int = 132
    clock_hz: float = 1.98e9
    schedulers_per_sm: int = 4  # one warp-instruction per scheduler per clock, 100 % issue efficiency
    int_lanes_per_clock_per_sm: int = 64  # INT32 lanes (GH100: 64 per SM, half the FP32 lanes); IMAD's rate too
    hbm_bytes_per_s: float = 4.3e12  # HBM3e
    dense_bf16_flops: float = 989e12  # dense bf16 tensor-core peak (≈ 132 · 1.83e9 · 2 · 2048 · 2)
    mma_macs_per_clock_per_sm: int = 2048  # bf16 wgmma: BM·BN·BK / 2048 clocks per CTA-iteration
    shared_bytes_per_clock_per_sm: int = 128  # shared-memory bandwidth (32 banks of 4 bytes)
    lanes: int = 32

    @property
    def lane_instr_per_s(self) -> float:
        return self.sms * self.schedulers_per_sm * self.lanes * self.clock_hz


H200 = Machine()

# Benchmark shapes (bench/, issue 11): decode and training, r = 16, bf16, blocksize 64, double quantization.
WEIGHT_SHAPES = [(4096, 4096), (14336, 4096)]  # (N, K)
DECODE_M = [1, 16]
TRAINING_M = [4096, 8192]
RANK = 16
BLOCKSIZE = 64

_MODEL_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sass_model.json")

# ------------------------------------------------------------------------------------------------ SASS parsing

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-7T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"^(0x[0-9a-f]+)")

CLASSES = ("mma", "global_load", "async_copy", "shared_load", "shared_store", "global_store", "fp", "convert",
           "integer", "imad", "uniform", "sync", "branch", "other")
_CLASS_OF = {
    **dict.fromkeys(["HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA"], "mma"),
    **dict.fromkeys(["LDG", "LD", "LDC"], "global_load"),
    **dict.fromkeys(["LDGSTS", "UBLKCP", "UTMALDG", "LDGDEPBAR"], "async_copy"),
    **dict.fromkeys(["LDS", "LDSM"], "shared_load"),
    **dict.fromkeys(["STS", "STSM"], "shared_store"),
    **dict.fromkeys(["STG", "ST", "RED", "ATOM", "ATOMG"], "global_store"),
    **dict.fromkeys(["FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "MUFU", "HADD2", "HMUL2", "HFMA2",
                     "HMNMX2", "HSETP2", "FCHK", "DADD", "DMUL", "DFMA", "FSWZADD"], "fp"),
    **dict.fromkeys(["F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"], "convert"),
    **dict.fromkeys(["IMAD", "IMUL"], "imad"),
    **dict.fromkeys(["IADD3", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "IMNMX", "VIMNMX", "PRMT",
                     "MOV", "SGXT", "BMSK", "FLO", "POPC", "VIADD", "CS2R", "S2R", "P2R", "R2P", "PLOP3", "IDP",
                     "SHFL", "BREV", "LOP", "IADD", "VIADDMNMX"], "integer"),
    **dict.fromkeys(["BAR", "SYNCS", "DEPBAR", "WARPGROUP", "WARPSYNC", "MEMBAR", "FENCE", "ARRIVES", "ERRBAR",
                     "CCTL", "VOTE", "VOTEU", "ELECT"], "sync"),
    **dict.fromkeys(["BRA", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "JMP", "BRX", "YIELD", "BPT", "WARPSYNC.ALL"],
                    "branch"),
}


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str
    modifiers: str  # ".E.128" etc.
    operands: str

    @property
    def op_class(self) -> str:
        if self.opcode in _CLASS_OF:
            return _CLASS_OF[self.opcode]
        if self.opcode.startswith("U") or self.opcode in ("S2UR", "R2UR"):
            return "uniform"  # the uniform datapath: still one issue slot of the warp
        return "other"


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of the (single) kernel in ``cuobjdump -sass`` text, in address order."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4), m.group(5).strip()))
    return out


def loops(instrs: list[Instruction]) -> list[tuple[int, int]]:
    """(first index, back-branch index) of every loop: a branch to an address at or before itself."""
    index_of = {ins.address: i for i, ins in enumerate(instrs)}
    found = []
    for i, ins in enumerate(instrs):
        if ins.opcode != "BRA":
            continue
        m = _BRANCH_TARGET.match(ins.operands.replace("`(", "").strip())
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= ins.address and target in index_of and target != ins.address:
            found.append((index_of[target], i))
    return found


def _shared_bytes_per_warp(ins: Instruction) -> int:
    """Bytes of shared memory one warp's execution of ``ins`` moves (HGMMA: its shared-memory operands, counted for
    one warp as a quarter of the warpgroup's)."""
    mods = ins.modifiers
    width = 4
    for bits, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if re.search(rf"\.{bits}\b", mods):
            width = nbytes
            break
    if ins.opcode in ("LDS", "STS", "LDGSTS"):
        return width * 32
    if ins.opcode in ("LDSM", "STSM"):
        # 8x8 matrices of 16-bit values, 128 bytes each: LDSM.16.M88.4 (SASS) / ldmatrix .x4 (PTX) moves four.
        count = re.search(r"\.X?([124])$", mods.upper())
        return (int(count.group(1)) if count else 1) * 128
    if ins.opcode == "HGMMA":
        m = re.match(r"\.(\d+)x(\d+)x(\d+)", mods)
        if not m:
            return 0
        rows, cols, depth = (int(g) for g in m.groups())
        elem = 1 if re.search(r"\.(E4M3|E5M2|S8|U8)", mods) else 2
        operands = [o.strip() for o in ins.operands.split(",")]
        a_from_shared = len(operands) > 1 and operands[1].startswith("gdesc")
        per_group = cols * depth * elem + (rows * depth * elem if a_from_shared else 0)
        return per_group // 4
    return 0


_WAVEFRONT = 128  # bytes of shared memory one wavefront carries


def _shared_wavefronts_per_warp(ins: Instruction) -> float:
    """Clocks of the SM's shared memory one warp's execution of ``ins`` takes: it serves one 128-byte wavefront a
    clock, and a warp's LDS / STS / LDSM / cp.async takes ceil(bytes / 128) of them, at least one (an LDS.U8 costs
    what a 128-byte LDS does); wgmma's operand reads their bytes / 128 (bank conflicts not modelled)."""
    nbytes = _shared_bytes_per_warp(ins)
    if not nbytes:
        return 0
    if ins.opcode == "HGMMA":
        return nbytes / _WAVEFRONT
    return max(1, math.ceil(nbytes / _WAVEFRONT))


def loop_stats(sass: str) -> dict[str, Any]:
    """Per warp and per iteration of the main loop: instructions by class, MMA and non-MMA counts, shared bytes.
    ``scope`` says what was counted: "loop" or, for a kernel without a loop, "kernel" (one program's pass)."""
    instrs = parse_sass(sass)
    candidates = loops(instrs)

    def body(span):
        return instrs[span[0]: span[1] + 1]

    if candidates:
        def mma_count(span):
            return sum(1 for ins in body(span) if ins.op_class == "mma")
        start, end = max(candidates, key=lambda s: (mma_count(s), s[1] - s[0]))
        scope, counted = "loop", body((start, end))
    else:
        scope, counted = "kernel", [ins for ins in instrs if ins.opcode != "NOP"]
        start, end = 0, len(instrs) - 1
    by_class = dict.fromkeys(CLASSES, 0)
    for ins in counted:
        by_class[ins.op_class] += 1
    total = len(counted)
    return {
        "scope": scope,
        "loops": len(candidates),
        "loop_first_address": instrs[start].address if instrs else None,
        "instructions": total,
        "mma": by_class["mma"],
        "non_mma": total - by_class["mma"],
        "by_class": by_class,
        "shared_bytes_per_warp": sum(_shared_bytes_per_warp(ins) for ins in counted),
        "shared_wavefronts_per_warp": sum(_shared_wavefronts_per_warp(ins) for ins in counted),
        "opcodes": _top_opcodes(counted),
    }


def _top_opcodes(counted: list[Instruction], n: int = 12) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ins in counted:
        counts[ins.opcode] = counts.get(ins.opcode, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n])


# ------------------------------------------------------------------------------------------------ the model


def elements_per_iteration(family: str, constexprs: dict[str, Any]) -> int:
    """Elements one CTA-iteration (or one program, for loop-less kernels) produces: decoded weights for the GEMMs
    and dequantize, activation elements for the thin passes, weights for quantize, absmax entries for 8-bit,
    partial sums for the split-K sum."""
    c = constexprs
    if family.startswith(("fwd", "bwd_dx")):
        return c["BLOCK_N"] * c["BLOCK_K"]
    if family in ("rows", "cols", "lora_term"):
        return c["BLOCK_M"] * c["BLOCK_C"]
    if family == "decode_check":
        return 2 * c["ROWS"] * c["COLS"]
    if family == "nf4_dequantize":
        return 2 * c["BYTES_PER_PROGRAM"]
    if family == "nf4_quantize":
        return c["BLOCKS_PER_PROGRAM"] * c["BLOCKSIZE"]
    if family == "nf4_absmax_8bit":
        return c["NESTED"]
    if family == "split_sum":  # one split's partial sums added per iteration
        return c["BLOCK"]
    raise ValueError(f"unknown family {family!r}")


def _fma_slots(by_class: dict[str, int], machine: Machine) -> float:
    # FMA-pipe issue slots of one warp: FP32 / packed-half instructions one each, IMAD (half rate) two.
    return by_class.get("fp", 0) + by_class.get("imad", 0) * machine.lanes / (
        machine.int_lanes_per_clock_per_sm / machine.schedulers_per_sm)


def per_iteration(result: dict[str, Any], machine: Machine = H200) -> dict[str, Any]:
    """Shape-independent figures of one compiled configuration (a compile-check result with ``main_loop``)."""
    loop = result["main_loop"]
    c = result["constexprs"]
    warps = result["num_warps"]
    elements = elements_per_iteration(result["family"], c)
    out = {
        "lane_instr_per_element": loop["non_mma"] * machine.lanes * warps / elements,
        "int_lane_instr_per_element": loop["by_class"]["integer"] * machine.lanes * warps / elements,
        "fma_lane_slots_per_element": _fma_slots(loop["by_class"], machine) * machine.lanes * warps / elements,
        "issue_clocks": loop["non_mma"] * warps / machine.schedulers_per_sm,
        "int_clocks": loop["by_class"]["integer"] * warps * machine.lanes / machine.int_lanes_per_clock_per_sm,
        "fma_clocks": _fma_slots(loop["by_class"], machine) * warps / machine.schedulers_per_sm,
        "shared_bytes": loop["shared_bytes_per_warp"] * warps,
        "elements": elements,
        "shared_bytes_per_element": loop["shared_bytes_per_warp"] * warps / elements,
        # (a model made before wavefronts were counted: its bytes at full width)
        "shared_clocks": loop.get("shared_wavefronts_per_warp", loop["shared_bytes_per_warp"] / _WAVEFRONT) * warps
        * _WAVEFRONT / machine.shared_bytes_per_clock_per_sm,
    }
    if result["family"].startswith(("fwd", "bwd_dx")) and loop["mma"]:
        out["tensor_clocks"] = c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] / machine.mma_macs_per_clock_per_sm
        out["issue_over_tensor"] = out["issue_clocks"] / out["tensor_clocks"]
        out["int_over_tensor"] = out["int_clocks"] / out["tensor_clocks"]
        out["fma_over_tensor"] = out["fma_clocks"] / out["tensor_clocks"]
    return out


def gemm_bytes(kind: str, M: int, N: int, K: int, r: int, blocksize: int = BLOCKSIZE) -> int:
    """Compulsory HBM bytes of one GEMM launch (bf16 activations, double-quantized NF4 weight)."""
    weight = N * K // 2 + N * K // blocksize + 4 * math.ceil(N * K / blocksize / 256)
    lora = 2 * r * (N + K) + 4 * M * r
    if kind == "fwd":
        return weight + 2 * M * K + 2 * M * N + lora
    return weight + 2 * M * N + 2 * M * K + lora


def gemm_bounds(kind: str, result: dict[str, Any], M: int, N: int, K: int, r: int,
                machine: Machine = H200) -> Optional[dict[str, float]]:
    """Modelled bounds (µs) of one GEMM configuration at one shape; None without an MMA main loop."""
    fig = per_iteration(result, machine)
    if "tensor_clocks" not in fig:
        return None
    c = result["constexprs"]
    out_cols, out_tile = (N, c["BLOCK_N"]) if kind == "fwd" else (K, c["BLOCK_K"])
    reduce_len, reduce_tile = (K, c["BLOCK_K"]) if kind == "fwd" else (N, c["BLOCK_N"])
    tiles = math.ceil(M / c["BLOCK_M"]) * math.ceil(out_cols / out_tile)
    reduce_tiles = math.ceil(reduce_len / reduce_tile)
    # A split-capable (decode) configuration splits the reduction as its launch does (lora_linear._gemm_launch).
    split = (split_count(tiles, reduce_tiles, machine.sms, split_limit(M, reduce_len)) if c.get("SPLIT_K", False)
             else 1)
    programs = tiles * split
    iterations = math.ceil(reduce_tiles / split)
    per_sm = math.ceil(programs / machine.sms)
    # The per-iteration clocks assume all four schedulers (and their ALU, FMA pipe and tensor core) busy; fewer
    # resident warps than that leave the rest idle.
    busy = min(machine.schedulers_per_sm, per_sm * result["num_warps"]) / machine.schedulers_per_sm
    clocks = per_sm * iterations / machine.clock_hz
    tensor = clocks * fig["tensor_clocks"] / busy
    issue = clocks * fig["issue_clocks"] / busy
    integer = clocks * fig["int_clocks"] / busy
    fma = clocks * fig["fma_clocks"] / busy
    shared = clocks * fig["shared_clocks"]
    nbytes = gemm_bytes(kind, M, N, K, r)
    if split > 1:  # the float32 partial sums, written by the splits and read by _split_sum_kernel
        nbytes += 2 * 4 * split * M * out_cols
    memory = nbytes / machine.hbm_bytes_per_s
    bounds = {"tensor": tensor, "issue": issue, "int": integer, "fma": fma, "shared": shared, "memory": memory}
    time = max(bounds.values())
    return {
        "programs": programs, "splits": split, "iterations": iterations, "tensor_us": tensor * 1e6, "issue_us": issue * 1e6,
        "int_us": integer * 1e6, "fma_us": fma * 1e6, "shared_us": shared * 1e6, "memory_us": memory * 1e6,
        "time_us": time * 1e6, "bound": max(bounds, key=bounds.get),
        "nf4_bytes_per_s": (N * K // 2) / time,
        "dense_fraction": (2 * M * N * K / machine.dense_bf16_flops) / time,
    }


def thin_bounds(result: dict[str, Any], M: int, C: int, machine: Machine = H200) -> dict[str, float]:
    """Modelled bounds (µs) of a thin pass streaming an [M, C] bf16 activation (issue, integer or FMA pipe, shared
    memory or HBM)."""
    fig = per_iteration(result, machine)
    elements = M * C
    issue = elements * fig["lane_instr_per_element"] / machine.lane_instr_per_s
    integer = elements * fig["int_lane_instr_per_element"] / (
        machine.sms * machine.int_lanes_per_clock_per_sm * machine.clock_hz)
    fma = elements * fig["fma_lane_slots_per_element"] / machine.lane_instr_per_s
    shared = elements * fig["shared_clocks"] / fig["elements"] / (machine.sms * machine.clock_hz)
    memory = 2 * elements / machine.hbm_bytes_per_s
    bounds = {"issue": issue, "int": integer, "fma": fma, "shared": shared, "memory": memory}
    time = max(bounds.values())
    return {"issue_us": issue * 1e6, "int_us": integer * 1e6, "fma_us": fma * 1e6, "shared_us": shared * 1e6,
            "memory_us": memory * 1e6, "time_us": time * 1e6, "bound": max(bounds, key=bounds.get)}


_GEMM_FAMILY = {("fwd", True): "fwd_small_m", ("fwd", False): "fwd_large_m",
                ("dx", True): "bwd_dx_small_m", ("dx", False): "bwd_dx_large_m"}
MAIN_VARIANT = "bf16,dq,aligned"


def _is_candidate(result: dict[str, Any]) -> bool:
    return result.get("ok") and result.get("variant") == MAIN_VARIANT and "main_loop" in result


def build(report: list[dict[str, Any]], machine: Machine = H200) -> dict[str, Any]:
    """The model of a compile-check report: per configuration its per-iteration figures, per benchmark shape the
    bounds of every GEMM candidate and the chosen (least modelled time) one; plus fwd / fwd_bwd totals."""
    configs = []
    for r in report:
        if not r.get("ok") or "main_loop" not in r:
            continue
        configs.append({"name": r["name"], "family": r["family"], "variant": r.get("variant"),
                        "constexprs": r["constexprs"], "num_warps": r["num_warps"],
                        "num_stages": r.get("num_stages"), "main_loop": r["main_loop"],
                        "figures": per_iteration(r, machine)})
    model = {"machine": dataclasses.asdict(machine), "triton": report[0].get("triton") if report else None,
             "note": "modelled from sm_90 SASS; not a measurement", "configs": configs, "shapes": []}
    for N, K in WEIGHT_SHAPES:
        for M in DECODE_M + TRAINING_M:
            entry: dict[str, Any] = {"M": M, "N": N, "K": K, "r": RANK}
            for kind in ("fwd", "dx"):
                family = _GEMM_FAMILY[(kind, M <= 16)]
                cands = []
                for cfg in configs:
                    if cfg["family"] == family and cfg["variant"] == MAIN_VARIANT:
                        bounds = gemm_bounds(kind, cfg, M, N, K, RANK, machine)
                        if bounds is not None:
                            cands.append({"name": cfg["name"], **bounds})
                entry[kind] = {"candidates": cands,
                               "chosen": min(cands, key=lambda b: b["time_us"]) if cands else None}
                if M > 16:  # the launcher's other route at training sizes: dequantize once + cuBLAS
                    entry[kind]["dense_route"] = _dense_route(kind, M, N, K, machine)
            entry["thin"] = _thin_totals(configs, M, N, K, machine)
            model["shapes"].append(entry)
    return model


def _dense_route(kind: str, M: int, N: int, K: int, machine: Machine = H200) -> dict[str, float]:
    # lora_linear_dense's own model of its route (dequantize + LoRA term + cuBLAS at a stated fraction of peak).
    from .lora_linear_dense import modelled_dense_route

    return modelled_dense_route(kind, M, N, K, RANK, machine)


def _thin_totals(configs, M, N, K, machine) -> dict[str, Optional[float]]:
    # Forward: S over x [M, K] (dropout on). Backward: dS over dY [M, N], dA over x [M, K], dB (+dbias) over dY.
    def pick(family, variant):
        for cfg in configs:
            if cfg["family"] == family and cfg["variant"] == variant:
                return cfg
        return None
    rows_d, rows_p = pick("rows", f"r={RANK},dropout"), pick("rows", f"r={RANK},plain")
    cols_d, cols_c = pick("cols", f"r={RANK},dropout"), pick("cols", f"r={RANK},colsum")
    if None in (rows_d, rows_p, cols_d, cols_c):
        return {"fwd_us": None, "bwd_us": None}
    fwd = thin_bounds(rows_d, M, K, machine)["time_us"]
    bwd = (thin_bounds(rows_p, M, N, machine)["time_us"] + thin_bounds(cols_d, M, K, machine)["time_us"]
           + thin_bounds(cols_c, M, N, machine)["time_us"])
    return {"fwd_us": fwd, "bwd_us": bwd}


# ------------------------------------------------------------------------------------------------ queries


@functools.lru_cache(maxsize=1)
def _committed_model() -> Optional[dict[str, Any]]:
    if not os.path.exists(_MODEL_JSON):
        return None
    with open(_MODEL_JSON, encoding="utf-8") as f:
        return json.load(f)


def modelled_time_us(kind: str, M: int, N: int, K: int, r: int, model: Optional[dict] = None) -> Optional[float]:
    """The model's H200 time in µs of the fused linear's ``kind`` ("fwd": thin S pass + forward GEMM; "fwd_bwd":
    also the backward's dX GEMM and its three thin passes) at x [M, K], W [N, K], rank r (bf16, blocksize 64,
    double quantization), for the least-modelled-time candidate of each GEMM - at M > 16 the dense route
    (dequantize + cuBLAS) counts as a candidate too, as the launcher's first-call measurement chooses between them.
    None where the model has nothing: no committed model, r ≠ 16, K not a multiple of 64 (the per-element decode
    path), or no candidate."""
    if kind not in ("fwd", "fwd_bwd"):
        raise ValueError(f"kind must be 'fwd' or 'fwd_bwd', got {kind!r}")
    model = model if model is not None else _committed_model()
    if model is None or r != RANK or K % BLOCKSIZE or min(M, N, K) <= 0:
        return None
    configs = model["configs"]
    total = 0.0
    for gemm_kind in ("fwd",) if kind == "fwd" else ("fwd", "dx"):
        family = _GEMM_FAMILY[(gemm_kind, M <= 16)]
        times = [b["time_us"] for b in (gemm_bounds(gemm_kind, cfg, M, N, K, r) for cfg in configs
                                        if cfg["family"] == family and cfg["variant"] == MAIN_VARIANT)
                 if b is not None]
        if not times:
            return None
        if M > 16:
            times.append(_dense_route(gemm_kind, M, N, K)["time_us"])
        total += min(times)
    thin = _thin_totals(configs, M, N, K, H200)
    if thin["fwd_us"] is None:
        return None
    total += thin["fwd_us"] + (thin["bwd_us"] if kind == "fwd_bwd" else 0.0)
    return total


# ------------------------------------------------------------------------------------------------ the tool


def _short(name: str) -> str:
    # "fwd_small_m[bf16,dq,aligned] BLOCK_M=16,BLOCK_N=32,BLOCK_K=256,SWAP_AB=False,BLOCK_R=16,BLOCKSIZE=64 w4s3"
    # -> "fwd_small_m[bf16,dq,aligned] 16x32x256 swap=False w4s3"
    m = re.match(r"(\S+) BLOCK_M=(\d+),BLOCK_N=(\d+),BLOCK_K=(\d+),SWAP_AB=(\w+).* (w\d+s\d+)$", name)
    return f"{m.group(1)} {m.group(2)}x{m.group(3)}x{m.group(4)} swap={m.group(5)} {m.group(6)}" if m else name


def table(model: dict[str, Any]) -> str:
    """The model as text: per configuration, then per benchmark shape and GEMM the chosen candidate."""
    lines = [f"MODELLED, not measured: {model['machine']['name']}, {model['machine']['sms']} SMs, "
             f"{model['machine']['clock_hz'] / 1e9:.2f} GHz, {model['machine']['schedulers_per_sm']} schedulers/SM, "
             f"{model['machine']['hbm_bytes_per_s'] / 1e12:.1f} TB/s, "
             f"{model['machine']['dense_bf16_flops'] / 1e12:.0f} TFLOP/s bf16; Triton {model.get('triton')}",
             f"{'configuration':<92} {'instr':>5} {'mma':>4} {'lane/el':>7} {'int/el':>6} {'iss/tc':>6} "
             f"{'int/tc':>6} {'smemB':>7}"]
    for cfg in model["configs"]:
        f, loop = cfg["figures"], cfg["main_loop"]
        ratio = f"{f['issue_over_tensor']:.2f}" if "issue_over_tensor" in f else "-"
        int_ratio = f"{f['int_over_tensor']:.2f}" if "int_over_tensor" in f else "-"
        lines.append(f"{cfg['name']:<92} {loop['instructions']:>5} {loop['mma']:>4} "
                     f"{f['lane_instr_per_element']:>7.2f} {f['int_lane_instr_per_element']:>6.2f} {ratio:>6} "
                     f"{int_ratio:>6} {f['shared_bytes']:>7}")
    lines.append("")
    lines.append(f"{'shape':<26} {'gemm':<4} {'chosen configuration':<70} {'tc_us':>7} {'iss_us':>7} {'int_us':>7} "
                 f"{'fma_us':>7} {'smem_us':>7} {'mem_us':>7} "
                 f"{'time_us':>8} {'bound':>6} {'TB/s':>5} {'progs':>6}")
    for s in model["shapes"]:
        shape = f"M={s['M']} N={s['N']} K={s['K']}"
        for kind in ("fwd", "dx"):
            b = s[kind]["chosen"]
            if b is None:
                lines.append(f"{shape:<26} {kind:<4} (none)")
                continue
            lines.append(f"{shape:<26} {kind:<4} {_short(b['name']):<70} {b['tensor_us']:>7.1f} {b['issue_us']:>7.1f} "
                         f"{b['int_us']:>7.1f} {b['fma_us']:>7.1f} {b['shared_us']:>7.1f} {b['memory_us']:>7.1f} "
                         f"{b['time_us']:>8.1f} "
                         f"{b['bound']:>6} "
                         f"{b['nf4_bytes_per_s'] / 1e12:>5.2f} {b['programs']:>6}")
            dense = s[kind].get("dense_route")
            if dense is not None:
                lines.append(f"{shape:<26} {kind:<4} {'dense route: dequantize + LoRA term + cuBLAS':<70} "
                             f"{'':>7} {'':>7} {'':>7} {'':>7} {'':>7} {'':>7} {dense['time_us']:>8.1f} {'':>6} "
                             f"{s['N'] * s['K'] // 2 / dense['time_us'] / 1e6:>5.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", help="a compile-check JSON report (default: run the compile check now)")
    parser.add_argument("--json", help="write the model here (the committed one is triton_kernels/sass_model.json)")
    parser.add_argument("--quick", action="store_true", help="with no --report: the compile check's --quick set")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            report = json.load(f)
    else:
        import tempfile

        from . import compile_check

        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            compile_check.main((["--quick"] if args.quick else []) + ["--json", tmp.name])
            with open(tmp.name, encoding="utf-8") as f:
                report = json.load(f)
    model = build(report)
    print(table(model))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(model, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
