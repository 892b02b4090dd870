"""``diffloss-fast check-precision``: how far each reduced precision's loss is from fp32's, on
your prior, before you trust it.

Over restorations close to their target (delta RMS 0.3, 0.05, 0.01 around random targets) and
timesteps 50/300/600/950, for the natural term, the semantic term and both, it compares each
reduced precision the device supports with fp32: the loss's relative error and the cosine of
the input gradients, against each precision's bounds (bf16 and fp16: within 2%, cosine >=
0.995; fp8: within 5%, cosine >= 0.98). fp8 is the e4m3 quantization of the prior's
convolutions: on CUDA sm_89 or later, and on the CPU as its fake-quantized twin. Reduced
precision runs as DiffLoss runs it (difference propagation); ``--two-pass`` adds the two-pass
computation of bf16 and fp16 beside it, to see what that propagation fixes (DiffLoss has no
two-pass fp8). ``--fuse-every-block`` runs every norm + convolution block of the pair network
as the fused Triton kernel (:mod:`diffloss_fast.ops.pair_conv`), whatever the dispatch table
says: the fused kernels' accuracy, end to end, before a sweep fuses any of them.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
from tqdm import tqdm

from ..loss import DiffLoss
from ..ops import fp8
from ..ops._triton_common import triton
from ..ops.conv_dispatch import EVERY_BLOCK
from . import hardware
from .baselines import numerics
from .harness import (add_prior_arguments, check_device, check_prior, measurement_prior,
                      positive_int, prior_source, write_json)

DELTAS = (0.3, 0.05, 0.01)
TIMESTEPS = (50, 300, 600, 950)
TERMS = {"natural": (1.0, 0.0), "semantic": (0.0, 1.0), "both": (1e-3, 1e-6)}
# precision -> (largest loss relative error, smallest gradient cosine): DESIGN.md section 3
BOUNDS = {"bf16": (0.02, 0.995), "fp16": (0.02, 0.995), "fp8": (0.05, 0.98)}
PRECISION_CHOICES = tuple(BOUNDS)


def reduced_precisions(device: torch.device) -> list[str]:
    """The reduced precisions DiffLoss can run on ``device``: fp8 on the CPU (the twin) and on
    CUDA devices with FP8 tensor cores (sm_89 or later)."""
    if device.type != "cuda":
        return ["bf16", "fp16", "fp8"]
    found = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    if torch.cuda.get_device_capability(device) >= fp8.MIN_CAPABILITY:
        found.append("fp8")
    return found


def bounds_text(precisions) -> str:
    """The bounds of ``precisions``, those that share them named together."""
    groups: dict[tuple, list[str]] = {}
    for p in precisions:
        groups.setdefault(BOUNDS[p], []).append(p)
    return "; ".join(f"{'/'.join(names)}: loss within {loss:.0%} of fp32, gradient cosine "
                     f">= {cos}" for (loss, cos), names in groups.items())


def cell_inputs(delta: float, t: int, batch: int, size: int, device, seed: int):
    """Targets in [0.1, 0.9], restorations ``delta`` RMS from them, one timestep, noise."""
    gen = torch.Generator().manual_seed(seed)
    gt = torch.rand(batch, 3, size, size, generator=gen) * 0.8 + 0.1
    restored = gt + delta * torch.randn(batch, 3, size, size, generator=gen)
    noise = torch.randn(batch, 3, size, size, generator=gen)
    return (restored.to(device), gt.to(device), torch.full((batch,), t, device=device),
            noise.to(device))


def _loss_and_grad(loss_fn, inputs):
    restored, gt, t, noise = inputs
    x = restored.clone().requires_grad_(True)
    loss = loss_fn(x, gt, t=t, noise=noise)
    loss.backward()
    return float(loss.detach()), x.grad.detach().double().flatten()


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine however small the gradients (F.cosine_similarity clamps their norms' product)."""
    return float(x @ y / (x.norm() * y.norm()))


def _loss(prior, precision: str, propagation: str, term: str, device: torch.device,
          fuse_every_block: bool) -> DiffLoss:
    """The loss of one configuration; with ``fuse_every_block`` a reduced precision's pair
    network is built at once, eager with the fused kernels, and every block of it fused."""
    natural, semantic = TERMS[term]
    pair = fuse_every_block and precision != "fp32" and propagation == "auto"
    loss_fn = DiffLoss(prior, precision=precision, propagation=propagation,
                       natural_weight=natural, semantic_weight=semantic, check_range=False,
                       **(dict(fused_kernels=True, execution="eager") if pair else {}))
    if pair:
        net = loss_fn._net(device, loss_fn._compute_dtype(precision), decoder=natural > 0)
        net.fused_blocks = EVERY_BLOCK
    return loss_fn


