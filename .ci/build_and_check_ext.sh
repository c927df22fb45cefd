#!/usr/bin/env bash
# Builds (installs) the package with its compiled extension and CUDA kernels (nvcc needed, no GPU), checks that every
# fpet op has a CUDA kernel registered, and builds the CMake (LibTorch) target and runs its ctest. .ci/run calls it
# before the test suite. Usage: .ci/build_and_check_ext.sh [python]   (default: python on PATH)
set -euo pipefail
PYTHON="${1:-python}"
cd "$(dirname "$0")/.."

echo "== build fpet_kernels._C (CPU + CUDA kernels)"
start=$(date +%s)
FPET_FORCE_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$PYTHON" -m pip install --no-build-isolation -e . -q
echo "   built in $(( $(date +%s) - start )) s"

echo "== every fpet op has a CUDA kernel"
"$PYTHON" - <<'PY'
import torch
from fpet_kernels import compiled
assert compiled.is_loaded(), compiled.LOAD_ERROR
missing = [n for n in compiled.OPS + compiled.BACKWARD_OPS
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{n}", "CUDA")]
assert not missing, f"no CUDA kernel for {missing}"
print("   ok:", ", ".join(compiled.OPS))
PY

echo "== CMake build + ctest"
CMAKE_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# libtorch's CMake config looks for the toolkit even for CPU-only users; /usr/local/bin/nvcc may be a wrapper.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
mkdir -p build
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX" > build/cmake.log
cmake --build build/cmake -j"${MAX_JOBS:-2}" >> build/cmake.log
ctest --test-dir build/cmake --output-on-failure

