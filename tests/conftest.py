"""Test configuration: the Triton kernels run under the interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set before any test module
imports diffloss_fast.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from random_unets import randomized_unet  # noqa: E402


@pytest.fixture(scope="session")
def tiny_unet():
    return randomized_unet()
