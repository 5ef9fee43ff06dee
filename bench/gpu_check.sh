#!/usr/bin/env bash
# One GPU check, for a machine with no network (the H200 the device tool lends):
#   bash bench/gpu_check.sh OUTDIR
# builds the extension, runs the `gpu`-marked tests and the full benchmark, writing everything under OUTDIR.
# bitsandbytes is not installed there: carry its wheel in .whl/ (see bench/README.md); it is installed from there.
# Budget: under 9 minutes in all (build ~1 min, GPU tests <= 3 min, benchmark <= 5 min).
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  $PY -c "import bitsandbytes, peft; print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$OUTDIR/env.txt"

echo "== build" | tee "$OUTDIR/build.log"
SECONDS=0
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . >>"$OUTDIR/build.log" 2>&1 \
  || { echo "build failed" | tee -a "$OUTDIR/build.log"; status=1; }
$PY -c "import qlora_kernels as qk; print('extension_available', qk.extension_available())" 2>&1 | tee -a "$OUTDIR/build.log"
echo "build took ${SECONDS}s" | tee -a "$OUTDIR/build.log"

echo "== gpu tests" | tee "$OUTDIR/gpu_tests.log"
SECONDS=0
timeout 200 $PY -m pytest -m gpu -q -p no:cacheprovider tests >>"$OUTDIR/gpu_tests.log" 2>&1 || status=1
tail -n 30 "$OUTDIR/gpu_tests.log"
echo "gpu tests took ${SECONDS}s" | tee -a "$OUTDIR/gpu_tests.log"

echo "== benchmark"
SECONDS=0
timeout 330 $PY -m bench --out "$OUTDIR" --no-progress >"$OUTDIR/bench.log" 2>&1 || status=1
tail -n 80 "$OUTDIR/bench.log"
echo "benchmark took ${SECONDS}s"
exit $status
