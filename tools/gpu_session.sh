#!/usr/bin/env bash
# One short pass over everything that needs a CUDA GPU, sized for a lent machine
# (stages in priority order, each with an enforced time budget, 9 minutes in all on one
# H200; results saved as each stage ends).  The stages are in tools/gpu_session.py.
#
#   bash tools/gpu_session.sh --fetch-wheels   # here, with network: the pinned wheels
#                                              # the GPU machine lacks -> .whl/
#   bash tools/gpu_session.sh                  # there, from the repository root
#   bash tools/gpu_session.sh --dry-run        # anywhere: every stage on the CPU, toy sizes
#
# The GPU machine has its own torch, triton, transformers, peft and accelerate and no
# network.  What it lacks travels as wheels pinned in tools/gpu_wheels.txt (the versions
# tested here) and is installed into /tmp/site, first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
  rm -rf .whl && mkdir -p .whl
  grep -v '^\s*#' tools/gpu_wheels.txt | grep -v '^\s*$' | while read -r req; do
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$req" || exit 1
  done
  ls -la .whl
  exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec $py tools/gpu_session.py "$@"
