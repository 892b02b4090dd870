"""``backend="native"``: the fused ops as a C++ (CPU, OpenMP) / CUDA extension from ``csrc/``.

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load` and cached by
torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), so
only the first call in a fresh environment pays for the build. Importing this module never
compiles anything and never fails for lack of a toolchain: a missing compiler, ninja or headers
surfaces as ``RuntimeError("backend='native' could not be built: ...")`` when the backend is
first used, and :func:`native_available` answers without raising.

The CUDA kernels (``csrc/diffloss_ops_cuda.cu``) are compiled in when torch sees a CUDA device
and ``torch.utils.cpp_extension.CUDA_HOME`` (nvcc) is set; otherwise the build is CPU-only and
CUDA tensors get a clear RuntimeError.

Semantics are those of the plain-PyTorch twins :func:`~diffloss_fast.ops.noising.q_sample_pair_torch`
and :func:`~diffloss_fast.ops.weighted_l2.weighted_l2_torch`, with gradients to ``restored``, ``p``
and ``x`` only (the coefficients and weights are treated as constants).
"""
from __future__ import annotations

import importlib.resources
import os
import shutil
import sysconfig
import threading
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .autocast import without_autocast
from .checks import check_q_sample_pair, is_channels_last
from .weighted_l2 import _check

__all__ = ["native_available", "load_extension", "q_sample_pair_native", "weighted_l2_native"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SOURCES = ("diffloss_ops.cpp", "diffloss_ops_cuda.cu")

_lock = threading.Lock()
_ext = None          # the loaded extension module
_error: str | None = None  # why the build failed (cached: a failing build is not retried)


def _prefix(msg: str) -> str:
    return f"backend='native' could not be built: {msg}"


def source_dir() -> Path:
    """The folder holding the C++/CUDA sources: packaged ``diffloss_fast/csrc`` first, then
    ``csrc/`` of a repository checkout (editable install)."""
    candidates = []
    try:
        res = importlib.resources.files("diffloss_fast") / "csrc"
        if isinstance(res, Path):
            candidates.append(res)
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual loaders
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "csrc")
    for cand in candidates:
        if (cand / _SOURCES[0]).is_file():
            return cand
    raise RuntimeError(_prefix("the C++ sources (csrc/diffloss_ops.cpp) were not found in "
                               + " or ".join(str(c) for c in candidates)))


def _cuda_wanted() -> bool:
    from torch.utils import cpp_extension
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def toolchain_problem() -> str | None:
    """What is missing to build the extension here (None when nothing is)."""
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    try:
        cpp_extension.verify_ninja_availability()
    except (RuntimeError, OSError):
        return "ninja is not available (pip install ninja)"
    if not any((Path(p) / "torch" / "extension.h").is_file()
               for p in cpp_extension.include_paths()):
        return "torch's C++ headers (torch/extension.h) are missing from this torch install"
    py_include = sysconfig.get_paths().get("include")
    if not py_include or not (Path(py_include) / "Python.h").is_file():
        return f"the Python headers (Python.h) are missing from {py_include} (install python3-dev)"
    return None


def _build():
    """Compile (or fetch from torch's cache) and import the extension. Raises RuntimeError."""
    problem = toolchain_problem()
    if problem is not None:
        raise RuntimeError(_prefix(problem))
    from torch.utils import cpp_extension
    src = source_dir()
    sources = [str(src / _SOURCES[0])]
    cflags = ["-O3", "-fopenmp"]
    with_cuda = _cuda_wanted() and (src / _SOURCES[1]).is_file()
    if with_cuda:
        sources.append(str(src / _SOURCES[1]))
        cflags.append("-DDIFFLOSS_WITH_CUDA")
    name = "diffloss_fast_native_cuda" if with_cuda else "diffloss_fast_native"
    try:
        return cpp_extension.load(
            name=name, sources=sources, extra_cflags=cflags,
            extra_cuda_cflags=["-O3"] if with_cuda else None, extra_ldflags=["-fopenmp"],
            with_cuda=with_cuda, verbose=os.environ.get("DIFFLOSS_NATIVE_VERBOSE") == "1")
    except Exception as exc:  # compiler errors, missing libraries, import failures
        raise RuntimeError(_prefix(f"compiling {', '.join(Path(s).name for s in sources)} "
                                   f"failed: {exc}")) from exc


def load_extension():
    """The compiled extension module, built on the first call. Raises RuntimeError with what is
    missing when it cannot be built (the failure is remembered: later calls fail fast)."""
    global _ext, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None:
            if _error is not None:
                raise RuntimeError(_error)
            try:
                _ext = _build()
            except RuntimeError as exc:
                _error = str(exc)
                raise
    return _ext


def native_available() -> bool:
    """Whether the native backend can run here (tries the build once; never raises)."""
    try:
        load_extension()
    except Exception:  # noqa: BLE001 - the answer is the point
        return False
    return True


