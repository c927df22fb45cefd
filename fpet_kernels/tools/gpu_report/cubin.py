"""Reading compiled GPU code with ``cuobjdump`` (shipped with Triton): a Triton cubin, or the CUDA C++ kernels of the
built extension ``fpet_kernels._C``.

* ``--dump-resource-usage``: registers ``REG``, ``STACK`` + ``LOCAL`` bytes (spills), static ``SHARED`` per kernel;
* ``-sass``: opcode counts (HMMA = mma.sync on sm_80 and sm_90, HGMMA = wgmma on sm_90; STL/LDL local memory);
* ``-elf``: ``EIATTR_MAX_THREADS`` of each kernel's ``.nv.info`` section, the block size of its
  ``__launch_bounds__``.

The extension is a host shared library with the cubins embedded in fat binaries: ``cuobjdump`` lists each one under
a ``Fatbin elf code:`` header followed by its ``arch = sm_XX`` line (a ``Fatbin ptx code:`` entry is PTX, not a
cubin), and ``-arch sm_XX`` restricts a dump to the cubins of that arch. So the report needs no CUDA toolkit and no
sources: it reads what was built, also from an installed wheel.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .rows import KernelRow, occupancy_warps

PathLike = Union[str, Path]

# Threads per block assumed for a CUDA C++ kernel without __launch_bounds__ (no EIATTR_MAX_THREADS): kBlockThreads of
# csrc/cuda/cuda_common.cuh, which threads_for_channels(C) reaches for C >= 256.
DEFAULT_BLOCK_THREADS = 256


def nvidia_tool(name: str) -> str:
    """``cuobjdump`` / ``nvdisasm`` / ``ptxas`` as shipped in Triton's NVIDIA backend (no toolkit needed)."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (install triton, or put a CUDA toolkit's bin/ on PATH)")
    return found


def _cuobjdump(option: str, binary: PathLike, arch: Optional[int] = None) -> str:
    """``cuobjdump <option> [-arch sm_<arch>] <binary>``: a cubin, or a host binary with embedded fat binaries."""
    selected = ["-arch", f"sm_{arch}"] if arch is not None else []
    return subprocess.run([nvidia_tool("cuobjdump"), option, *selected, str(binary)],
                          check=True, capture_output=True, text=True).stdout


