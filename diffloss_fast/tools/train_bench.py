"""``bench --train``: what DiffLoss adds to a real training step of a restoration network.

One optimizer step is the network's forward (under autocast on CUDA), the L2 pixel loss,
DiffLoss (both terms, the semantic term alone, or none: the baseline), one backward and one
AdamW step, on fixed random patches (no data loading). Each configuration reports the median,
min and max of synchronised steps after warm-up, the part of the step spent in DiffLoss (its
own forward and backward, from ``loss_fn.timings()``), and ``overhead_x``: the step with
DiffLoss over the step without it, same network. DiffLoss is built with its defaults, as a
user's training script would build it. ``net_gmacs`` is the network's forward per image at the
row's patch size.

Runs inside ``diffloss-fast bench --train`` (``add_train_arguments``, ``run_train_bench``) or on
its own: ``python -m diffloss_fast.tools.train_bench --json PATH``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..loss import DiffLoss, resolve_precision
from ..prior import downsampling_factor
from ..train import nets
from . import hardware
from .harness import (TERMS, add_prior_arguments, check_device, check_prior,
                      measurement_prior, positive_int, prior_source, write_json)

TRAIN_TERMS = ("none", "both", "semantic")
NETS = tuple(nets.BUILTIN)
# The configuration on CUDA; on the CPU just enough to exercise every path.
CUDA_DEFAULTS = dict(batch=8, patch=256, warmup=3, steps=10)
CPU_DEFAULTS = dict(batch=2, patch=32, warmup=1, steps=2)
NET_PRECISIONS = ("auto", "fp32", "bf16")
LR, WEIGHT_DECAY = 2e-4, 1e-4  # diffloss-fast train's defaults


@dataclass
class TrainRow:
    net: str
    net_gmacs: float
    terms: str
    batch: int
    patch: int
    ms_per_step: float | None = None  # the median of the timed steps
    ms_min: float | None = None
    ms_max: float | None = None
    ms_diffloss: float | None = None  # the median of the steps' DiffLoss forward + backward
    overhead_x: float | None = None
    status: str = "ok"


def net_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The network's autocast dtype (None: fp32): ``auto`` is bf16 on a CUDA device that has
    it, as a restoration network is trained there."""
    if choice == "auto":
        return (torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported()
                else None)
    return torch.bfloat16 if choice == "bf16" else None


def make_diffloss(prior, terms: str, *, precision: str, backend: str) -> DiffLoss | None:
    """DiffLoss for ``terms`` with its defaults otherwise; None for ``none``. The network's
    output is whatever training makes it: no range check, as in ``diffloss-fast train``."""
    if terms == "none":
        return None
    natural_weight, semantic_weight = TERMS[terms]
    return DiffLoss(prior, natural_weight=natural_weight, semantic_weight=semantic_weight,
                    precision=precision, backend=backend, check_range=False)


def train_step(net, optimizer, loss_fn, degraded, target, amp_dtype) -> object | None:
    """One optimizer step; returns the DiffLoss timer of the step (None without DiffLoss)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(degraded.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        out = net(degraded)
    out = out.float()
    loss = F.mse_loss(out, target)
    timer = None
    if loss_fn is None:
        loss.backward()
    else:
        with loss_fn.timings() as timer:
            loss = loss + loss_fn(out, target)
            loss.backward()
    optimizer.step()
    return timer


def time_train_steps(step, device: torch.device, *, warmup: int, steps: int):
    """(ms per step, DiffLoss ms per step or None) of ``steps`` synchronised calls of ``step``
    after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    hardware.synchronize(device)
    times, diff = [], []
    for _ in range(steps):
        start = time.perf_counter()
        timer = step()
        hardware.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if timer is not None:
            diff.append(timer.forward_ms + timer.backward_ms)
    return times, diff or None


