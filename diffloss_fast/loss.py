"""DiffLoss (the fast path) and ReferenceDiffLoss (the plain baseline), as nn.Modules.

Both compute, for restored images x̂ and targets y noised with the same noise at the same
timestep t, the weighted sum of
- natural:  mean((ε_θ(x_t^res) - ε_θ(x_t^gt))²)   (target "eps")
            or mean((x_{t-1}^res - x_{t-1}^gt)²)   (target "x_prev", the posterior means)
- semantic: mean((h(x_t^res) - h(x_t^gt))²)       (h: the middle block's output)
with gradients flowing to x̂ only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import ops, validation
from .cuda_graph import GraphCache
from .difference_unet import DifferenceUNet
from .fast_unet import ATTENTION_BACKENDS, FastUNet
from .fp8_unet import FP8DifferenceUNet
from .ops.autocast import autocast_disabled
from .ops.conv_dispatch import fused_blocks
from .ops.difference import GradientScale, scale_gradients, unscale_gradient
from .ops.fp8 import check_device as check_fp8_device
from .prior import UNetModel, downsampling_factor
from .schedule import LinearSchedule
from .timing import PriorTimer, mark_in_backward

TARGETS = ("eps", "x_prev")
# How DiffLoss runs the truncated prior: "eager"; "graphed", eager replayed as CUDA graphs;
# "compiled", torch.compile of the whole truncated UNet; "regional", torch.compile of its
# blocks, one compiled graph shared by blocks of the same structure (much less to compile);
# "auto", graphed on an eager CUDA step where that is safe, else eager.
EXECUTIONS = ("auto", "eager", "graphed", "compiled", "regional")
# compile=, the older spelling: True or a torch.compile mode means "compiled" (with that mode),
# "regional" means "regional"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                 "regional")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
# How the two branches go through the prior: "difference" carries the target's activation and
# the restored-minus-target difference (what keeps the loss in bf16/fp16/fp8); "two-pass" runs
# each branch and subtracts at the end (exact in fp32); "auto" picks difference below fp32.
PROPAGATIONS = ("auto", "difference", "two-pass")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp8 stores activations in bf16: only the convolutions' operands are e4m3 (ops.fp8)
_STORAGE = {**_DTYPES, "fp8": torch.bfloat16}
_NOT_GIVEN = object()  # the default of an alias: None is a value (and refused)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that has it, fp16 on other CUDA devices, fp32 elsewhere
    (never fp8, which is asked for by name)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """A power of two that brings ``x``'s largest magnitude into [1, 2); 1 for zeros. A 0-dim
    fp32 tensor on x's device (no host sync)."""
    peak = x.abs().amax().float()
    ok = torch.isfinite(peak) & (peak > 0)
    return torch.where(ok, torch.exp2(-torch.floor(torch.log2(peak))), torch.ones_like(peak))


