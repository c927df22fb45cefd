"""Every fpet op (and its backward op) has a CUDA kernel when the extension was built with CUDA (no GPU needed).

Set FPET_EXPECT_CUDA_KERNELS=1 (as .ci/build_and_check_ext.sh does) to fail instead of skip when the build has no
CUDA kernels at all, e.g. after a silent fallback to a CPU-only build.
"""
import os

import pytest
import torch

from fpet_kernels.backends import OPS
from fpet_kernels.backends import compiled

pytestmark = pytest.mark.skipif(not compiled.is_loaded(), reason=f"fpet_kernels._C not built: {compiled.load_error()}")

ALL_OPS = OPS + tuple(f"{name}_backward" for name in OPS)


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fpet::{name}", key)


def test_the_extension_registers_exactly_the_ops_of_the_contract():
    assert sorted(compiled.registered_ops()) == sorted(ALL_OPS)


def test_every_op_has_a_cpu_kernel():
    assert [name for name in ALL_OPS if not _has_kernel(name, "CPU")] == []


def test_every_op_has_a_cuda_kernel():
    with_cuda = [name for name in ALL_OPS if _has_kernel(name, "CUDA")]
    if not with_cuda and os.environ.get("FPET_EXPECT_CUDA_KERNELS") != "1":
        pytest.skip("fpet_kernels._C was built without CUDA kernels (FPET_SKIP_CUDA_BUILD=1 or no toolkit)")
    assert [name for name in ALL_OPS if name not in with_cuda] == []
    assert compiled.cuda_kernels_built()