def make_patches(batch: int, patch: int, device: torch.device, seed: int = 0):
    """A clean target in [0, 1] and a noisy degraded copy of it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    target = torch.rand(batch, 3, patch, patch, device=device, generator=gen)
    noise = torch.randn(batch, 3, patch, patch, device=device, generator=gen)
    return (target + 0.1 * noise).clamp(0, 1), target


def measure(net_name: str, template: torch.nn.Module, gmacs: float, terms: str, loss_fn,
            batch: int, patch: int, device: torch.device, *, amp_dtype, warmup: int,
            steps: int) -> TrainRow:
    """Time one (net, terms) configuration from the same initial weights; an out-of-memory
    error or any other failure becomes the row's status, so one configuration cannot lose
    the others."""
    row = TrainRow(net_name, gmacs, terms, batch, patch)
    net = optimizer = inputs = None
    try:
        net = copy.deepcopy(template).to(device).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        inputs = make_patches(batch, patch, device)
        times, diff = time_train_steps(
            lambda: train_step(net, optimizer, loss_fn, *inputs, amp_dtype), device,
            warmup=warmup, steps=steps)
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
        return row
    except Exception as err:  # noqa: BLE001 - one broken configuration must not lose the rest
        traceback.print_exc()
        row.status = f"error: {type(err).__name__}: {err}"
        return row
    finally:
        del net, optimizer, inputs
        _release(device)
    row.ms_per_step = statistics.median(times)
    row.ms_min, row.ms_max = min(times), max(times)
    row.ms_diffloss = statistics.median(diff) if diff else None
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def add_overheads(rows: list[TrainRow]) -> None:
    """``overhead_x`` of each row: its step over the same net's step without DiffLoss."""
    base = {r.net: r.ms_per_step for r in rows if r.terms == "none" and r.ms_per_step}
    for r in rows:
        if r.ms_per_step and r.net in base:
            r.overhead_x = r.ms_per_step / base[r.net]