def _resolve_execution(execution: str, compile: bool | str, cuda_graph) -> tuple[str, str | None]:
    """``execution`` and the torch.compile mode, from ``execution`` or its older spellings
    ``compile=`` and ``cuda_graph=`` (one of them at a time)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if cuda_graph is not _NOT_GIVEN and not (isinstance(cuda_graph, bool) or cuda_graph == "auto"):
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
    older = None
    if compile:
        older = "regional" if compile == "regional" else "compiled"
        if cuda_graph is True:
            raise ValueError("cuda_graph=True replays the eager path; it is not combined with "
                             "compile (compile='reduce-overhead' captures graphs itself)")
    elif cuda_graph is not _NOT_GIVEN and cuda_graph != "auto":
        older = "graphed" if cuda_graph else "eager"
    if older is not None and execution not in ("auto", older):
        raise ValueError(f"execution={execution!r} and the older spelling of {older!r} "
                         f"(compile= / cuda_graph=) disagree: pass execution= alone")
    mode = compile if isinstance(compile, str) and compile not in ("default", "regional") else None
    return older or execution, mode


class _DiffLossBase(nn.Module):
    """Options, input checks, the draw of t and noise, the caller's autocast switched off and
    the opt-in timing, shared by both implementations (which differ in ``_loss``)."""

    # Whether the prior is a submodule: then a parent module's state_dict(), parameters() and
    # .to() see it. Only the reference, which runs the prior itself, wants that.
    _prior_is_submodule = True

    def __init__(self, prior: UNetModel, *, natural_weight: float = 1e-3,
                 semantic_weight: float = 1e-6, target: str = "eps",
                 input_range: tuple[float, float] = (0.0, 1.0), precision: str = "auto",
                 backend: str = "auto", compile: bool | str = False,
                 timestep_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 check_finite: bool = True, check_range: bool = True,
                 schedule: LinearSchedule | None = None):
        super().__init__()
        if not isinstance(prior, UNetModel):
            raise TypeError(f"prior must be a guided-diffusion UNetModel (from load_prior or "
                            f"build_prior), got {type(prior).__name__}")
        validation.check_options(natural_weight=natural_weight, semantic_weight=semantic_weight,
                                 target=target, input_range=input_range, precision=precision,
                                 backend=backend, targets=TARGETS, precisions=PRECISIONS,
                                 backends=ops.BACKENDS)
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, "
                             f"got {compile!r}")
        if timestep_weight is not None and not callable(timestep_weight):
            raise ValueError("timestep_weight must be None or a callable t -> (B,) weights")
        prior.eval().requires_grad_(False)
        if self._prior_is_submodule:
            self.prior = prior
        else:
            object.__setattr__(self, "prior", prior)
        self.natural_weight, self.semantic_weight = float(natural_weight), float(semantic_weight)
        self.target, self.precision, self.backend = target, precision, backend
        self.check_finite, self.check_range = check_finite, check_range
        self.timestep_weight = timestep_weight
        self.schedule = schedule or LinearSchedule()
        low, high = float(input_range[0]), float(input_range[1])
        self.input_range = (low, high)
        # x0 = scale * x + offset maps [low, high] onto the prior's [-1, 1].
        self.scale, self.offset = 2.0 / (high - low), -1.0 - 2.0 * low / (high - low)
        self.last_terms: dict[str, torch.Tensor | None] = {}
        self._timers: list[PriorTimer] = []

    def extra_repr(self) -> str:
        return (f"natural_weight={self.natural_weight}, semantic_weight={self.semantic_weight}, "
                f"target={self.target!r}, input_range={self.input_range}, "
                f"precision={self.precision!r}, backend={self.backend!r}")

    def _check_prior_device(self, prior: torch.device, images: torch.device) -> None:
        if prior != images:
            raise ValueError(f"restored is on {images} but the prior is on {prior}: move the "
                             f"loss with loss_fn.to(device)")

    @contextlib.contextmanager
    def timings(self) -> Iterator[PriorTimer]:
        """Time every call of this loss inside the block, forward and backward::

            with loss_fn.timings() as timer:
                loss = loss_fn(restored, gt)
                loss.backward()
            print(timer.forward_ms, timer.backward_ms)

        CUDA events on CUDA (read when a total is read), the wall clock on the CPU."""
        timer = PriorTimer()
        self._timers.append(timer)
        try:
            yield timer
        finally:
            self._timers.remove(timer)

    def forward(self, restored, gt, *, t=None, noise=None, generator=None):
        """The weighted loss, a 0-dim tensor; ``last_terms`` holds the unweighted terms."""
        timing = None
        if self._timers:
            timing = self._timers[-1].start_call(restored.device)
            for outer in self._timers[:-1]:
                outer.records.append(timing)
            timing.mark("forward_start")
            restored = mark_in_backward(restored, timing, "backward_end")
        with autocast_disabled():
            restored, gt, t, noise, coefs = self._prepare(restored, gt, t, noise, generator)
            loss = self._loss(restored, gt, t, noise, coefs)
        if timing is not None:
            timing.mark("forward_end")
            loss = mark_in_backward(loss, timing, "backward_start")
        return loss

    def _prepare(self, restored, gt, t, noise, generator):
        """Check the inputs, bring them to one dtype, draw what was not given, and return the
        per-sample coefficients."""
        validation.check_images(restored, gt, factor=downsampling_factor(self.prior))
        validation.check_values(restored, gt, input_range=self.input_range,
                                check_finite=self.check_finite, check_range=self.check_range)
        # e.g. a bf16 network output under autocast next to a dataloader's fp32 target;
        # restored's gradient comes back in its own dtype through the cast
        common = torch.promote_types(restored.dtype, gt.dtype)
        restored, gt = restored.to(common), gt.to(common)
        self._check_prior_device(next(self.prior.parameters()).device, restored.device)
        batch, device = restored.shape[0], restored.device
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (batch,), device=device,
                              generator=generator)
        validation.check_timesteps(t, batch, self.schedule.num_timesteps, device)
        if noise is None:
            noise = torch.randn(restored.shape, device=device, generator=generator,
                                dtype=torch.promote_types(restored.dtype, torch.float32))
        validation.check_noise(noise, restored, self.check_finite)
        coefs = self.schedule.coefficients(t.long())
        weight = torch.ones(batch, dtype=torch.float64, device=device)
        if self.timestep_weight is not None:
            weight = torch.as_tensor(self.timestep_weight(t), device=device).to(torch.float64)
            if weight.shape != (batch,):
                raise ValueError(f"timestep_weight(t) must return shape ({batch},), "
                                 f"got {tuple(weight.shape)}")
        coefs["weight"] = weight
        return restored, gt, t.long(), noise, coefs


class ReferenceDiffLoss(_DiffLossBase):
    """The plain baseline: upstream ``UNetModel.forward`` on both branches, eager, no fusion.

    It is what a careful user writes from the paper, and what every speed number is measured
    against. It always runs the full UNet and reports both terms. It takes the loss's own
    options (weights, target, input range, precision, timestep weight, checks, schedule);
    ``backend`` and ``compile``, in the signature every DiffLoss shares, are accepted and
    ignored; the options that only steer how DiffLoss runs the prior are refused.
    ``precision`` defaults to fp32 here; bf16/fp16 run the same code under ``torch.autocast``. The prior is its submodule: ``.to(device)`` moves it (the reference
    runs it in place, with no copy of its own).
    """

    def __init__(self, prior: UNetModel, *, precision: str = "fp32", **kwargs):
        if precision == "fp8":
            raise ValueError("ReferenceDiffLoss has no precision='fp8': it runs upstream's "
                             "forward under torch.autocast, which has no FP8. Compare "
                             "DiffLoss(precision='fp8') with precision='fp32' instead "
                             "(diffloss-fast check-precision does)")
        super().__init__(prior, precision=precision, **kwargs)

    def _run_prior(self, x_t, t):
        """ε_θ (the first three output channels) and the middle block's output."""
        captured = {}
        hook = self.prior.middle_block.register_forward_hook(
            lambda module, args, out: captured.__setitem__("h", out))
        try:
            out = self.prior(x_t, t)
        finally:
            hook.remove()
        return out[:, :3], captured["h"]

    def _loss(self, restored, gt, t, noise, c):
        acc = torch.promote_types(restored.dtype, torch.float32)
        view = lambda v: v.to(acc).view(-1, 1, 1, 1)  # noqa: E731
        sqrt_abar, sqrt_1m = view(c["sqrt_abar"]), view(c["sqrt_one_minus_abar"])
        x0_res = restored.to(acc) * self.scale + self.offset
        x0_gt = gt.detach().to(acc) * self.scale + self.offset
        noise = noise.detach().to(acc)
        xt_res = sqrt_abar * x0_res + sqrt_1m * noise
        xt_gt = sqrt_abar * x0_gt + sqrt_1m * noise

        precision = resolve_precision(self.precision, restored.device)
        autocast = torch.autocast(restored.device.type, dtype=_DTYPES.get(precision),
                                  enabled=precision != "fp32")
        with autocast:
            with torch.no_grad():
                eps_gt, h_gt = self._run_prior(xt_gt, t)
            eps_res, h_res = self._run_prior(xt_res, t)
        eps_res, eps_gt, h_res, h_gt = (v.to(acc) for v in (eps_res, eps_gt, h_res, h_gt))

        weight = view(c["weight"])
        if self.target == "eps":
            natural = (weight * (eps_res - eps_gt).square()).mean()
        else:
            eps_coef, sqrt_alpha = view(c["eps_coef"]), view(c["alpha"]).sqrt()
            prev_res = (xt_res - eps_coef * eps_res) / sqrt_alpha
            prev_gt = (xt_gt - eps_coef * eps_gt) / sqrt_alpha
            natural = (weight * (prev_res - prev_gt).square()).mean()
        semantic = (weight * (h_res - h_gt).square()).mean()
        self.last_terms = {"natural": natural.detach(), "semantic": semantic.detach()}
        return self.natural_weight * natural + self.semantic_weight * semantic


