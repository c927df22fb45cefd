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
# From the schema side (the ops registered by csrc/register.cpp), not from the Python wrappers: the expected ops and
# their _backward ops all exist, and every fpet op with a CPU kernel has a CUDA kernel too.
"$PYTHON" - <<'PY'
import torch
import fpet_kernels._C  # noqa: F401  (registers torch.ops.fpet)
EXPECTED = ["refine_keys", "checkerboard_similarity", "ste_match", "scatter_mean_merge", "scatter_mean_merge_dense",
            "merge_tokens"]
registered = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                    if name.startswith("fpet::"))
absent = [n for n in EXPECTED + [f"{n}_backward" for n in EXPECTED] if n not in registered]
assert not absent, f"fpet ops not registered: {absent} (registered: {registered})"
cpu = [n for n in registered if torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{n}", "CPU")]
missing = [n for n in cpu if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{n}", "CUDA")]
assert not missing, f"no CUDA kernel for {missing}"
print("   ok:", ", ".join(cpu))
PY

echo "== CMake build + ctest"
CMAKE_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# libtorch's CMake config looks for the toolkit even for CPU-only users; /usr/local/bin/nvcc may be a wrapper.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
mkdir -p build
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$CMAKE_PREFIX" > build/cmake.log
cmake --build build/cmake -j"${MAX_JOBS:-2}" >> build/cmake.log
ctest --test-dir build/cmake --output-on-failure

