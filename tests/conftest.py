import os

import torch

# Without a GPU the Triton kernels run under the interpreter. The flag must be set before triton is first imported
# (triton.language's own jit functions, e.g. tl.sum, are built at import; fpet_kernels imports triton only when the
# Triton backend is first probed or used, timm may import it earlier): so here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