class DiffLoss(_DiffLossBase):
    """DiffLoss, computed as fast and as lean as the device allows.

    - the ground-truth branch runs without autograd; the restored branch differentiates to
      the input only (the prior is frozen);
    - the prior is truncated: σ channels are never computed, and with ``natural_weight=0``
      the decoder is never run;
    - bf16/fp16 weights and activations (GroupNorm statistics in fp32), attention through
      SDPA (or xformers), optional ``torch.compile`` (with channels_last activations);
    - ``precision="fp8"`` (CUDA sm_89+, or the CPU) runs the prior's convolutions on e4m3
      operands: weights quantized per output channel once, the target activation and the
      difference each at a delayed per-tensor scale, the backward in bf16
      (:mod:`diffloss_fast.ops.fp8`); everything else as bf16. Its convolutions are a
      fake-quantized twin (e4m3 values convolved exactly with fp32 accumulation), on the CPU
      and, until a native FP8 convolution exists, on CUDA too: it reproduces FP8's accuracy,
      not its speed. It always propagates the pair (``propagation="two-pass"`` is refused)
      and runs eagerly or graphed (``execution="compiled"``/``"regional"`` are refused);
    - fused kernels (``backend``) noise both branches in one pass and reduce both terms with
      fp32 accumulation;
    - ``fused_kernels`` (eager, CUDA; on by default there) runs each GroupNorm (+ FiLM) + SiLU
      of the prior as one Triton pass forward and one backward, adds the convolutions' biases
      inside the norms and residual sums, and resamples with Triton kernels too. They read
      channels_last activations: ``channels_last=False`` turns ``"auto"`` off and refuses
      True. (``fused_norm``, the option's first name, is accepted for it.)
    - ``checkpoint=True`` recomputes the restored branch's activations in the backward pass
      to fit larger batches;
    - ``execution`` says how the prior runs (``EXECUTIONS``): ``"auto"`` replays both branches
      as CUDA graphs on an eager CUDA step, captured on the first call per input shape: one
      launch instead of thousands (:mod:`diffloss_fast.cuda_graph` for what stays eager and
      the memory it keeps). ``compile=`` and ``cuda_graph=``, its older spellings, map onto it.
    A term whose weight is 0 is skipped, and reported as None in ``last_terms``.

    The prior is not a submodule: a model holding this loss has none of the prior's tensors in
    its ``state_dict()`` or ``parameters()``, and its ``.to()``/``.half()`` leave the prior
    alone. The truncated copy is built on the images' device, wherever the prior is: a prior
    left on the CPU never puts its fp32 weights on the GPU (for ADM-256 in bf16 the copy is
    less than half their size, and a fifth for the semantic term alone).
    """

    _prior_is_submodule = False

    def __init__(self, prior: UNetModel, *, execution: str = "auto",
                 propagation: str = "auto",
                 fused_kernels: bool | str = "auto", channels_last: bool | str = "auto",
                 attention: str = "sdpa", checkpoint: bool = False,
                 compile: bool | str = False, cuda_graph: bool | str = _NOT_GIVEN,
                 fused_norm: bool | str = _NOT_GIVEN, **kwargs):
        super().__init__(prior, compile=compile, **kwargs)
        if fused_norm is not _NOT_GIVEN:  # the option's first name, kept as an alias
            if fused_kernels != "auto":
                raise ValueError("fused_norm is the old name of fused_kernels: pass one of "
                                 "them, not both")
            fused_kernels = fused_norm
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        if propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}")
        self.propagation = propagation
        execution, self._compile_mode = _resolve_execution(execution, compile, cuda_graph)
        if not (isinstance(fused_kernels, bool) or fused_kernels == "auto"):
            raise ValueError(f"fused_kernels must be True, False or 'auto', got "
                             f"{fused_kernels!r}")
        if fused_kernels is True and execution in ("compiled", "regional"):
            raise ValueError("fused_kernels=True is for the eager path: compiled, "
                             "torch.compile fuses the norms itself")
        if fused_kernels is True and not channels_last:
            raise ValueError("fused_kernels=True reads channels_last activations: leave "
                             "channels_last at 'auto' (or True), or pass fused_kernels=False "
                             "to run PyTorch's norms in NCHW")
        if self.precision == "fp8":
            if propagation == "two-pass":
                raise ValueError("precision='fp8' always propagates the (target, difference) "
                                 "pair: two passes quantized to FP8 and subtracted at the end "
                                 "lose the difference the loss measures. Leave propagation at "
                                 "'auto' (or 'difference')")
            if execution in ("compiled", "regional"):
                raise ValueError(f"precision='fp8' runs eagerly (or graphed): its convolutions "
                                 f"are a fake-quantized twin for now, which torch.compile would "
                                 f"not make an FP8 kernel of; execution={execution!r} is not "
                                 f"offered with it")
        if execution == "graphed" and checkpoint:
            raise ValueError("execution='graphed' replays the eager path without "
                             "recomputation: it is not combined with checkpoint=True")
        self.execution, self.fused_kernels = execution, fused_kernels
        self.channels_last, self.attention, self.checkpoint = channels_last, attention, checkpoint
        self._plans: dict[tuple, ops.OpPlan] = {}
        self._nets: dict[tuple, nn.Module] = {}
        self._graphs = GraphCache()

    def _check_prior_device(self, prior: torch.device, images: torch.device) -> None:
        """Any device with data will do: the truncated copy is built on the images' device."""
        if prior.type == "meta":
            raise ValueError("the prior is on the meta device (it has no weights): load it "
                             "with load_prior, or move it to a real device")

    def _compute_dtype(self, precision: str) -> torch.dtype:
        """The activations' storage dtype (fp8 stores them in bf16)."""
        if precision == "fp32":  # the prior's own dtype: fp64 if it was converted (gradcheck)
            return next(self.prior.parameters()).dtype
        return _STORAGE[precision]

    @property
    def _compiled(self) -> bool:
        return self.execution in ("compiled", "regional")

    def _channels_last(self, device: torch.device, dtype: torch.dtype) -> bool:
        """``auto``: channels_last where the norms read it in place, i.e. the fused kernels
        and compiled graphs on CUDA. Eager PyTorch's GroupNorm works in NCHW, and
        channels_last around it adds a layout copy per norm."""
        if self.channels_last == "auto":
            return self._plan(device, dtype).fused or (
                device.type == "cuda" and dtype != torch.float64 and self._compiled)
        return bool(self.channels_last)

    def _plan(self, device: torch.device, dtype: torch.dtype) -> ops.OpPlan:
        """Every op's implementation for this device and dtype (:func:`ops.plan_ops`), chosen
        once. ``fused_kernels`` applies to eager channels_last steps: compiled steps leave the
        prior's ops to inductor, and ``channels_last=False`` keeps PyTorch's norms in NCHW."""
        key = (device, dtype)
        if key not in self._plans:
            fused = self.fused_kernels if self.channels_last and not self._compiled else False
            self._plans[key] = ops.plan_ops(self.backend, fused, device, dtype)
        return self._plans[key]

    def _difference(self, dtype: torch.dtype) -> bool:
        """Whether the branches go through the prior as a (target, difference) pair."""
        if self.precision == "fp8":
            return True
        if self.propagation == "auto":
            return dtype in (torch.bfloat16, torch.float16)
        return self.propagation == "difference"

    def _net(self, device: torch.device, dtype: torch.dtype, decoder: bool) -> nn.Module:
        """The truncated prior for this device and dtype, built once and cached."""
        channels_last = self._channels_last(device, dtype)
        difference = self._difference(dtype)
        key = (device, dtype, decoder, channels_last, difference)
        if key not in self._nets:
            self._nets = {k: v for k, v in self._nets.items() if k[0] == device}
            cls = DifferenceUNet if difference else FastUNet
            if self.precision == "fp8":
                cls = FP8DifferenceUNet
            net = cls(self.prior, dtype=dtype, decoder=decoder, device=device,
                      channels_last=channels_last, attention=self.attention,
                      checkpoint=self.checkpoint, compile_blocks=self.execution == "regional",
                      plan=self._plan(device, dtype))
            if isinstance(net, DifferenceUNet) and net.plan.fused:  # measured faster fused
                net.fused_blocks = fused_blocks(device)
            if self.execution == "compiled":
                net = torch.compile(net, mode=self._compile_mode, dynamic=False)
            self._nets[key] = net
        return self._nets[key]

    def _cuda_graph(self, device: torch.device) -> bool:
        """``auto``: graphed on an eager CUDA step (not with activation checkpointing, whose
        recomputation a graph cannot hold); never inside ``inference_mode`` or a caller's own
        capture. ``graphed``: always (refused off CUDA)."""
        if self.execution == "auto":
            return (device.type == "cuda" and not self.checkpoint
                    and not torch.is_inference_mode_enabled()
                    and not torch.cuda.is_current_stream_capturing())
        return self.execution == "graphed"

    def _two_passes(self, net, plan, restored, gt, t, noise, coef, dtype):
        """Each branch through the prior, subtracted by the reductions (exact in fp32)."""
        device = restored.device
        xt_res, xt_gt = plan.q_sample_pair(
            restored, gt, noise, coef["sqrt_abar"], coef["sqrt_one_minus_abar"],
            scale=self.scale, offset=self.offset, out_dtype=dtype,
            channels_last=self._channels_last(device, dtype))
        if self._cuda_graph(device):
            self._graphs.drop_unless(list(self._nets.values()))
            eps_gt, h_gt, eps_res, h_res = self._graphs.run(net, xt_gt, xt_res, t)
        else:
            with torch.no_grad():
                eps_gt, h_gt = net(xt_gt, t)
            eps_res, h_res = net(xt_res, t)
        return eps_res, eps_gt, h_res, h_gt

    def _difference_pass(self, net, plan, restored, gt, t, noise, coef, dtype):
        """The target and the difference through the prior as one pair (bf16/fp16/fp8): the
        differences of its outputs in fp32, beside zeros for the reductions to subtract."""
        device = restored.device
        acc = torch.promote_types(dtype, torch.float32)
        # the target's noised image, and the restored one's difference from it, computed
        # from (restored - gt) in fp32: the noise and the offset cancel exactly
        with torch.no_grad():
            _, xt_gt = plan.q_sample_pair(
                gt, gt, noise, coef["sqrt_abar"], coef["sqrt_one_minus_abar"],
                scale=self.scale, offset=self.offset, out_dtype=dtype,
                channels_last=self._channels_last(device, dtype))
        gain = (coef["sqrt_abar"] * self.scale).to(acc).view(-1, 1, 1, 1)
        dx = gain * (restored.to(acc) - gt.detach().to(acc))
        # the difference stored at its own scale (see ops.difference), and the gradients
        # of the backward through the prior brought into the storage format's range
        d_scale = _power_of_two_scale(dx.detach())
        grad_scale = GradientScale()
        d_t = unscale_gradient(grad_scale, dx * d_scale).to(dtype)  # unscaled in fp32
        if self._cuda_graph(device):
            self._graphs.drop_unless(list(self._nets.values()))
            eps_d, h_d = self._graphs.run_difference(net, xt_gt, d_t, t, d_scale)
        else:
            eps_d, h_d = net(xt_gt, d_t, t, d_scale)
        # in fp32, so that the gradients are scaled before they are rounded to dtype
        eps_d, h_d = scale_gradients(grad_scale, None if eps_d is None else eps_d.to(acc),
                                     h_d.to(acc))
        h_res = h_d / d_scale
        zero = torch.zeros((), dtype=acc, device=device)
        if eps_d is None:
            return None, None, h_res, zero.expand_as(h_res)
        eps_res = eps_d / d_scale
        return eps_res, zero.expand_as(eps_res), h_res, zero.expand_as(h_res)

    def _loss(self, restored, gt, t, noise, c):
        want_natural, want_semantic = self.natural_weight > 0, self.semantic_weight > 0
        if not (want_natural or want_semantic):
            self.last_terms = {"natural": None, "semantic": None}
            return restored.new_zeros((), dtype=torch.promote_types(restored.dtype, torch.float32))
        device = restored.device
        precision = resolve_precision(self.precision, device)
        if precision == "fp8":
            check_fp8_device(device)
        dtype = self._compute_dtype(precision)
        plan = self._plan(device, dtype)
        coef = {k: v.to(torch.promote_types(dtype, torch.float32)) for k, v in c.items()}
        net = self._net(device, dtype, decoder=want_natural)

        run = self._difference_pass if self._difference(dtype) else self._two_passes
        eps_res, eps_gt, h_res, h_gt = run(net, plan, restored, gt, t, noise, coef, dtype)

        # the reductions read eps_res - eps_gt and h_res - h_gt: on the difference path the
        # differences themselves, beside zeros
        natural = semantic = None
        loss = 0.0
        if want_natural:
            if self.target == "eps":
                natural = plan.weighted_l2(eps_res, eps_gt, coef["weight"])
            else:
                natural = plan.weighted_l2(
                    eps_res, eps_gt, coef["weight"] / coef["alpha"], x=restored, y=gt,
                    x_coef=coef["sqrt_abar"] * self.scale, p_coef=coef["eps_coef"])
            loss = loss + self.natural_weight * natural
        if want_semantic:
            semantic = plan.weighted_l2(h_res, h_gt, coef["weight"])
            loss = loss + self.semantic_weight * semantic
        self.last_terms = {"natural": None if natural is None else natural.detach(),
                           "semantic": None if semantic is None else semantic.detach()}
        return loss
