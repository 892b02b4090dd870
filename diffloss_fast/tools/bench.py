"""``diffloss-fast bench``: ReferenceDiffLoss against DiffLoss, forward + backward of the loss."""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .. import ops
from ..loss import resolve_precision
from . import hardware
from .flops import count_flops
from .harness import (ACTIVATION_CHECKPOINTING_HELP, CHANNELS_LAST_CHOICES, COMPILE_CHOICES,
                      TERMS, VARIANTS, add_measurement_arguments, check_device, check_fast_path,
                      check_prior, compile_option, hidden_alias, loss_step, make_inputs,
                      make_loss, measurement_prior, positive_int, prior_source, write_json)

# On the CPU a step of the tiny prior is bound by per-op overhead: at small sizes the
# comparison times that overhead and its noise, so the CPU default is big enough for the work
# to show.
CPU_DEFAULTS = dict(resolution=64, batches=[4], warmup=2, repeats=10)
CUDA_DEFAULTS = dict(resolution=256, batches=[1, 4, 8], warmup=3, repeats=10)


@dataclass
class Row:
    variant: str
    precision: str
    compiled: bool
    backend: str
    terms: str
    batch: int
    resolution: int
    ms_per_step: float | None = None  # the median of the timed steps
    ms_min: float | None = None
    ms_max: float | None = None
    images_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    speedup: float | None = None
    compile_s: float | None = None
    status: str = "ok"
    channels_last: str = "auto"
    compile_mode: str | None = None


def measure(prior, variant: str, terms: str, batch: int, resolution: int,
            device: torch.device, *, precision: str, backend: str, warmup: int, repeats: int,
            peak_tflops: float, checkpoint: bool = False,
            channels_last: bool | str = "auto", compile_mode: bool | str = True) -> Row:
    """Time one (variant, terms, batch) configuration; an out-of-memory error becomes a row."""
    prec = "fp32" if variant == "reference" else resolve_precision(precision, device)
    loss_fn = make_loss(prior, variant, terms, precision=prec, backend=backend,
                        checkpoint=checkpoint, channels_last=channels_last,
                        compile_mode=compile_mode)
    be = "torch" if variant == "reference" else ops.resolve_backend(backend, device)
    row = Row(variant, prec, variant == "fast-compiled", be, terms, batch, resolution,
              channels_last=str(channels_last),
              compile_mode=("graph" if compile_mode is True else str(compile_mode))
              if variant == "fast-compiled" else None)
    inputs = make_inputs(batch, resolution, device)
    try:
        hardware.reset_peak_memory(device)
        if row.compiled:  # the first call compiles; report it apart from the timings
            start = time.perf_counter()
            loss_step(loss_fn, *inputs)
            hardware.synchronize(device)
            row.compile_s = time.perf_counter() - start
        times = hardware.time_ms(lambda: loss_step(loss_fn, *inputs), device,
                                 warmup=warmup, repeats=repeats)
        row.peak_mem_gib = hardware.peak_memory_gib(device)
        eager = make_loss(prior, variant if variant == "reference" else "fast", terms,
                          precision=prec, backend=be, checkpoint=checkpoint,
                          channels_last=channels_last)
        flops = count_flops(lambda: loss_step(eager, *inputs))
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
        return row
    except Exception as err:  # noqa: BLE001 - one broken configuration must not lose the rest
        traceback.print_exc()
        row.status = f"error: {type(err).__name__}"
        return row
    finally:
        del loss_fn
        inputs = None
        hardware.reset_peak_memory(device)
    row.ms_per_step = statistics.median(times)
    row.ms_min, row.ms_max = min(times), max(times)
    row.images_per_s = batch / (row.ms_per_step * 1e-3)
    row.tflops = flops / (row.ms_per_step * 1e-3) / 1e12
    row.mfu = row.tflops / peak_tflops if peak_tflops else None
    return row


def add_speedups(rows: list[Row]) -> None:
    """Speedup of each row over the reference at the same terms, batch and resolution."""
    ref = {(r.terms, r.batch, r.resolution): r.ms_per_step for r in rows
           if r.variant == "reference" and r.ms_per_step}
    for r in rows:
        base = ref.get((r.terms, r.batch, r.resolution))
        if base and r.ms_per_step:
            r.speedup = base / r.ms_per_step


def format_table(rows: list[Row]) -> str:
    head = ("variant", "precision", "terms", "batch", "ms/step", "min", "max", "images/s",
            "speedup", "TFLOP/s", "MFU", "peak GiB")
    lines = []
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    tflops_spec = ".1f" if any((r.tflops or 0) > 10 for r in rows) else ".3f"
    for r in rows:
        if r.status != "ok":
            lines.append((r.variant, r.precision, r.terms, str(r.batch), r.status,
                          *("-",) * (len(head) - 5)))
            continue
        lines.append((r.variant, r.precision, r.terms, str(r.batch), fmt(r.ms_per_step, ".2f"),
                      fmt(r.ms_min, ".2f"), fmt(r.ms_max, ".2f"), fmt(r.images_per_s, ".1f"),
                      fmt(r.speedup, ".2f") + "x" if r.speedup else "-",
                      fmt(r.tflops, tflops_spec), fmt(r.mfu, ".1%"), fmt(r.peak_mem_gib, ".2f")))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in
                      enumerate(zip(line, widths))) for line in lines]
    return "\n".join(out)


