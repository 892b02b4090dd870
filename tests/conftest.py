"""Test configuration: the Triton kernels run under the interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set before any test module
imports diffloss_fast.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
