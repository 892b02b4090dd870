"""What the Triton ops share: Triton itself (optional), the dtypes their kernels take, launch
arithmetic, and the indexing of the elementwise kernels that read tensors of any strides.

Launch arithmetic is plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are
constexpr functions, which unwrap their arguments on every host call, and a step works out
hundreds of launch shapes on the host's critical path.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch twins still work
    triton = tl = None

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2 ** 31 - 1


def require_triton(op: str) -> None:
    """Refuse to run ``op`` where the triton package is missing."""
    if triton is None:
        raise ValueError(f"{op} needs the triton package, which is not installed")


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# --- tensors of any strides, one sample per program row ----------------------------------

def sample_dense(t: torch.Tensor) -> bool:
    """Whether one sample of ``t`` (dims 1..3) is one dense block, in whatever dim order."""
    dims = sorted((t.stride(i), t.size(i)) for i in range(1, 4) if t.size(i) > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense_alike(*ts: torch.Tensor) -> bool:
    """Same strides (size-1 dims aside) and dense samples: then a flat in-sample index is the
    same logical element in every tensor and the kernel skips the (c, h, w) arithmetic."""
    ref = ts[0]
    if not sample_dense(ref):
        return False
    return all(t.stride(i) == ref.stride(i) for t in ts[1:] for i in range(1, 4)
               if ref.size(i) > 1)


def channels_innermost(t: torch.Tensor) -> bool:
    """Channels are the innermost dim in memory: iterate (h, w, c) so accesses coalesce."""
    return t.size(1) > 1 and t.stride(1) == 1 and t.stride(3) != 1


def needs_i64(*ts: torch.Tensor) -> bool:
    """Offsets overflow int32 beyond 2^31 elements of span; only then pay for int64 math."""
    for t in ts:
        if t.numel() > INT32_MAX:
            return True
        if sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= INT32_MAX:
            return True
    return False


if triton is not None:

    @triton.jit
    def chw(i, C, H, W, CL: tl.constexpr):
        """Logical (c, h, w) of in-sample index i, in NCHW or NHWC iteration order."""
        if CL:
            c = i % C
            hw = i // C
            w = hw % W
            h = hw // W
        else:
            w = i % W
            ch = i // W
            h = ch % H
            c = ch // H
        return c, h, w
