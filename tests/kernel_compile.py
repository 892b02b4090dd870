"""Compile every Triton kernel of the package for real GPUs, on a machine without one.

The CPU tests run the kernels under TRITON_INTERPRET=1, which executes them as Python and
never lowers them: a kernel can pass there and still fail to compile for a GPU (types,
layouts, shared memory), or compile to slow code. Here each public wrapper is driven, forward
and backward, over the dtypes, layouts and options DiffLoss uses, on meta tensors (huge ones
reach the 64-bit offset variants). Its launches are recorded instead of run, specialized by
Triton's own launcher code for each architecture (strides of 1 become constants, values and
pointers divisible by 16 are marked so, as on a GPU), and each distinct one is compiled by
Triton's compiler down to a cubin, with its register, stack and local-memory use and how its
global loads are vectorized. Run without TRITON_INTERPRET:

    python tests/kernel_compile.py 90 89     # H100/H200 and RTX 4090; prints JSON
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import diffloss_fast.ops
from diffloss_fast.ops.attention_difference import attention_difference_triton
from diffloss_fast.ops.group_norm_silu import group_norm_silu_triton
from diffloss_fast.ops.group_norm_silu_difference import group_norm_silu_difference_triton
from diffloss_fast.ops.noising import q_sample_pair_triton
from diffloss_fast.ops.pair_conv import E4M3Operands, NextNorm, pair_conv2d, pair_prologue
from diffloss_fast.ops.resample_2x import avg_pool_2x2_triton, upsample_2x_triton
from diffloss_fast.ops.residual_bias_add import residual_bias_add_triton
from diffloss_fast.ops.weighted_l2 import weighted_l2_triton

META = torch.device("meta")
HALF = (torch.bfloat16, torch.float16, torch.float32)


def specialize(kernel: JITFunction, args, kwargs, target: GPUTarget):
    """What ``kernel[grid](*args, **kwargs)`` would compile on ``target``: Triton's own
    binder and argument packing (the code ``JITFunction.run`` runs before compiling)."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def _t(*shape, dtype=torch.float32, grad=False, channels_last=False):
    t = torch.empty(shape, device=META, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def drive() -> None:
    """Every wrapper, forward and backward, over the cases DiffLoss and its options reach."""
    for dtype in HALF:
        for channels_last in (False, True):
            # 8 channels per group as in ADM-256's 256-channel levels; 2 as in the tiny prior
            for channels in (256, 64) if dtype == torch.bfloat16 else (256,):
                x = _t(2, channels, 8, 8, dtype=dtype, grad=True, channels_last=channels_last)
                w, b = _t(channels, dtype=dtype), _t(channels, dtype=dtype)
                for film in ((), (_t(2, channels, dtype=dtype), _t(2, channels, dtype=dtype))):
                    group_norm_silu_triton(x, 32, w, b, 1e-5, *film).sum().backward()
                # a ResBlock's second norm: FiLM'd, with the first convolution's bias
                group_norm_silu_triton(x, 32, w, b, 1e-5, *film, x_bias=b).sum().backward()
                # its first: x passed on to the skip path, whose gradient the norm's adds;
                # an attention block's, without the SiLU
                for silu in (True, False):
                    y, passed = group_norm_silu_triton(x, 32, w, b, 1e-5, pass_x=True,
                                                       silu=silu)
                    (y.sum() + passed.sum()).backward()
                y = _t(2, channels, 8, 8, dtype=dtype, grad=True, channels_last=channels_last)
                residual_bias_add_triton(x, y, b).sum().backward()
                avg_pool_2x2_triton(x).sum().backward()
                upsample_2x_triton(x).sum().backward()
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
        # pair convolutions of ADM-256's ResBlocks: the second 3x3 (FiLM'd norm with the first
        # convolution's bias as x_bias, the residual pair added; also without a backward to
        # follow, no r saved), the first 3x3 (norm + SiLU), a 1x1 skip (no prologue); fp32
        # with and without TF32
        tf32 = torch.backends.cudnn.allow_tf32
        for cin, cout, size, kernel, norm in ((256, 256, 32, 3, "film"),
                                              (128, 128, 64, 3, "silu"),
                                              (512, 256, 32, 1, None)):
            for allow in (True, False) if dtype == torch.float32 and norm == "film" else (True,):
                torch.backends.cudnn.allow_tf32 = allow
                a = _t(2, cin, size, size, dtype=dtype, channels_last=True)
                d = _t(2, cin, size, size, dtype=dtype, grad=True, channels_last=True)
                w, b = _t(cout, cin, kernel, kernel, dtype=dtype), _t(cout, dtype=dtype)
                prologue = residual = None
                if norm is not None:
                    params = [_t(2, cin, dtype=dtype), _t(2, cin, dtype=dtype),
                              _t(cin, dtype=dtype)] if norm == "film" else [None] * 3
                    prologue = pair_prologue(a, d.detach(), _t(), 32, _t(cin, dtype=dtype),
                                             _t(cin, dtype=dtype), 1e-5, *params)
                if norm == "film":
                    residual = (_t(2, cout, size, size, dtype=dtype, channels_last=True),
                                _t(2, cout, size, size, dtype=dtype, grad=True,
                                   channels_last=True))
                    pair_conv2d(a, d.detach(), _t(), w, b, padding=1, prologue=prologue,
                                residual=(residual[0], residual[1].detach()))
                pair_conv2d(a, d, _t(), w, b, padding=kernel // 2, prologue=prologue,
                            residual=residual)[1].sum().backward()
                if norm == "silu":  # the first 3x3, its second norm's statistics as it writes
                    pair_conv2d(a, d, _t(), w, None, padding=1, prologue=prologue,
                                next_norm=NextNorm(32, 1e-5, b))[1].sum().backward()
            torch.backends.cudnn.allow_tf32 = tf32
            if dtype == torch.bfloat16:
                # on e4m3 operands (precision="fp8"): with a backward to follow (r saved) and
                # without; with the operands' amax found for delayed scaling (as the FP8
                # network's fused blocks run, the first 3x3 among them) and without
                q = E4M3Operands(_t(cout, cin, kernel, kernel, dtype=torch.float8_e4m3fn),
                                 _t(cout), _t(), _t())
                for amax in (_t(2),) if norm == "silu" else (None, _t(2)):
                    pair_conv2d(a, d, _t(), w, b, padding=kernel // 2, prologue=prologue,
                                residual=residual, quantized=q,
                                amax_out=amax)[1].sum().backward()
                    pair_conv2d(a, d.detach(), _t(), w, b, padding=kernel // 2,
                                prologue=prologue, residual=residual and (residual[0],
                                                                          residual[1].detach()),
                                quantized=q, amax_out=amax)
        if dtype == torch.bfloat16:
            # a ResBlock that changes resolution: its first norm's output resampled 2x as its
            # first 3x3 loads it (up: 16x16 to 32x32, down: 64x64 to 32x32), r saved at the
            # input's size, the backward through the resampling's adjoint. 256 channels with
            # FiLM, x_bias and the residual pair; 512 (16 channels a group) with the norm and
            # SiLU alone, as the block's first convolution runs (the bias left to the next
            # norm where it adds up that norm's statistics); each with and without the next
            # norm's statistics, with a backward to follow and without (no r saved), and on
            # e4m3 operands with their amax found
            for resample, size in (("up", 16), ("down", 64)):
                out = 2 * size if resample == "up" else size // 2
                for c, film in ((256, True), (512, False)):
                    a = _t(2, c, size, size, dtype=dtype, channels_last=True)
                    d = _t(2, c, size, size, dtype=dtype, grad=True, channels_last=True)
                    w, b = _t(c, c, 3, 3, dtype=dtype), _t(c, dtype=dtype)
                    params = [_t(2, c, dtype=dtype), _t(2, c, dtype=dtype),
                              _t(c, dtype=dtype)] if film else [None] * 3
                    prologue = pair_prologue(a, d.detach(), _t(), 32, _t(c, dtype=dtype),
                                             _t(c, dtype=dtype), 1e-5, *params)
                    residual = None
                    if film:
                        residual = (_t(2, c, out, out, dtype=dtype, channels_last=True),
                                    _t(2, c, out, out, dtype=dtype, grad=True,
                                       channels_last=True))
                    q = E4M3Operands(_t(c, c, 3, 3, dtype=torch.float8_e4m3fn), _t(c), _t(),
                                     _t())
                    for quantized, amax in ((None, None), (q, _t(2))):
                        for next_norm in (None, NextNorm(32, 1e-5, b)):
                            kw = dict(padding=1, prologue=prologue, quantized=quantized,
                                      amax_out=amax, next_norm=next_norm, resample=resample)
                            pair_conv2d(a, d, _t(), w, None if next_norm else b,
                                        residual=residual, **kw)[1].sum().backward()
                            pair_conv2d(a, d.detach(), _t(), w, None if next_norm else b,
                                        residual=residual and (residual[0],
                                                               residual[1].detach()), **kw)
        # a decoder ResBlock's concatenated input read in place (1024 + 512 channels: groups
        # of 48 straddle the boundary): its norm's statistics, its first 3x3, its 1x1 skip
        parts = [(_t(2, c, 16, 16, dtype=dtype, channels_last=True),
                  _t(2, c, 16, 16, dtype=dtype, grad=True, channels_last=True))
                 for c in (1024, 512)]
        (a, d), (a2, d2) = parts
        prologue = pair_prologue(a, d.detach(), _t(), 32, _t(1536, dtype=dtype),
                                 _t(1536, dtype=dtype), 1e-5, concat=(a2, d2.detach()))
        for kernel, norm in ((3, prologue), (1, None)):
            w = _t(512, 1536, kernel, kernel, dtype=dtype)
            pair_conv2d(a, d, _t(), w, _t(512, dtype=dtype), padding=kernel // 2,
                        prologue=norm, concat=(a2, d2))[1].sum().backward()
            if dtype == torch.bfloat16:  # on e4m3 operands, the amax found for the scaling
                q = E4M3Operands(_t(512, 1536, kernel, kernel, dtype=torch.float8_e4m3fn),
                                 _t(512), _t(), _t())
                pair_conv2d(a, d, _t(), w, None, padding=kernel // 2, prologue=norm,
                            concat=(a2, d2), quantized=q, amax_out=_t(2))[1].sum().backward()
        # the pair pass's GroupNorm (+ FiLM) (+ SiLU), differentiated to d: 8 channels a group
        # as at ADM-256's 256-channel levels, 2 as in the tiny prior; every option, and once
        # without a backward to follow (no r saved)
        for channels in (256, 64):
            a = _t(2, channels, 8, 8, dtype=dtype, channels_last=True)
            d = _t(2, channels, 8, 8, dtype=dtype, grad=True, channels_last=True)
            w, film = _t(channels, dtype=dtype), (_t(2, channels, dtype=dtype),) * 2
            for options in range(8):
                sc_sh = film if options & 1 else (None, None)
                xb, silu = w if options & 2 else None, not options & 4
                group_norm_silu_difference_triton(a, d, _t(), 32, w, w, 1e-5, *sc_sh, xb,
                                                  silu)[1].sum().backward()
            group_norm_silu_difference_triton(a, d.detach(), _t(), 32, w, w, 1e-5)
        # pair attention as the prior's attention blocks call it: (B, heads, T, dh) views of
        # (B, T, heads * 3 * dh) projections, 16x16 and 8x8 tokens, 64-wide heads
        for tokens in (64, 256):
            pair = [u.transpose(1, 2) for grad in (False, True)
                    for u in _t(2, tokens, 768, dtype=dtype, grad=grad)
                    .unflatten(-1, (4, 3, 64)).unbind(3)]
            attention_difference_triton(*pair, _t())[1].sum().backward()
        if dtype == torch.bfloat16:  # 64-bit offsets: operands spanning more than 2**31
            big = _t(11000, 256, 768, dtype=dtype).unflatten(-1, (4, 3, 64)).unbind(3)
            attention_difference_triton(*[u.transpose(1, 2) for u in big] * 2, _t())


def record_launches() -> list[tuple]:
    """(kernel, args, kwargs) of every launch ``drive`` makes, recorded instead of run."""
    launches = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

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
    results, seen = [], set()
    for kernel, args, kwargs in record_launches():
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            options, signature, constexprs, attrs = specialize(kernel, args, kwargs, target)
            key = (kernel.fn.__name__, arch, repr(signature), repr(constexprs), repr(attrs),
                   repr(sorted(options.__dict__.items())))
            if key in seen:
                continue
            seen.add(key)
            row = {"kernel": kernel.fn.__name__, "arch": arch, "signature": signature,
                   "constexprs": {kernel.arg_names[path[0]]: repr(v)
                                  for path, v in constexprs.items()},
                   "num_warps": options.num_warps}
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                          target=target, options=options.__dict__)
                ptx = compiled.asm["ptx"]
                loads = Counter(re.findall(r"ld\.global(?:\.v\d)?", ptx))
                row.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]),
                           shared_bytes=compiled.metadata.shared,
                           usage=resource_usage(compiled.asm["cubin"]),
                           vector_loads=loads["ld.global.v2"] + loads["ld.global.v4"],
                           scalar_loads=loads["ld.global"])
            except Exception as err:  # noqa: BLE001 - every failure is reported, not raised
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
            results.append(row)
    return results


def package_kernels() -> list[str]:
    """Every Triton kernel the package defines (launched ones; helpers are inlined), in every
    module of ``diffloss_fast.ops`` but the native extension's."""
    names = [m.name for m in pkgutil.iter_modules(diffloss_fast.ops.__path__)
             if m.name != "native"]
    modules = [importlib.import_module(f"diffloss_fast.ops.{name}") for name in names]
    return sorted(name for module in modules for name, value in vars(module).items()
                  if isinstance(value, JITFunction) and name.endswith("_kernel"))


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or [90]
    print(json.dumps({"kernels": package_kernels(), "results": compile_all(archs)}, indent=1))
