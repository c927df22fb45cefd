"""Build entry point of fpet_kernels.

Install torch first, then: ``pip install --no-build-isolation -e .``

Supported versions: Python >= 3.10, torch >= 2.6, timm >= 1.0.16 (the first whose attention takes an attention
mask); the Triton backend (the ``triton`` extra) needs triton >= 3.3, so torch >= 2.7 (torch 2.6 comes with triton
3.2: there the registry reports the Triton backend unavailable and the cuda backend serves CUDA tensors);
``fpet gpu-report`` needs triton >= 3.6. Checked on CPU with the whole test suite (Triton under the interpreter):
torch 2.6.0 / triton 3.2.0 / timm 1.0.16, torch 2.7.1 / triton 3.3.1 / timm 1.0.16, torch 2.11.0 / triton 3.6.0 /
timm 1.0.31, and the pinned torch 2.14.1 / triton 3.8.0 / timm 1.0.31 of requirements.txt. The Triton interpreter of
triton <= 3.6 needs numpy < 2.4 (it converts 1-element arrays to scalars, an error since numpy 2.4).

This builds the compiled extension ``fpet_kernels._C`` (the ``cpp`` and ``cuda`` backends, docs/design.md §4): the
CPU kernels always, the CUDA kernels too when a CUDA toolkit and a CUDA-enabled torch are found (no GPU needed).
Environment switches:
  FPET_SKIP_CUDA_BUILD=1    build the CPU kernels only
  FPET_FORCE_CUDA_BUILD=1   build the CUDA kernels even where torch reports no CUDA (fails without a toolkit)
  FPET_CUDA_ARCHS="80;90"   compute capabilities to build (default: fpet_kernels/cuda_archs.txt, the one arch list,
                            also read by CMakeLists.txt and the GPU report; plus PTX of the last)
  MAX_JOBS=2                parallel compile jobs (ninja)
"""
import os
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CUDA_ARCHS_FILE = ROOT / "fpet_kernels" / "cuda_archs.txt"  # shipped as package data


def read_version() -> str:
    for line in (ROOT / "fpet_kernels" / "version.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("fpet_kernels/version.py has no __version__")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _toolkit_of_nvcc(nvcc: Path):
    """The toolkit directory of an nvcc binary, following symlinks and `exec /path/to/nvcc` wrapper scripts."""
    nvcc = nvcc.resolve()
    try:
        head = nvcc.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"#!"):  # a wrapper script: find the real nvcc it runs
        for target in re.findall(rb"(/\S+/bin/nvcc)\b", head):
            real = Path(target.decode())
            if real.resolve() != nvcc and real.is_file():
                return _toolkit_of_nvcc(real)
        return None
    home = nvcc.parent.parent
    return home if (home / "include" / "cuda_runtime.h").is_file() else None


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH if set, else the toolkit of the nvcc on PATH, else /usr/local/cuda."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return Path(os.environ[name])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(Path(nvcc))
        if home:
            return home
    default = Path("/usr/local/cuda")
    return default if (default / "bin" / "nvcc").is_file() else None


def default_cuda_archs() -> str:
    """The arch list of fpet_kernels/cuda_archs.txt ("80;86;89;90"), lines starting with # skipped."""
    lines = [line.strip() for line in CUDA_ARCHS_FILE.read_text().splitlines()]
    return ";".join(line for line in lines if line and not line.startswith("#"))


def cuda_gencode_flags():
    archs = [a.strip() for a in (os.environ.get("FPET_CUDA_ARCHS") or default_cuda_archs()).split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer GPUs
    return flags


def extension_modules():
    """[fpet_kernels._C] and the build_ext command that compiles it."""
    cuda_home = None if env_flag("FPET_SKIP_CUDA_BUILD") else find_cuda_home()
    if cuda_home is not None:
        # Must precede the import of torch.utils.cpp_extension, which reads CUDA_HOME once; left to itself it
        # takes the parent of the directory of the first nvcc on PATH, which is wrong for a wrapper script.
        os.environ["CUDA_HOME"] = str(cuda_home)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_home is not None and (torch.version.cuda is not None or env_flag("FPET_FORCE_CUDA_BUILD"))
    if env_flag("FPET_FORCE_CUDA_BUILD") and not with_cuda:
        raise RuntimeError("FPET_FORCE_CUDA_BUILD=1 but no CUDA toolkit was found (set CUDA_HOME)")
    csrc = Path("csrc")
    sources = [str(csrc / "python_module.cpp"), str(csrc / "register.cpp"), str(csrc / "refine_keys.cpp")]
    sources += sorted(str(p) for p in (csrc / "cpu").glob("*.cpp"))
    # -fopenmp: at::parallel_for is a header template that runs serially unless the file is compiled with OpenMP.
    # -ffp-contract=off: no a*b+c fused into an FMA, so the AVX2 and baseline versions of the CPU row loops
    # (csrc/cpu/vector_ops.cpp) give bitwise the same results.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    if with_cuda:
        sources += sorted(str(p) for p in (csrc / "cuda").glob("*.cu"))
        cxx_flags.append("-DFPET_WITH_CUDA")
        nvcc_flags = ["-O3", "-DFPET_WITH_CUDA", "--expt-relaxed-constexpr", *cuda_gencode_flags()]
        extension = CUDAExtension(
            "fpet_kernels._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "fpet_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    print(f"fpet_kernels: building fpet_kernels._C with {'CPU + CUDA' if with_cuda else 'CPU'} kernels"
          + (f" (CUDA_HOME={cuda_home})" if with_cuda else ""))
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fpet_kernels",
    version=read_version(),
    description="Faster parameter-efficient tuning of timm Vision Transformers: FPET token merging",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fpet_kernels", "fpet_kernels.*"]),
    package_data={"fpet_kernels": ["cuda_archs.txt", "weights/*.safetensors", "weights/*.jsonl", "weights/*.json"]},
    install_requires=["torch>=2.6", "timm>=1.0.16", "safetensors", "tqdm", "scikit-learn", "scikit-image"],
    extras_require={"triton": ["triton>=3.3"], "plots": ["matplotlib"],
                    "onnx": ["onnx", "onnxruntime", "onnxscript"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "peft", "matplotlib", "onnx", "onnxruntime",
                             "onnxscript"]},
    entry_points={"console_scripts": ["fpet=fpet_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
