#!/usr/bin/env bash
# The declared lowest versions, tested: a fresh venv with tools/floors.txt (on torch
# 2.13.0, the CPU build) runs a fast smoke subset: the op, the FLUX and SDXL processors,
# one tiny story_iter run and one train step.  CI runs it after the main test run.
#
#   bash tools/check_floors.sh [VENV_DIR]      # default: a new folder under /tmp
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d /tmp/storyattn-floors.XXXXXX)}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/storyattn-floors-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0
# numpy < 2.4: Triton's CPU interpreter before 3.9 converts 1-element arrays to scalars,
# which numpy 2.4 refuses (compiled Triton on a GPU does not use numpy).
"$VENV/bin/python" -m pip install -q -r tools/floors.txt "numpy<2.4" pytest hypothesis ninja
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|triton|diffusers|transformers|peft|accelerate|safetensors|numpy) '

# Tiny presets built by these versions, not ones cached by newer ones.
export STORYATTN_TINY_DIR="$WORK/tiny"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -x \
  tests/test_segment_attention.py tests/test_gsa_processor.py tests/test_grca_processor.py
"$VENV/bin/python" -m pipelines.story_iter --frames 4 --rounds 1 --steps 2 --out "$WORK/story"
"$VENV/bin/python" -m pipelines.train --stage gsa --max-steps 1 --output-dir "$WORK/train"
echo "floors: ok"
