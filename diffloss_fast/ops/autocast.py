"""Autocast switched off around the loss's own precision.

The loss computes in the precision it was built for, wherever it is called: a caller's
``torch.autocast`` region must not recast the prior's convolutions, whose saved weights would
then meet gradients of another dtype in the backward pass. The forward runs with autocast off,
and so does each custom backward (autograd runs a custom backward under the autocast state of
the thread calling ``backward()``).
"""
from __future__ import annotations

import contextlib
import functools

import torch

_DEVICE_TYPES = ("cpu", "cuda")


@contextlib.contextmanager
def autocast_disabled():
    """Autocast off for every device type on which it is on; nothing to do where it is off."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def without_autocast(fn):
    """Decorator: ``fn`` runs with autocast off (for custom backward passes)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_disabled():
            return fn(*args, **kwargs)
    return wrapper