def run_grid(prior, device: torch.device, precisions, *, batch: int, size: int,
             two_pass: bool, fuse_every_block: bool = False) -> list[dict]:
    """One row per (precision, propagation, delta, t, term)."""
    methods = [(p, "auto") for p in precisions]
    if two_pass:  # fp8 has the pair only
        methods += [(p, "two-pass") for p in precisions if p != "fp8"]
    cells = [(i, delta, j, t) for i, delta in enumerate(DELTAS) for j, t in enumerate(TIMESTEPS)]
    # one loss per configuration, so that each builds its copy of the prior once
    losses = {(p, prop, term): _loss(prior, p, prop, term, device, fuse_every_block)
              for p, prop in [("fp32", "two-pass"), *methods] for term in TERMS}
    rows = []
    for i, delta, j, t in tqdm(cells, desc="check-precision", unit="cell"):
        inputs = cell_inputs(delta, t, batch, size, device, seed=10 * i + j)
        for term in TERMS:
            want, want_grad = _loss_and_grad(losses["fp32", "two-pass", term], inputs)
            for precision, propagation in methods:
                got, grad = _loss_and_grad(losses[precision, propagation, term], inputs)
                err = abs(got - want) / want if want else float(got != 0)
                cos = _cosine(grad, want_grad)
                loss_bound, cosine_bound = BOUNDS[precision]
                rows.append({"precision": precision,
                             "propagation": "difference" if propagation == "auto" else propagation,
                             "delta": delta, "t": t, "term": term, "loss_fp32": want,
                             "loss": got, "rel_error": err, "cosine": cos,
                             "ok": err <= loss_bound and cos >= cosine_bound})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("precision", "propagation", "delta", "t", "term", "loss rel. error", "grad cosine",
            "ok")
    body = [(r["precision"], r["propagation"], f"{r['delta']:g}", str(r["t"]), r["term"],
             f"{r['rel_error']:.2e}", f"{r['cosine']:.5f}", "yes" if r["ok"] else "NO")
            for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), *(line(b) for b in body)])


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    weights, config = prior_source(args.prior, args.prior_config)
    prior = measurement_prior(weights, config, torch.device("cpu"), "the comparison")
    size = args.resolution or (256 if device.type == "cuda" else 32)
    precisions = args.precisions or reduced_precisions(device)
    with numerics("reference-fp32"):  # the fp32 side in strict fp32 (no TF32)
        rows = run_grid(prior, device, precisions, batch=args.batch, size=size,
                        two_pass=args.two_pass, fuse_every_block=args.fuse_every_block)
    print(format_table(rows))
    failed = [r for r in rows if not r["ok"] and r["propagation"] == "difference"]
    print(f"{len(rows)} comparisons; bounds: {bounds_text(precisions)}; DiffLoss's own "
          f"computation outside them: {len(failed)}")
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "device": str(device), "device_name": hardware.device_name(device),
              "prior": weights or config, "resolution": size, "batch": args.batch,
              "fuse_every_block": args.fuse_every_block, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    device = check_device(parser, args.device)
    check_prior(parser, args.prior, args.prior_config)
    if "fp8" in (args.precisions or ()):
        try:
            fp8.check_device(device)
        except ValueError as err:
            parser.error(f"argument --precisions: {err}")
    if args.fuse_every_block:
        if triton is None:
            parser.error("argument --fuse-every-block: the fused blocks are Triton kernels; "
                         "install triton")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("argument --fuse-every-block: on the CPU the Triton kernels run "
                         "under Triton's interpreter: set TRITON_INTERPRET=1 (slow: use the "
                         "tiny prior at a small --resolution)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check-precision", help="each reduced precision's loss and gradient against fp32",
        description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_prior_arguments(p, default="tiny", default_text="tiny (random weights)",
                        legacy_weights=False)
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image side (default: 256 on CUDA, 32 on the CPU)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--precisions", nargs="+", choices=PRECISION_CHOICES, default=None,
                   help="default: every reduced precision the device supports (fp8: CUDA "
                        "sm_89+, and the CPU's fake-quantized twin; fp16 on the CPU is slow: "
                        "PyTorch has no fast CPU kernels for it)")
    p.add_argument("--two-pass", action="store_true",
                   help="also compare the two-pass computation of bf16/fp16, which "
                        "difference propagation replaces in reduced precision")
    p.add_argument("--fuse-every-block", action="store_true",
                   help="run every norm + convolution block of the pair network as the fused "
                        "Triton kernel, whatever the dispatch table says (CUDA, or the CPU "
                        "with TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="PATH", help="save every comparison as JSON")
    p.set_defaults(func=run, check=check)
