"""Test-session setup that must happen before any test module imports triton.

Without CUDA, Triton kernels run under the interpreter. Triton reads TRITON_INTERPRET when it is imported and
when ``@triton.jit`` decorates, and importing kvcompile (through torch._dynamo) may import triton, so the
variable is set here, before any test module is collected, rather than in the kernel test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
