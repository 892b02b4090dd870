"""``diffloss-fast profile``: where the time of one loss step goes, by kind of kernel.

``torch.profiler`` records a few loss steps (forward + backward, after warm-up) of one variant.
Every device kernel (on the CPU: every operator, by self time) is put in a category by its
name, first matching rule wins (``CATEGORIES``), and the step's device busy time is compared
with its wall time. That answers which kind of limit a step hits: compute (convolutions,
matmuls, attention), memory traffic (norms, elementwise, copies) or launches (the device
idles between kernels: busy time well under the wall time). The wall time is taken under the
profiler, which adds some cost to every launch: `diffloss-fast bench` gives the step time proper.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ..loss import resolve_precision
from . import hardware, harness
from .baselines import canonical
from .harness import (CATEGORIES, add_measurement_arguments, categorize, check_device,
                      check_fast_path, check_prior, positive_int, prior_source, write_json)

def _self_time_us(event, device: bool) -> float:
    if device:  # the attribute was renamed from *_cuda_* in torch 2.4
        return float(getattr(event, "self_device_time_total",
                             getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


def kernel_times(prof, cuda: bool) -> dict[str, tuple[float, int]]:
    """Total self time (us) and call count per kernel (CUDA) or operator (CPU) name. Should
    this torch list no kernel rows, the device time of the operators that launched them."""
    def collect(keep, device):
        out = {}
        for event in prof.key_averages():
            us = _self_time_us(event, device)
            if keep(event) and us > 0:
                out[event.key] = (us, event.count)
        return out

    kernel_type = torch.autograd.DeviceType.CUDA
    if cuda:
        kernels = collect(lambda e: getattr(e, "device_type", None) == kernel_type, True)
        if kernels:
            return kernels
    return collect(lambda e: e.key.startswith("aten::"), cuda)


def summarize(times: dict[str, tuple[float, int]], steps: int, wall_ms: float,
              *, top: int = 25) -> dict:
    """Per-step milliseconds by category and the top kernels, from ``kernel_times``."""
    by_category: dict[str, float] = defaultdict(float)
    for name, (us, _) in times.items():
        by_category[categorize(name)] += us / 1e3 / steps
    busy = sum(by_category.values())
    ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms_per_step": wall_ms,
        "busy_ms_per_step": busy,
        "categories": [{"category": c, "ms_per_step": ms, "share": ms / busy if busy else 0.0}
                       for c, ms in sorted(by_category.items(), key=lambda kv: -kv[1])],
        "top": [{"name": n, "category": categorize(n), "ms_per_step": us / 1e3 / steps,
                 "calls_per_step": count / steps} for n, (us, count) in ranked],
    }


def _launch_chain(event, depth: int) -> str:
    """The operator that launched a kernel and the operators it ran inside, innermost first."""
    names = []
    while event is not None and len(names) < depth:
        names.append(event.name)
        event = event.cpu_parent
    return " < ".join(names)


def kernel_sources(prof, categories, steps: int, cuda: bool, *, depth: int = 6,
                   top: int = 8) -> dict[str, list[dict]]:
    """For each category, where its kernels were launched from: the chain of operators around
    each launch (on the CPU: around each operator of the category), by device time per step.
    It names the op behind a copy, e.g. the ``contiguous`` inside a convolution's backward."""
    found = {c: defaultdict(lambda: [0.0, 0]) for c in categories}
    for event in prof.events():
        if cuda:
            launched = [(k.name, k.duration) for k in getattr(event, "kernels", ())]
        elif event.name.startswith("aten::"):
            launched = [(event.name, _self_time_us(event, False))]
        else:
            launched = []
        for name, us in launched:
            tally = found.get(categorize(name))
            if tally is not None and us > 0:
                entry = tally[_launch_chain(event, depth)]
                entry[0] += us
                entry[1] += 1
    return {c: [{"chain": chain, "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
                for chain, (us, n) in sorted(tally.items(), key=lambda kv: -kv[1][0])[:top]]
            for c, tally in found.items()}


def format_sources(sources: dict[str, list[dict]]) -> str:
    lines = []
    for category, rows in sources.items():
        lines += ["", f"{category}: launched from (innermost operator first)"]
        lines += [f"{r['ms_per_step']:>9.3f}{r['calls_per_step']:>7.0f}  {r['chain'][:150]}"
                  for r in rows]
    return "\n".join(lines)


def format_summary(summary: dict, what: str) -> str:
    lines = [f"{what}: device busy {summary['busy_ms_per_step']:.2f} ms of "
             f"{summary['wall_ms_per_step']:.2f} ms wall per step "
             f"({summary['busy_ms_per_step'] / summary['wall_ms_per_step']:.0%})", "",
             f"{'category':<16}{'ms/step':>10}{'share':>8}"]
    lines += [f"{c['category']:<16}{c['ms_per_step']:>10.2f}{c['share']:>8.1%}"
              for c in summary["categories"]]
    lines += ["", f"{'ms/step':>9}{'calls':>7}  {'category':<15}kernel"]
    lines += [f"{k['ms_per_step']:>9.3f}{k['calls_per_step']:>7.0f}  {k['category']:<15}"
              f"{k['name'][:110]}" for k in summary["top"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    device = hardware.resolve_device(args.device)
    cuda = device.type == "cuda"
    weights, config = prior_source(args.prior or ("adm-256-uncond" if cuda else "tiny"),
                                   args.prior_config, args.checkpoint)
    resolution = args.resolution or (256 if cuda else 32)
    batch = args.batch or (8 if cuda else 2)
    prior = harness.measurement_prior(weights, config, device, "timing")
    precision = resolve_precision(args.precision, device)  # baselines run their own
    loss_fn = harness.make_loss(prior, args.variant, args.terms, precision=precision,
                              backend=args.backend,
                              channels_last=harness.CHANNELS_LAST_CHOICES[args.channels_last],
                              compile_mode=harness.compile_option(args.compile))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    inputs = harness.make_inputs(batch, resolution, device)
    step = lambda: harness.loss_step(loss_fn, *inputs)  # noqa: E731
    for _ in range(args.warmup):  # compilation, autotuning and allocator growth stay outside
        step()
    hardware.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        hardware.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    what = (f"{args.variant} {precision} {args.terms}, batch {batch} at {resolution}x{resolution}"
            f" on {hardware.device_name(device)}")
    summary = summarize(kernel_times(prof, cuda), args.steps, wall_ms)
    print(format_summary(summary, what))
    if args.sources:
        summary["sources"] = kernel_sources(prof, args.sources, args.steps, cuda)
        print(format_sources(summary["sources"]))
    result = {"what": what, "variant": args.variant, "terms": args.terms, "batch": batch,
              "resolution": resolution, "precision": precision, "prior": config,
              "weights": weights,
              "torch": torch.__version__,
              "cudnn_benchmark": args.cudnn_benchmark,
              "kernels": "CUDA kernels" if cuda else "CPU operators (self time)", **summary}
    if args.json:
        write_json(args.json, result)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace} (open in chrome://tracing or ui.perfetto.dev)")
    return result


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for what this machine cannot run, before anything is built."""
    device = check_device(parser, args.device)
    check_prior(parser, args.prior, args.prior_config, args.checkpoint)
    check_fast_path(parser, device, (args.variant,), args.backend, args.channels_last)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="where one loss step's time goes, by kind of kernel",
        description="Profiles a few loss steps (forward + backward) of one variant with "
                    "torch.profiler and sums the device time of each kind of kernel "
                    "(convolution, matmul, attention, norm, elementwise, copy, ...), "
                    "with the device's busy time against the wall time. Defaults: ADM-256, "
                    "batch 8 at 256x256 on CUDA; the tiny prior on the CPU (operators).")
    add_measurement_arguments(p, device_help="cuda, cuda:1, cpu (default: auto)",
                              prior_default=None,
                              prior_default_text="default adm-256-uncond on CUDA, tiny on "
                                                 "the CPU",
                              resolution_default=None)
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--variant", default="fast", type=canonical, choices=harness.VARIANTS)
    p.add_argument("--terms", default="both", choices=tuple(harness.TERMS))
    p.add_argument("--channels-last", default="auto", choices=tuple(harness.CHANNELS_LAST_CHOICES))
    p.add_argument("--compile", default="graph", choices=harness.COMPILE_CHOICES,
                   help="how fast-compiled compiles (as in bench)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms (as in bench)")
    p.add_argument("--warmup", type=positive_int, default=2)
    p.add_argument("--steps", type=positive_int, default=3, help="profiled steps")
    p.add_argument("--sources", nargs="+", default=[], metavar="CATEGORY",
                   choices=[c for c, _ in CATEGORIES] + ["other"],
                   help="also list where these categories' kernels were launched from, e.g. "
                        "--sources copy elementwise")
    p.add_argument("--json", default=None, help="write the summary to this JSON file")
    p.add_argument("--trace", default=None, help="write a Chrome trace of the profiled steps")
    p.set_defaults(func=run, check=check)
