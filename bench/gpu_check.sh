#!/usr/bin/env bash
# The GPU check, sized for one short lease on a machine with no network (the H200 the device tool lends: Python 3.12,
# torch 2.11, Triton 3.6, nvcc 13.0):
#
#   bash bench/gpu_check.sh OUTDIR          # on the GPU machine (see bench/README.md for the one `run` command)
#   bash bench/gpu_check.sh --dry-run [OUTDIR]   # on any CPU machine: stages, kernels each compiles, time estimate
#
# Stages in priority order; each writes its results into OUTDIR as soon as it finishes (and the benchmarks as they
# go), so a run cut short still returns what it had:
#   1. env      nvidia-smi, versions, the commit measured                    -> env.txt
#   2. build    the carried wheels (.whl/: bitsandbytes, ninja) and our extension, ninja checked -> build.log
#   3. smoke    correctness on CUDA in bf16 (python -m bench.gpu_smoke)     -> smoke.json, smoke.log
#   4. plan     python -m bench --plan gpu-check: the goal points           -> gpu-check/results.{json,md,png}
#   5. tests    the rest of `pytest -m gpu`, time-boxed                      -> gpu_tests.log
#   6. full     python -m bench --plan full, with what time remains         -> full/results.{json,md,png}
# stages.tsv records each stage's status and seconds as it ends. Exit status: 0 when stages 2-4 passed.
set -uo pipefail

# Stage limits in seconds. bench/gpu_budget.py reads these lines: keep the NAME=seconds form.
T_ENV=20
T_BUILD=90
T_SMOKE=90
T_PLAN=170
T_TESTS=60
TOTAL=480

cd "$(dirname "$0")/.."
# $PYTHON, else this checkout's .venv (a development machine), else python3 (the GPU machine has no .venv)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

if [ "${1:-}" = "--dry-run" ]; then
  OUTDIR=${2:-}
  if [ -n "$OUTDIR" ]; then mkdir -p "$OUTDIR"; fi
  env -u TRITON_INTERPRET $PY -m bench.gpu_budget ${OUTDIR:+--json "$OUTDIR/dry_run.json"} \
    | tee ${OUTDIR:+"$OUTDIR/dry_run.txt"}
  exit "${PIPESTATUS[0]}"
fi

OUTDIR=${1:?usage: bash bench/gpu_check.sh OUTDIR | bash bench/gpu_check.sh --dry-run [OUTDIR]}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1
START=$SECONDS
core_status=0
printf 'stage\tstatus\tseconds\n' >"$OUTDIR/stages.tsv"

stage_done() {  # name status started_at
  printf '%s\t%s\t%s\n' "$1" "$2" "$((SECONDS - $3))" | tee -a "$OUTDIR/stages.tsv"
}
remaining() { echo $((TOTAL - (SECONDS - START))); }
limit() {  # the smaller of a stage's limit and what the whole budget has left (minus a margin for the last writes),
  # at least 1 (`timeout 0` would mean no limit at all)
  local left=$(( $(remaining) - 5 ))
  if [ "$left" -gt "$1" ]; then left=$1; fi
  if [ "$left" -lt 1 ]; then left=1; fi
  echo "$left"
}

# --- 1. env
t=$SECONDS
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo '?')$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  nproc
  timeout 15 $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"
stage_done env ok "$t"

# --- 2. build
t=$SECONDS
build_ok=1
{
  echo "== wheels"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qk-site .whl/*.whl \
      || echo "wheel install failed"
  else
    echo "no .whl/ wheels: bitsandbytes must already be installed (bench/README.md: carry .whl/)"
  fi
} >"$OUTDIR/build.log" 2>&1
export PYTHONPATH=/tmp/qk-site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/qk-site/bin:$PATH
{
  echo "== ninja"
  if $PY -c "from torch.utils.cpp_extension import is_ninja_available as ok; raise SystemExit(0 if ok() else 1)"; then
    echo "ninja $(ninja --version 2>/dev/null || echo '(python package)') usable: parallel compile"
  else
    echo "WARNING: ninja not usable: the extension builds with one compiler process at a time (slow)"
  fi
  echo "== extension (TORCH_CUDA_ARCH_LIST=9.0)"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) timeout -k 5 "$(limit $((T_BUILD - (SECONDS - t))))" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . || echo "BUILD FAILED"
  $PY -c "import qlora_kernels as qk, bitsandbytes, peft; print('extension_available', qk.extension_available(), 'bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)"
} >>"$OUTDIR/build.log" 2>&1
grep -q "BUILD FAILED\|wheel install failed" "$OUTDIR/build.log" && build_ok=0
grep -q "extension_available True" "$OUTDIR/build.log" || build_ok=0
tail -n 5 "$OUTDIR/build.log"
if [ "$build_ok" = 1 ]; then stage_done build ok "$t"; else stage_done build failed "$t"; core_status=1; fi

# --- 3. smoke
t=$SECONDS
QLORA_KERNELS_AUTOTUNE=0 timeout -k 5 "$(limit $T_SMOKE)" $PY -m bench.gpu_smoke "$OUTDIR/smoke.json" \
  >"$OUTDIR/smoke.log" 2>&1
rc=$?
tail -n 12 "$OUTDIR/smoke.log"
if [ $rc = 0 ]; then stage_done smoke ok "$t"; else stage_done smoke "failed(rc=$rc)" "$t"; core_status=1; fi

# --- 4. the goal points
t=$SECONDS
timeout -k 10 "$(limit $T_PLAN)" $PY -m bench --plan gpu-check --out "$OUTDIR/gpu-check" --no-progress \
  >"$OUTDIR/gpu-check.log" 2>&1
rc=$?
sed -n '/^## Goals/,/^## Measurements/p' "$OUTDIR/gpu-check/results.md" 2>/dev/null
if [ $rc = 0 ]; then stage_done gpu-check ok "$t"; else stage_done gpu-check "failed(rc=$rc)" "$t"; core_status=1; fi

# --- 5. the gpu-marked tests, time-boxed
t=$SECONDS
if [ "$(limit $T_TESTS)" -gt 10 ]; then
  timeout -k 5 "$(limit $T_TESTS)" $PY -m pytest -m gpu -q -p no:cacheprovider -rfE tests >"$OUTDIR/gpu_tests.log" 2>&1
  rc=$?
  tail -n 15 "$OUTDIR/gpu_tests.log"
  stage_done gpu-tests "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" "$t"
else
  stage_done gpu-tests skipped "$t"
fi

# --- 6. the full plan with what remains (the harness skips what its budget cannot fit and records it)
t=$SECONDS
left=$(limit 100000)
if [ "$left" -gt 30 ]; then
  timeout -k 10 "$left" $PY -m bench --plan full --out "$OUTDIR/full" --no-progress --budget $((left - 25)) \
    >"$OUTDIR/full.log" 2>&1
  rc=$?
  stage_done full "$([ $rc = 0 ] && echo ok || echo "rc=$rc")" "$t"
else
  stage_done full skipped "$t"
fi
echo "gpu_check: $((SECONDS - START)) s in all (budget $TOTAL s); results in $OUTDIR"
exit $core_status
