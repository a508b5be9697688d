#!/usr/bin/env bash
# Compile-check the CUDA sources of storyattn._C without building the extension.
#
#   tools/check_cuda_compile.sh            # sm_90 (the default target)
#   CHECK_CUDA_ARCHS="80 90" tools/check_cuda_compile.sh
#
# 1. every csrc/*.cu is compiled by the machine's nvcc for each arch with
#    warnings as errors (the kernels include only CUDA headers, so a CPU build
#    of torch is enough; no GPU is needed);
# 2. csrc/bindings.cpp (the torch glue) is compiled with the host C++ compiler
#    against torch's headers and the CUDA toolkit headers;
# 3. every storyattn::launch_* symbol the glue calls must be defined by one of
#    the compiled .cu objects, so a renamed launcher cannot slip through.
# Exits 0 with "skipped: ..." where nvcc is absent, non-zero on any error.
# Compiles run one after another: CI machines may have two cores shared with
# other jobs.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CSRC="$ROOT/csrc"
ARCHS="${CHECK_CUDA_ARCHS:-90}"

NVCC="${NVCC:-}"
if [ -z "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -z "$NVCC" ] || ! "$NVCC" --version >/dev/null 2>&1; then
  echo "check_cuda_compile: skipped: no nvcc found (set NVCC or CUDA_HOME to check the CUDA sources)"
  exit 0
fi

shopt -s nullglob
CU_FILES=("$CSRC"/*.cu)
if [ ${#CU_FILES[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/*.cu files"
  exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
FAIL=0
NVCC_VER="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
echo "check_cuda_compile: nvcc $NVCC_VER ($NVCC), archs: $ARCHS"

OBJS=()
for arch in $ARCHS; do
  for f in "${CU_FILES[@]}"; do
    name="$(basename "$f" .cu)"
    obj="$TMP/${name}.sm${arch}.o"
    log="$TMP/${name}.sm${arch}.log"
    # The same flags setup.py passes (-O3 --use_fast_math -std=c++17), plus
    # -Werror so a warning (narrowing, unused, ...) fails the check.
    if "$NVCC" -std=c++17 -O3 --use_fast_math -I"$CSRC" \
        -gencode "arch=compute_${arch},code=sm_${arch}" \
        -Werror all-warnings -Xcompiler -Wall -Xptxas -v \
        -c "$f" -o "$obj" >"$log" 2>&1; then
      spills="$(grep -E 'bytes spill (stores|loads)' "$log" | grep -vcE ' 0 bytes spill stores, 0 bytes spill loads' || true)"
      [ "$spills" = "0" ] && spills=""
      regs="$(grep -oE 'Used [0-9]+ registers' "$log" | awk '{print $2}' | sort -n | tail -1)"
      echo "  ok    sm_${arch}  csrc/$(basename "$f")  (max ${regs:-?} registers/thread${spills:+, $spills kernels with spills})"
      OBJS+=("$obj")
    else
      echo "  FAIL  sm_${arch}  csrc/$(basename "$f")"
      grep -vE '^ptxas info|^    [0-9]+ bytes stack' "$log" | sed 's/^/        /'
      FAIL=1
    fi
  done
done

# --- torch glue -------------------------------------------------------------
PY="${PYTHON:-python}"
BIND="$CSRC/bindings.cpp"
if [ ! -f "$BIND" ]; then
  echo "  FAIL  csrc/bindings.cpp is missing"
  FAIL=1
elif ! TORCH_INC="$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  echo "  skip  csrc/bindings.cpp: torch is not importable with $PY"
else
  PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # nvcc may be a wrapper script: ask it where its own headers are.
  CUDA_INC="$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.*INCLUDES="\([^"]*\)".*/\1/p' | head -1)"
  CXX="${CXX:-c++}"
  INC=(-I"$CSRC" -I"$PY_INC")
  for d in $CUDA_INC; do INC+=("$d"); done
  for d in $TORCH_INC; do INC+=(-I"$d"); done
  DEFS=(-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H)
  # CPU builds of torch ship c10/cuda headers but not the CMake-generated
  # cuda_cmake_macros.h; it only defines export macros, so skip it here.
  first_inc="${TORCH_INC%% *}"
  if [ ! -f "$first_inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    DEFS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  fi
  # torch >= 2.10 headers need C++20 for host code.
  if "$CXX" -std=c++20 -O1 -fPIC -Wall -Werror -Wno-unused-parameter "${INC[@]}" "${DEFS[@]}" \
      -c "$BIND" -o "$TMP/bindings.o" >"$TMP/bindings.log" 2>&1; then
    echo "  ok    host     csrc/bindings.cpp ($CXX -std=c++20 against torch headers)"
    # launchers the glue needs vs launchers the kernels define
    if ! command -v nm >/dev/null 2>&1; then
      echo "  skip  link     no nm (binutils) to compare symbols"
    else
    need="$(nm -C --undefined-only "$TMP/bindings.o" | grep -oE 'storyattn::launch_[a-z_0-9]+' | sort -u)"
    have="$(for o in "${OBJS[@]}"; do nm -C --defined-only "$o"; done | grep -oE 'storyattn::launch_[a-z_0-9]+' | sort -u)"
    missing="$(comm -23 <(echo "$need") <(echo "$have"))"
    if [ -n "$missing" ]; then
      echo "  FAIL  launchers used by bindings.cpp but defined by no .cu file: $missing"
      FAIL=1
    else
      echo "  ok    link     every launcher bindings.cpp calls is defined: $(echo $need)"
    fi
    fi
  else
    echo "  FAIL  host     csrc/bindings.cpp"
    sed 's/^/        /' "$TMP/bindings.log" | head -60
    FAIL=1
  fi
fi

if [ "$FAIL" -ne 0 ]; then
  echo "check_cuda_compile: FAILED"
  exit 1
fi
echo "check_cuda_compile: all CUDA sources compile"
