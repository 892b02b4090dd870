"""Benchmark set-up: ADM-256 at 256x256, batch 8 on CUDA; the tiny prior on the CPU.

The sizes can be changed with DIFFLOSS_BENCH_BATCH / DIFFLOSS_BENCH_RESOLUTION.
"""
import os
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import diffloss_fast as dl

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def bench_prior():
    prior = dl.build_prior("adm-256-uncond" if DEVICE.type == "cuda" else "tiny")
    return prior.to(DEVICE)


@pytest.fixture(scope="session")
def bench_shape():
    batch = int(os.environ.get("DIFFLOSS_BENCH_BATCH", 8 if DEVICE.type == "cuda" else 2))
    resolution = int(os.environ.get("DIFFLOSS_BENCH_RESOLUTION", 256 if DEVICE.type == "cuda" else 32))
    return batch, resolution