def cpu_note(weights: str | None, config) -> str:
    """What a CPU table can and cannot say, printed under it."""
    measured = (f"the weights in {weights}" if weights else
                "the tiny random-weight prior" if config == "tiny" else
                f"the {config} preset with random weights")
    return ("note: CPU timings are bound by per-op overhead, not arithmetic, and were measured "
            f"with {measured}; the GPU speedups are in the README's table")


def run(args: argparse.Namespace) -> dict:
    device = hardware.resolve_device(args.device)
    cuda = device.type == "cuda"
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    weights, config = prior_source(args.prior or ("adm-256-uncond" if cuda else "tiny"),
                                   args.prior_config, args.checkpoint)
    resolution = args.resolution or defaults["resolution"]
    batches = args.batch_sizes or defaults["batches"]
    variants = args.variants or (["reference", "fast", "fast-fused", "fast-graphed"] if cuda
                                 else ["reference", "fast"])
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    repeats = args.repeats or defaults["repeats"]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays true fp32
        torch.backends.cudnn.allow_tf32 = False
    # one setting for every variant of the run, so the ratios stay fair
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    prior = measurement_prior(weights, config, device, "timing")
    # MFU is against the rate of the dtype the fast path computes in: bf16 on CUDA, fp32 on CPU.
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = hardware.matmul_peak_tflops(device, peak_dtype)
    print(f"device: {hardware.device_name(device)}; measured {str(peak_dtype)[6:]} matmul peak "
          f"{peak:.3f} TFLOP/s; resolution {resolution}; {repeats} timed steps after {warmup} "
          f"warm-up; torch {torch.__version__}")

    jobs = [(v, terms, b) for terms in args.terms for b in batches for v in variants
            if not (v == "reference" and terms != "both" and not args.reference_all_terms)]
    rows = []
    for variant, terms, batch in tqdm(jobs, desc="bench", unit="config"):
        rows.append(measure(prior, variant, terms, batch, resolution, device,
                            precision=args.precision, backend=args.backend, warmup=warmup,
                            repeats=repeats, peak_tflops=peak,
                            checkpoint=args.activation_checkpointing,
                            channels_last=CHANNELS_LAST_CHOICES[args.channels_last],
                            compile_mode=compile_option(args.compile)))
    add_speedups(rows)
    print(format_table(rows))
    if not cuda:
        print(cpu_note(weights, config))
    compiled = [r for r in rows if r.compile_s is not None]
    if compiled:
        print("compile time (first call, not in the timings): " + ", ".join(
            f"{r.terms}/b{r.batch} {r.compile_s:.1f}s" for r in compiled))
    result = {
        "device": hardware.device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peak_bf16_tflops" if cuda else "peak_fp32_tflops": peak,
        "prior": config,
        "weights": weights,  # None: random weights
        "resolution": resolution,
        "warmup": warmup,
        "repeats": repeats,
        "cudnn_benchmark": args.cudnn_benchmark,
        "rows": [asdict(r) for r in rows],
    }
    if args.json:
        write_json(args.json, result)
    return result


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for what this machine cannot run, before anything is built."""
    device = check_device(parser, args.device)
    check_prior(parser, args.prior, args.prior_config, args.checkpoint)
    check_fast_path(parser, device, args.variants or (), args.backend, args.channels_last)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time ReferenceDiffLoss against DiffLoss (forward + backward)",
        description="Times one loss step (forward and backward to the restored image) of the "
                    "plain reference and of the fast path, warm-up excluded: the median of "
                    "synchronised runs, with their min and max. Defaults: ADM-256 at 256x256, "
                    "batches 1, 4 and 8 on CUDA; the tiny prior at 64x64, batch 4, 10 timed "
                    "steps on the CPU, where per-op overhead, not arithmetic, bounds a step.")
    add_measurement_arguments(p, device_help="cuda, cuda:1, cpu (default: auto)",
                              prior_default=None,
                              prior_default_text="default adm-256-uncond on CUDA, tiny on "
                                                 "the CPU",
                              resolution_default=None)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="fast: eager with PyTorch's norms (fused_kernels=False); fast-fused: "
                        "eager with the fused kernels; fast-graphed: fast-fused replayed as "
                        "CUDA graphs (the default on CUDA); fast-compiled: torch.compile "
                        "(--compile). Default: reference, fast, fast-fused and fast-graphed "
                        "on CUDA; reference and fast on the CPU")
    p.add_argument("--terms", nargs="+", choices=tuple(TERMS), default=["both"],
                   help="which DiffLoss terms to time (default: both)")
    p.add_argument("--reference-all-terms", action="store_true",
                   help="also time the reference for semantic/natural (it always runs the "
                        "full UNet, so it costs the same as 'both')")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help=ACTIVATION_CHECKPOINTING_HELP + "; fast variants only")
    hidden_alias(p, "--checkpointing", "activation_checkpointing", action="store_true")
    p.add_argument("--channels-last", default="auto", choices=tuple(CHANNELS_LAST_CHOICES),
                   help="activation layout of the fast path (auto: DiffLoss's default)")
    p.add_argument("--compile", default="graph", choices=COMPILE_CHOICES,
                   help="how fast-compiled compiles: the whole truncated UNet (graph, or one of "
                        "torch.compile's modes), or block by block (regional)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per shape (during warm-up) "
                        "instead of picking them by heuristics; applies to every variant")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration (default 3 on CUDA, 2 on the CPU)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed steps per configuration (default 10)")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    p.set_defaults(func=run, check=check)
