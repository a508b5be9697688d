#!/usr/bin/env bash
# One pass over everything that needs a CUDA GPU: build storyattn._C, run every
# test marked `gpu`, run the benchmarks at FLUX sizes, and collect logs and result
# files under $OUT (default ./gpu_out).  Meant for a lent GPU machine with a CUDA
# torch and nvcc already installed; run from the repository root:
#
#   bash tools/gpu_session.sh            # everything (~15-25 min on an H100/H200)
#   QUICK=1 bash tools/gpu_session.sh    # tests + op benchmarks only
#
# Packages that machine lacks (diffusers, for the processor/pipeline tests) can be
# carried as wheels in .whl/ and are installed first when that folder exists.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{ nvidia-smi; $py -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; } \
  2>&1 | tee "$OUT/device.txt"

# The extension, in place (no install): storyattn._C next to the sources.
STORYATTN_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  $py setup.py build_ext --inplace 2>&1 | tail -20 | tee "$OUT/build.log"

$py -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -30

$py benchmarks/bench_gsa.py 2>&1 | tee "$OUT/bench_gsa.log" | tail -40
$py benchmarks/bench_cuda.py 2>&1 | tee "$OUT/bench_cuda.log" | tail -30
if [ -z "${QUICK:-}" ]; then
  $py benchmarks/bench_gsa_e2e.py --full-model 2>&1 | tee "$OUT/bench_gsa_e2e.log" | tail -30
  $py benchmarks/bench_story_iter.py 2>&1 | tee "$OUT/bench_story_iter.log" | tail -20
  $py benchmarks/bench_train.py 2>&1 | tee "$OUT/bench_train.log" | tail -20
fi
cp benchmarks/results/*_gpu.* "$OUT"/ 2>/dev/null
ls -la "$OUT"