def format_table(rows: list[TrainRow]) -> str:
    head = ("net", "GMAC/img", "terms", "batch", "patch", "ms/step", "min", "max",
            "ms DiffLoss", "overhead")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = []
    for r in rows:
        if r.status != "ok":
            lines.append((r.net, fmt(r.net_gmacs, ".2f"), r.terms, str(r.batch), str(r.patch),
                          r.status, *("-",) * 4))
            continue
        lines.append((r.net, fmt(r.net_gmacs, ".2f"), r.terms, str(r.batch), str(r.patch),
                      fmt(r.ms_per_step, ".2f"), fmt(r.ms_min, ".2f"), fmt(r.ms_max, ".2f"),
                      fmt(r.ms_diffloss, ".2f"),
                      fmt(r.overhead_x, ".2f") + "x" if r.overhead_x else "-"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    return "\n".join(out)


def run_train_bench(args: argparse.Namespace) -> dict:
    """Time the training step of each ``--nets`` network with each of ``--train-terms``;
    returns {"rows": [...], ...} (what it ran on and with). Reads the measuring tools'
    shared options (``--device``, ``--prior``, ``--precision``, ``--backend``) where the
    namespace has them."""
    device = hardware.resolve_device(getattr(args, "device", "auto"))
    cuda = device.type == "cuda"
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    batch = args.train_batch or defaults["batch"]
    patch = args.patch or defaults["patch"]
    warmup = args.train_warmup if args.train_warmup is not None else defaults["warmup"]
    steps = args.train_steps or defaults["steps"]
    net_names = list(dict.fromkeys(args.nets or NETS))
    terms_list = list(dict.fromkeys(args.train_terms or TRAIN_TERMS))
    amp_dtype = net_dtype(args.train_precision or "auto", device)
    precision = resolve_precision(getattr(args, "precision", "auto") or "auto", device)
    backend = getattr(args, "backend", "auto") or "auto"
    weights, config = prior_source(getattr(args, "prior", None)
                                   or ("adm-256-uncond" if cuda else "tiny"),
                                   getattr(args, "prior_config", None),
                                   getattr(args, "checkpoint", None))

    templates = {}
    for name in net_names:
        torch.manual_seed(0)
        templates[name] = nets.build_net(name)
    # DiffLoss puts its own compute-dtype copy on the device: the fp32 prior stays on the CPU
    prior = (measurement_prior(weights, config, torch.device("cpu"), "timing")
             if any(t != "none" for t in terms_list) else None)
    multiples = {name: nets.size_multiple(net) for name, net in templates.items()}
    if prior is not None:
        multiples["the prior"] = downsampling_factor(prior)
    bad = {what: m for what, m in multiples.items() if patch % m}
    if bad:
        raise ValueError(f"--patch {patch} must be a multiple of " + ", ".join(
            f"{m} ({what})" for what, m in bad.items()))
    gmacs = {name: nets.gmacs(net, patch, patch) for name, net in templates.items()}
    print(f"training step: {hardware.device_name(device)}; batch {batch}, {patch}x{patch} "
          f"patches; network in {str(amp_dtype or torch.float32)[6:]}, DiffLoss in "
          f"{precision}; {steps} timed steps after {warmup} warm-up; torch {torch.__version__}")

    rows: list[TrainRow] = []
    for terms in terms_list:
        loss_fn = make_diffloss(prior, terms, precision=precision, backend=backend)
        for name in net_names:
            rows.append(measure(name, templates[name], gmacs[name], terms, loss_fn, batch,
                                patch, device, amp_dtype=amp_dtype, warmup=warmup,
                                steps=steps))
        del loss_fn
        _release(device)
    order = {name: i for i, name in enumerate(net_names)}
    rows.sort(key=lambda r: order[r.net])
    add_overheads(rows)
    print(format_table(rows))
    return {
        "device": hardware.device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "prior": config,
        "weights": weights,  # None: random weights
        "batch": batch,
        "patch": patch,
        "net_precision": str(amp_dtype or torch.float32)[6:],
        "diffloss_precision": precision,
        "tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "warmup": warmup,
        "steps": steps,
        "rows": [asdict(r) for r in rows],
    }


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The training step's own options; none of them shares a name with bench's."""
    g = p.add_argument_group("training step")
    g.add_argument("--nets", nargs="+", choices=NETS, default=None,
                   help="restoration networks to train (default: all three: resunet, "
                        "nafnet, restormer)")
    g.add_argument("--train-terms", nargs="+", choices=TRAIN_TERMS, default=None,
                   help="DiffLoss terms in the step; none is the pixel-loss baseline the "
                        "overhead is against (default: none both semantic)")
    g.add_argument("--train-batch", type=positive_int, default=None,
                   help="patches per step (default 8 on CUDA, 2 on the CPU)")
    g.add_argument("--patch", type=positive_int, default=None,
                   help="patch side in pixels (default 256 on CUDA, 32 on the CPU)")
    g.add_argument("--train-steps", type=positive_int, default=None,
                   help="timed steps per configuration (default 10 on CUDA, 2 on the CPU)")
    g.add_argument("--train-warmup", type=int, default=None,
                   help="untimed steps per configuration (default 3 on CUDA, 1 on the CPU)")
    g.add_argument("--train-precision", choices=NET_PRECISIONS, default="auto",
                   help="the network's autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffloss_fast.tools.train_bench",
        description="Times a restoration network's training step with and without DiffLoss.")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: auto)")
    add_prior_arguments(p, default=None, default_text="default adm-256-uncond on CUDA, tiny "
                        "on the CPU", legacy_weights=False)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="DiffLoss's precision (default auto)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "native"))
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per shape (during warm-up) "
                        "instead of picking them by heuristics")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    add_train_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.custom_",
                            category=FutureWarning)  # guided_diffusion's import, as in cli.main
    parser = build_parser()
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    check_prior(parser, args.prior, args.prior_config)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    try:
        result = run_train_bench(args)
    except ValueError as err:
        parser.error(str(err))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
