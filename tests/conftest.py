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


@pytest.fixture
def true_fp32():
    """fp32 comparisons on CUDA run their convolutions and matmuls in real fp32, not TF32 (cuDNN
    allows TF32 by default): a TF32 twin differs from the reference by ~1e-4, not rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """Real steps of a tiny prior: on a busy 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
