"""Compile every Triton kernel of the package for real GPUs, on a machine without one.

The CPU tests run the kernels under TRITON_INTERPRET=1, which executes them as Python and
never lowers them: a kernel can pass there and still fail to compile for a GPU (types,
layouts, shared memory). Here each public wrapper is driven, forward and backward, over the
dtypes, layouts and options DiffLoss uses, on meta tensors (huge ones reach the 64-bit
offset variants); its launches are recorded instead of run, and each distinct one is compiled
by Triton's own compiler down to a cubin for the given architectures, with its register,
stack and local-memory use. Run without TRITON_INTERPRET:

    python tests/kernel_compile.py 90 89     # H100/H200 and RTX 4090; prints JSON
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from diffloss_fast.ops.group_norm_silu import group_norm_silu_triton
from diffloss_fast.ops.noising import q_sample_pair_triton
from diffloss_fast.ops.weighted_l2 import weighted_l2_triton

META = torch.device("meta")
HALF = (torch.bfloat16, torch.float16, torch.float32)
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.int64: "i64", torch.int32: "i32"}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def launch_signature(kernel: JITFunction, args, kwargs) -> tuple:
    """(name, signature, constexprs, options) of one launch, hashable."""
    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = bound[name]
        if "constexpr" in str(param.annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = _type(value)
    options = {k: v for k, v in kwargs.items() if k not in params}
    return (kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()),
            tuple(sorted(options.items())))


def _t(*shape, dtype=torch.float32, grad=False, channels_last=False):
    t = torch.empty(shape, device=META, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def drive() -> None:
    """Every wrapper, forward and backward, over the cases DiffLoss and its options reach."""
    for dtype in HALF:
        for channels_last in (False, True):
            x = _t(2, 64, 8, 8, dtype=dtype, grad=True, channels_last=channels_last)
            w, b = _t(64, dtype=dtype), _t(64, dtype=dtype)
            for film in ((), (_t(2, 64, dtype=dtype), _t(2, 64, dtype=dtype))):
                group_norm_silu_triton(x, 32, w, b, 1e-5, *film).sum().backward()
            for big in (False, True):  # 64-bit offsets past 2**31 elements
                shape = (1, 3, 30000, 30000) if big else (2, 3, 16, 16)
                restored = _t(*shape, grad=True)
                coef = _t(shape[0])
                xt, _ = q_sample_pair_triton(restored, _t(*shape), _t(*shape), coef, coef,
                                             scale=2.0, offset=-1.0, out_dtype=dtype,
                                             channels_last=channels_last)
                xt.sum().backward()
        strided = _t(2, 3, 16, 32, grad=True)[..., ::2]  # not dense: the strided variant
        q_sample_pair_triton(strided, _t(2, 3, 16, 16), _t(2, 3, 16, 16), _t(2), _t(2),
                             scale=2.0, offset=-1.0, out_dtype=dtype)[0].sum().backward()
        p, q = _t(2, 3, 16, 16, dtype=dtype, grad=True), _t(2, 3, 16, 16, dtype=dtype)
        weighted_l2_triton(p, q, _t(2)).backward()
        restored = _t(2, 3, 16, 16, grad=True)
        weighted_l2_triton(p, q, _t(2), x=restored, y=_t(2, 3, 16, 16), x_coef=_t(2),
                           p_coef=_t(2)).backward()
        h = _t(2, 1024, 8, 8, dtype=dtype, grad=True, channels_last=True)
        weighted_l2_triton(h, _t(2, 1024, 8, 8, dtype=dtype), _t(2)).backward()


def record_launches() -> dict[tuple, JITFunction]:
    """Each distinct launch ``drive`` makes, recorded instead of run."""
    launches = {}
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.setdefault(launch_signature(self, args, kwargs), self)

    JITFunction.run = record
    try:
        drive()
    finally:
        JITFunction.run = run
    return launches


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL, SHARED of a cubin, read by the cuobjdump Triton ships: STACK or
    LOCAL above 0 means registers spilled to memory."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)],
                              capture_output=True, text=True, check=True).stdout
    usage = text.split("Function", 1)[1]
    return {key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))
            for key in ("REG", "STACK", "LOCAL", "SHARED")}


def compile_all(archs: list[int]) -> list[dict]:
    results = []
    for (name, signature, constexprs, options), kernel in record_launches().items():
        for arch in archs:
            row = {"kernel": name, "arch": arch, "signature": dict(signature),
                   "constexprs": {k: repr(v) for k, v in constexprs},
                   "options": dict(options)}
            try:
                compiled = triton.compile(ASTSource(kernel, dict(signature), dict(constexprs)),
                                          target=GPUTarget("cuda", arch, 32),
                                          options=dict(options))
                row.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]),
                           shared_bytes=compiled.metadata.shared,
                           usage=resource_usage(compiled.asm["cubin"]))
            except Exception as err:  # noqa: BLE001 - every failure is reported, not raised
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
            results.append(row)
    return results


def package_kernels() -> list[str]:
    """Every Triton kernel the package defines (launched ones; helpers are inlined)."""
    modules = [importlib.import_module(f"diffloss_fast.ops.{name}")  # ops.weighted_l2 is
               for name in ("group_norm_silu", "noising", "weighted_l2")]  # also a function
    return sorted(name for module in modules for name, value in vars(module).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel"))


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or [90]
    print(json.dumps({"kernels": package_kernels(), "results": compile_all(archs)}, indent=1))
