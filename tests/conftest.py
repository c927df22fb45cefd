import os
import sys

import torch

# Without a GPU the Triton kernels run under the interpreter. The flag must be set before triton is first imported
# (triton.language's own jit functions, e.g. tl.sum, are built at import), and importing fpet_kernels or timm
# already imports triton: so here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Let test modules import shared helpers from each other (e.g. `from test_timm import tiny_vit`).
sys.path.insert(0, os.path.dirname(__file__))