def _ext_for(t: torch.Tensor):
    ext = load_extension()
    if t.device.type == "cuda" and not ext.with_cuda():
        from torch.utils import cpp_extension
        raise RuntimeError(
            "backend='native' has no CUDA kernels in this build (it was compiled for the CPU "
            f"only: torch.cuda.is_available()={torch.cuda.is_available()}, "
            f"CUDA_HOME={cpp_extension.CUDA_HOME}); use backend='torch' or 'triton' for CUDA "
            "tensors, or install the CUDA toolkit (nvcc) and restart")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='native' runs on CPU and CUDA tensors, got device {t.device}")
    return ext


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _coef(c, n: int, like: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """A per-sample coefficient as a contiguous (n,) tensor of ``dtype`` on ``like``'s device
    (one element broadcasts, as in the twins)."""
    c = torch.as_tensor(c).detach().to(device=like.device, dtype=dtype).reshape(-1)
    if c.numel() == 1 and n != 1:
        c = c.expand(n)
    if c.numel() != n:
        raise ValueError(f"{name} must have one value per sample ({n}), got {c.numel()}")
    return c.contiguous()


# ------------------------------------------------------------------------------------------------
# q_sample_pair

class _QSamplePair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, restored, gt, noise, coef_signal, coef_noise, scale, offset, out_dtype,
                channels_last):
        ext = _ext_for(restored)
        acc = _acc(restored.dtype)
        r, g, n = restored.detach(), gt.detach(), noise.detach()
        if not (r.dtype in _FLOATS and g.dtype == r.dtype and n.dtype == r.dtype):
            # mixed dtypes: the twin converts each to the accumulation dtype first (exact for r)
            r, g, n = r.to(acc), g.to(acc), n.to(acc)
        B = restored.shape[0]
        cs = _coef(coef_signal, B, restored, acc, "coef_signal")
        cn = _coef(coef_noise, B, restored, acc, "coef_noise")
        xt_res, xt_gt = ext.q_sample_pair_forward(r, g, n, cs, cn, float(scale), float(offset),
                                                  out_dtype, bool(channels_last))
        ctx.save_for_backward(cs)
        ctx.scale = float(scale)
        ctx.in_dtype = restored.dtype
        ctx.grad_channels_last = is_channels_last(restored)
        ctx.mark_non_differentiable(xt_gt)
        return xt_res, xt_gt

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad_res, grad_gt):
        grad_restored = None
        if ctx.needs_input_grad[0] and grad_res is not None:
            (cs,) = ctx.saved_tensors
            in_dtype = ctx.in_dtype if ctx.in_dtype in _FLOATS else _acc(ctx.in_dtype)
            grad_restored = _ext_for(grad_res).q_sample_pair_backward(
                grad_res, cs, ctx.scale, in_dtype, ctx.grad_channels_last)
            if grad_restored.dtype != ctx.in_dtype:
                grad_restored = grad_restored.to(ctx.in_dtype)
        return grad_restored, None, None, None, None, None, None, None, None


def q_sample_pair_native(restored, gt, noise, coef_signal, coef_noise, *, scale, offset,
                         out_dtype, channels_last=False):
    """Native twin of :func:`~diffloss_fast.ops.noising.q_sample_pair_torch`: one pass writes
    both noised images in ``out_dtype`` (channels_last when asked); gradient to ``restored``."""
    check_q_sample_pair(restored, gt, noise, out_dtype, backend="native", out_dtypes=_FLOATS)
    return _QSamplePair.apply(restored, gt, noise, coef_signal, coef_noise, scale, offset,
                              out_dtype, channels_last)


# ------------------------------------------------------------------------------------------------
# weighted_l2

class _WeightedL2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, q, weight, x, y, x_coef, p_coef):
        ext = _ext_for(p)
        acc = _acc(p.dtype)
        data = [p.detach(), q.detach()]
        if x is not None:
            data += [x.detach(), y.detach()]
        if not (data[0].dtype in _FLOATS and all(t.dtype == data[0].dtype for t in data)):
            data = [t.to(acc) for t in data]  # the twin converts each to acc first
        for t, name in zip(data[1:], ("q", "x", "y")):
            if t.device != p.device:
                raise ValueError(f"weighted_l2: {name} is on {t.device}, p on {p.device}")
        B = p.shape[0]
        w = _coef(weight, B, p, acc, "weight")
        if x is not None:
            xc = _coef(x_coef, B, p, acc, "x_coef")
            pc = _coef(p_coef, B, p, acc, "p_coef")
            pd, qd, xd, yd = data
        else:
            xc = pc = xd = yd = None
            pd, qd = data
        out = ext.weighted_l2_forward(pd, qd, w, xd, yd, xc, pc)
        ctx.save_for_backward(pd, qd, w, xd, yd, xc, pc)
        ctx.p_dtype = p.dtype
        ctx.x_dtype = None if x is None else x.dtype
        return out

    @staticmethod
    @without_autocast
    @once_differentiable
    def backward(ctx, grad):
        need_p = ctx.needs_input_grad[0]
        need_x = ctx.needs_input_grad[3]
        if not (need_p or need_x):
            return None, None, None, None, None, None, None
        pd, qd, w, xd, yd, xc, pc = ctx.saved_tensors
        grad = grad.detach().to(device=pd.device, dtype=w.dtype).reshape(())
        gp, gx = _ext_for(pd).weighted_l2_backward(grad, pd, qd, w, xd, yd, xc, pc,
                                                   need_p, need_x)
        if gp is not None and gp.dtype != ctx.p_dtype:
            gp = gp.to(ctx.p_dtype)
        if gx is not None and gx.dtype != ctx.x_dtype:
            gx = gx.to(ctx.x_dtype)
        return gp, None, None, gx, None, None, None


def weighted_l2_native(p, q, weight, x=None, y=None, x_coef=None, p_coef=None):
    """Native twin of :func:`~diffloss_fast.ops.weighted_l2.weighted_l2_torch`: deterministic
    fp32 (fp64 for fp64 inputs) reduction; gradient to ``p`` and ``x``."""
    _check(p, q, weight, x, y, x_coef, p_coef)
    return _WeightedL2.apply(p, q, weight, x, y, x_coef, p_coef)