def resource_usage(binary: PathLike, arch: Optional[int] = None) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: mangled function name -> {"REG", "STACK", "SHARED", "LOCAL", ...}, for
    the cubins of ``sm_<arch>`` only if given."""
    usage: Dict[str, Dict[str, int]] = {}
    name = None
    for line in _cuobjdump("--dump-resource-usage", binary, arch).splitlines():
        match = re.match(r"\s*Function (\S+):\s*$", line)
        if match:
            name = match.group(1)
        elif name is not None and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return usage


def sass_counts(binary: PathLike, arch: Optional[int] = None) -> Dict[str, Counter]:
    """Per mangled function: counts of HMMA (mma.sync), HGMMA (wgmma), FFMA and local-memory (STL/LDL) opcodes."""
    counts: Dict[str, Counter] = {}
    current: Optional[Counter] = None
    for line in _cuobjdump("-sass", binary, arch).splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = counts.setdefault(match.group(1), Counter())
        elif current is not None:
            opcode = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if opcode:
                current[opcode.group(1)] += 1
    return counts


def max_threads(binary: PathLike, arch: Optional[int] = None) -> Dict[str, int]:
    """Per mangled function with ``__launch_bounds__``: its maximum threads per block, the ``EIATTR_MAX_THREADS``
    attribute (``Value: 0x100 0x1 0x1``, x y z) of its ``.nv.info.<function>`` section in ``cuobjdump -elf``."""
    threads: Dict[str, int] = {}
    function = attribute = None
    for line in _cuobjdump("-elf", binary, arch).splitlines():
        section = re.match(r"\.nv\.info\.(\S+)\s*$", line)
        if section or (line and not line[0].isspace()):  # a new section
            function, attribute = (section.group(1) if section else None), None
            continue
        fields = line.strip().split(None, 1)
        if fields and fields[0] == "Attribute:":
            attribute = fields[1] if len(fields) > 1 else None
        elif function and attribute == "EIATTR_MAX_THREADS" and fields and fields[0] == "Value:":
            threads[function] = math.prod(int(v, 16) for v in fields[1].split())
    return threads


def tensor_core_label(mma: Counter, dot_kinds: Sequence[str]) -> Tuple[int, str]:
    """-> (number of tensor-core instructions, label). ``dot_kinds``: one entry per dot product of the kernel, e.g.
    "bf16" or "fp32 ieee" (operand type and input precision)."""
    kinds = ", ".join(sorted(set(dot_kinds)))
    hgmma, hmma = mma.get("HGMMA", 0), mma.get("HMMA", 0)
    if hgmma or hmma:
        instructions = f"HGMMA x{hgmma}" if hgmma else f"HMMA x{hmma}"
        return hgmma + hmma, f"yes: {instructions}" + (f" ({kinds} dot)" if kinds else "")
    if dot_kinds:
        return 0, f"no: {kinds} dot on FFMA"
    return 0, "no dot"


# ------------------------------------------------------------------------------------------------ the extension
def extension_library() -> Optional[Path]:
    """The shared library of the built extension ``fpet_kernels._C`` (found, not imported), or None if not built."""
    spec = importlib.util.find_spec("fpet_kernels._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def built_cuda_archs() -> Optional[List[int]]:
    """The arch list the extension is built for by default: ``fpet_kernels/cuda_archs.txt`` (``80;86;89;90``; a
    ``#`` comments out the rest of its line), the file setup.py and CMakeLists.txt read, from the installed package;
    None if the package has no such file."""
    path = importlib.resources.files("fpet_kernels").joinpath("cuda_archs.txt")
    if not path.is_file():
        return None
    text = ";".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    return [int(a) for a in text.split(";") if a.strip()]


def embedded_archs(library: PathLike) -> List[int]:
    """The archs of the cubins with at least one kernel in a host binary: the ``arch = sm_XX`` line under each
    ``Fatbin elf code:`` header of ``cuobjdump --dump-resource-usage``. Empty for a binary without device code
    (an extension built with FPET_SKIP_CUDA_BUILD=1)."""
    try:
        text = _cuobjdump("--dump-resource-usage", library)
    except subprocess.CalledProcessError as error:
        if "does not contain device code" in (error.stderr or "") + (error.stdout or ""):
            return []
        raise
    archs = set()
    kind = arch = None
    for line in text.splitlines():
        header, arch_line = re.match(r"Fatbin (\w+) code:", line), re.match(r"arch = sm_(\d+)", line)
        if header:
            kind, arch = header.group(1), None
        elif arch_line:
            arch = int(arch_line.group(1))
        elif kind == "elf" and arch is not None and re.match(r"\s*Function \S+:", line):
            archs.add(arch)
    return sorted(archs)


_CUDA_DTYPES = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16"}


def _demangle(names: Sequence[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def cuda_rows(library: str, arch: int) -> Tuple[List[KernelRow], List[str]]:
    """Every kernel of the ``sm_<arch>`` cubins of the built extension ``library`` -> (rows, names of the kernels
    without ``__launch_bounds__``, whose rows assume ``DEFAULT_BLOCK_THREADS``). Runs in a worker process."""
    usage = resource_usage(library, arch)
    sass = sass_counts(library, arch)
    bounds = max_threads(library, arch)
    rows, unbounded = [], set()
    for mangled, pretty in zip(usage, _demangle(list(usage))):
        match = re.search(r"(\w+_kernel)(?:<(.*)>)?\(", pretty)
        name, template = (match.group(1), match.group(2) or "") if match else (pretty, "")
        parts = [p.strip() for p in re.split(r",\s*(?![^<>]*>)", template) if p.strip()]
        dtype = _CUDA_DTYPES.get(parts[0], "-") if parts else "-"
        config = ", ".join(p.replace("fpet::", "") for p in parts[1:]) or "-"
        if mangled not in bounds:
            unbounded.add(name)
        warps = max(1, math.ceil(bounds.get(mangled, DEFAULT_BLOCK_THREADS) / 32))
        regs, shared = usage[mangled]["REG"], usage[mangled].get("SHARED", 0)
        mma, label = tensor_core_label(sass.get(mangled, Counter()), [])
        stack = usage[mangled].get("STACK", 0) + usage[mangled].get("LOCAL", 0)
        rows.append(KernelRow("cuda", name, config, dtype, arch, regs, stack, shared, warps,
                              occupancy_warps(arch, regs, shared, warps), 0, 0, mma,
                              label if mma else "no: scalar code (FFMA), no MMA"))
    return rows, sorted(unbounded)
