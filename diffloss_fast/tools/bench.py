"""``diffloss-fast bench``: DiffLoss against the baselines a user would run instead
(:mod:`.baselines`), forward + backward of the loss, all timed in one process.

A speedup is quoted against the fastest baseline timed for the same terms, batch and resolution
in the same run; the ratio to strict fp32 stands beside it. MFU is quoted against the card's
datasheet dense bf16 peak, with the matmul rate measured in the run (three times: before,
halfway, after) beside it.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import traceback
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from .. import ops
from ..loss import resolve_precision
from . import hardware
from .baselines import BASELINES, PRECISIONS, canonical, numerics, unsupported
from .flops import count_flops
from .harness import (ACTIVATION_CHECKPOINTING_HELP, CHANNELS_LAST_CHOICES, COMPILE_CHOICES,
                      COMPILED_VARIANTS, TERMS, VARIANTS, add_measurement_arguments,
                      check_device, check_fast_path, check_prior, compile_option, eager_twin,
                      hidden_alias, loss_step, make_inputs, make_loss, measurement_prior,
                      positive_int, prior_source, write_json)
from .train_bench import add_train_arguments, run_train_bench

# On the CPU a step of the tiny prior is bound by per-op overhead: at small sizes the
# comparison times that overhead and its noise, so the CPU default is big enough for the work
# to show.
CPU_DEFAULTS = dict(resolution=64, batches=[4], warmup=2, repeats=10,
                    variants=["reference-fp32", "fast"])
# Compiled variants compile for minutes on ADM-256: they run when asked for.
CUDA_DEFAULTS = dict(resolution=256, batches=[1, 4, 8], warmup=3, repeats=10,
                     variants=["reference-fp32", "reference-tf32", "reference-bf16",
                               "upstream-fp16", "fast", "fast-fused", "fast-graphed",
                               "fast-two-pass"])


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
    repeats: int = 0
    images_per_s: float | None = None
    tflops: float | None = None
    mfu_datasheet: float | None = None  # of the card's datasheet dense bf16 peak
    mfu_measured: float | None = None  # of the median matmul rate measured in this run
    peak_mem_gib: float | None = None
    speedup: float | None = None  # over the fastest baseline for the same terms and batch
    speedup_over: str | None = None  # that baseline
    vs_fp32: float | None = None  # over reference-fp32 for the same terms and batch
    compile_s: float | None = None  # the first call; with a budget, where it was stopped
    status: str = "ok"
    channels_last: str = "auto"
    compile_mode: str | None = None


def _compile_mode(variant: str, compile_mode: bool | str) -> str | None:
    if variant == "fast-compiled":
        return "graph" if compile_mode is True else str(compile_mode)
    return {"fast-regional": "regional", "reference-compiled": "graph"}.get(variant)


def measure(prior, variant: str, terms: str, batch: int, resolution: int,
            device: torch.device, *, precision: str, backend: str, warmup: int, repeats: int,
            checkpoint: bool = False, channels_last: bool | str = "auto",
            compile_mode: bool | str = True, compile_budget_s: float | None = None) -> Row:
    """Time one (variant, terms, batch) configuration. A configuration that cannot run here,
    runs out of memory, fails, or compiles past ``compile_budget_s`` becomes a row saying so."""
    baseline = variant in BASELINES
    if baseline:
        prec = PRECISIONS[variant]
    else:  # fast-fp8 is fp8 whatever --precision says
        prec = "fp8" if variant == "fast-fp8" else resolve_precision(precision, device)
    row = Row(variant, prec, variant in COMPILED_VARIANTS,
              "torch" if baseline else ops.resolve_backend(backend, device), terms, batch,
              resolution, channels_last="-" if baseline else str(channels_last),
              compile_mode=_compile_mode(variant, compile_mode))
    why = unsupported(variant, device)
    if why:
        row.status = f"skipped: {why}"
        return row

    def make(name):
        return make_loss(prior, name, terms, precision=prec, backend=backend,
                         checkpoint=checkpoint, channels_last=channels_last,
                         compile_mode=compile_mode)

    loss_fn = inputs = None
    try:
        with numerics(variant):
            loss_fn = make(variant)
            inputs = make_inputs(batch, resolution, device)
            hardware.reset_peak_memory(device)
            if row.compiled:  # the first call compiles; report it apart from the timings
                row.compile_s, over = hardware.first_call_s(
                    lambda: loss_step(loss_fn, *inputs), device, compile_budget_s)
                if over:
                    row.status = (f"compile over budget: stopped at {row.compile_s:.1f} s "
                                  f"of {compile_budget_s:g} s")
                    return row
            times = hardware.time_ms(lambda: loss_step(loss_fn, *inputs), device,
                                     warmup=warmup, repeats=repeats)
            row.peak_mem_gib = hardware.peak_memory_gib(device)
            twin = eager_twin(variant)
            counted = loss_fn if twin == variant else make(twin)
            flops = count_flops(lambda: loss_step(counted, *inputs))
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
        return row
    except Exception as err:  # noqa: BLE001 - one broken configuration must not lose the rest
        traceback.print_exc()
        row.status = f"error: {type(err).__name__}"
        return row
    finally:
        loss_fn = inputs = counted = None
        if row.compiled:  # a stopped compilation leaves partial state behind
            torch._dynamo.reset()
        hardware.reset_peak_memory(device)
    row.ms_per_step = statistics.median(times)
    row.ms_min, row.ms_max, row.repeats = min(times), max(times), len(times)
    row.images_per_s = batch / (row.ms_per_step * 1e-3)
    row.tflops = flops / (row.ms_per_step * 1e-3) / 1e12
    return row


def add_speedups(rows: list[Row]) -> None:
    """Each row's speedup over the fastest baseline timed for the same terms, batch and
    resolution (naming it), and its ratio to reference-fp32 there."""
    def key(r):
        return r.terms, r.batch, r.resolution
    fastest, fp32 = {}, {}
    for r in rows:
        if r.variant in BASELINES and r.ms_per_step:
            if key(r) not in fastest or r.ms_per_step < fastest[key(r)].ms_per_step:
                fastest[key(r)] = r
            if r.variant == "reference-fp32":
                fp32[key(r)] = r.ms_per_step
    for r in rows:
        if not r.ms_per_step:
            continue
        if key(r) in fastest:
            r.speedup = fastest[key(r)].ms_per_step / r.ms_per_step
            r.speedup_over = fastest[key(r)].variant
        if key(r) in fp32:
            r.vs_fp32 = fp32[key(r)] / r.ms_per_step


def add_mfu(rows: list[Row], datasheet_tflops: float | None, measured_tflops: float) -> None:
    """MFU of each timed row against the datasheet peak (None for an unknown card) and against
    the run's measured matmul rate."""
    for r in rows:
        if r.tflops is not None:
            r.mfu_datasheet = r.tflops / datasheet_tflops if datasheet_tflops else None
            r.mfu_measured = r.tflops / measured_tflops


def format_table(rows: list[Row]) -> str:
    """The rows as a text table; a row that was not timed shows its status across the
    columns after its batch."""
    head = ("variant", "precision", "terms", "batch", "ms/step", "min", "max", "speedup",
            "vs fp32", "TFLOP/s", "MFU sheet", "MFU meas", "peak GiB", "compile s")
    fmt = lambda v, spec, unit="": "-" if v is None else format(v, spec) + unit  # noqa: E731
    tflops_spec = ".1f" if any((r.tflops or 0) > 10 for r in rows) else ".3f"
    cells = []
    for r in rows:
        first = [r.variant, r.precision, r.terms, str(r.batch)]
        cells.append(first + ([r.status] if r.status != "ok" else [
            fmt(r.ms_per_step, ".2f"), fmt(r.ms_min, ".2f"), fmt(r.ms_max, ".2f"),
            fmt(r.speedup, ".2f", "x"), fmt(r.vs_fp32, ".2f", "x"), fmt(r.tflops, tflops_spec),
            fmt(r.mfu_datasheet, ".1%"), fmt(r.mfu_measured, ".1%"),
            fmt(r.peak_mem_gib, ".2f"), fmt(r.compile_s, ".1f")]))
    widths = [max([len(h)] + [len(c[i]) for c in cells if len(c) == len(head) or i < 4])
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i > 2 and len(line) == len(head) else c.ljust(w)
                      for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    return "\n".join(out)


def legend(rows: list[Row], peak: dict) -> str:
    """What the ratio and MFU columns are against, in this run."""
    over = sorted({(r.terms, r.batch, r.speedup_over) for r in rows
                   if r.speedup_over and r.variant == r.speedup_over})
    lines = ["speedup: over the fastest baseline timed for the same terms and batch in this run"
             + (" (" + "; ".join(f"{t}, batch {b}: {v}" for t, b, v in over) + ")" if over
                else " (none was timed)") + "; vs fp32: over reference-fp32"]
    measured = peak["measured_tflops"]
    spread = f"{min(measured):.3g}-{max(measured):.3g}"
    sheet = (f"MFU sheet: of the {peak['card']}'s datasheet dense bf16 peak, "
             f"{peak['datasheet_tflops']:g} TFLOP/s" if peak["datasheet_tflops"]
             else "MFU sheet: no datasheet for this device")
    lines.append(f"{sheet}; MFU meas: of the {peak['dtype']} matmul rate measured in this run, "
                 f"median {peak['measured_median']:.3g} TFLOP/s ({spread} over "
                 f"{len(measured)} measurements)")
    return "\n".join(lines)


def cpu_note(weights: str | None, config) -> str:
    """What a CPU table can and cannot say, printed under it."""
    measured = (f"the weights in {weights}" if weights else
                "the tiny random-weight prior" if config == "tiny" else
                f"the {config} preset with random weights")
    return ("note: CPU timings are bound by per-op overhead, not arithmetic, and were measured "
            f"with {measured}; the GPU speedups are in the README's table")


def run(args: argparse.Namespace) -> dict:
    if args.train:
        try:
            result = run_train_bench(args)
        except ValueError as err:  # a patch size the networks or the prior cannot take
            raise SystemExit(f"diffloss-fast bench --train: {err}") from None
        if args.json:
            write_json(args.json, result)
        return result
    device = hardware.resolve_device(args.device)
    cuda = device.type == "cuda"
    defaults = CUDA_DEFAULTS if cuda else CPU_DEFAULTS
    weights, config = prior_source(args.prior or ("adm-256-uncond" if cuda else "tiny"),
                                   args.prior_config, args.checkpoint)
    resolution = args.resolution or defaults["resolution"]
    batches = args.batch_sizes or defaults["batches"]
    variants = list(dict.fromkeys(args.variants or defaults["variants"]))
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    repeats = args.repeats or defaults["repeats"]
    # one setting for every variant of the run, so the ratios stay fair
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    prior = measurement_prior(weights, config, device, "timing")
    card = hardware.card_for(hardware.device_name(device)) if cuda else None
    # the measured rate is of the dtype the fast path computes in: bf16 on CUDA, fp32 on CPU
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    print(f"device: {hardware.device_name(device)}; datasheet dense bf16 peak "
          + (f"{card.peak_tflops:g} TFLOP/s" if card else "unknown")
          + f"; resolution {resolution}; {repeats} timed steps after {warmup} warm-up; "
          f"torch {torch.__version__}")

    jobs = [(v, terms, b) for terms in args.terms for b in batches for v in variants]
    half = (len(jobs) + 1) // 2
    rows, measured = [], []
    with tqdm(total=len(jobs), desc="bench", unit="config") as bar:
        # the matmul rate before, halfway and after: three figures spanning the run
        for part in (jobs[:half], jobs[half:], ()):
            measured.append(hardware.matmul_peak_tflops(device, peak_dtype))
            for variant, terms, batch in part:
                rows.append(measure(prior, variant, terms, batch, resolution, device,
                                    precision=args.precision, backend=args.backend,
                                    warmup=warmup, repeats=repeats,
                                    checkpoint=args.activation_checkpointing,
                                    channels_last=CHANNELS_LAST_CHOICES[args.channels_last],
                                    compile_mode=compile_option(args.compile),
                                    compile_budget_s=args.compile_budget_s))
                bar.update()
    peak = {"dtype": str(peak_dtype).removeprefix("torch."), "card": card.name if card else None,
            "datasheet_tflops": card.peak_tflops if card else None,
            "measured_tflops": measured, "measured_median": statistics.median(measured)}
    add_speedups(rows)
    add_mfu(rows, peak["datasheet_tflops"], peak["measured_median"])
    print(format_table(rows))
    print(legend(rows, peak))
    if not cuda:
        print(cpu_note(weights, config))
    result = {
        "device": hardware.device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peak": peak,
        "prior": config,
        "weights": weights,  # None: random weights
        "resolution": resolution,
        "warmup": warmup,
        "repeats": repeats,
        "cudnn_benchmark": args.cudnn_benchmark,
        "compile_budget_s": args.compile_budget_s,
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
        "bench", help="time DiffLoss against the baselines a user would run (forward + "
                      "backward)",
        description="Times one loss step (forward and backward to the restored image) of the "
                    "baselines (upstream's UNet in strict fp32, with TF32, under bf16 "
                    "autocast, as its own fp16 torso, under torch.compile; for the semantic "
                    "term alone its encoder and middle block only) and of the fast path, in "
                    "one process, warm-up excluded: the median of synchronised runs, with "
                    "their min and max. Defaults: ADM-256 at 256x256, batches 1, 4 and 8 on "
                    "CUDA; the tiny prior at 64x64, batch 4, 10 timed steps on the CPU, where "
                    "per-op overhead, not arithmetic, bounds a step.")
    add_measurement_arguments(p, device_help="cuda, cuda:1, cpu (default: auto)",
                              prior_default=None,
                              prior_default_text="default adm-256-uncond on CUDA, tiny on "
                                                 "the CPU",
                              resolution_default=None)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None)
    p.add_argument("--variants", nargs="+", type=canonical, choices=VARIANTS, default=None,
                   help="baselines: reference-fp32 (strict fp32; 'reference' is accepted for "
                        "it), reference-tf32 (PyTorch's default TF32), reference-bf16 (bf16 "
                        "autocast), upstream-fp16 (guided-diffusion's fp16 torso, CUDA only), "
                        "reference-compiled (reference-bf16 under torch.compile). fast: eager "
                        "with PyTorch's norms; fast-fused: eager with the fused kernels; "
                        "fast-graphed: fast-fused replayed as CUDA graphs (the default on "
                        "CUDA); fast-compiled: torch.compile of the whole truncated UNet "
                        "(--compile); fast-regional: torch.compile block by block. Default: "
                        + ", ".join(CUDA_DEFAULTS["variants"]) + " on CUDA; "
                        + " and ".join(CPU_DEFAULTS["variants"]) + " on the CPU")
    p.add_argument("--terms", nargs="+", choices=tuple(TERMS), default=["both"],
                   help="which DiffLoss terms to time (default: both)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help=ACTIVATION_CHECKPOINTING_HELP + "; fast variants only")
    hidden_alias(p, "--checkpointing", "activation_checkpointing", action="store_true")
    p.add_argument("--channels-last", default="auto", choices=tuple(CHANNELS_LAST_CHOICES),
                   help="activation layout of the fast path (auto: DiffLoss's default)")
    p.add_argument("--compile", default="graph", choices=COMPILE_CHOICES,
                   help="how fast-compiled compiles: the whole truncated UNet (graph, or one of "
                        "torch.compile's modes), or block by block (regional)")
    p.add_argument("--compile-budget-s", type=float, default=None, metavar="S",
                   help="stop a compiled variant's first call (its compilation) after S "
                        "seconds; its row then says so, with the time reached (default: none)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms per shape (during warm-up) "
                        "instead of picking them by heuristics; applies to every variant")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration (default 3 on CUDA, 2 on the CPU)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed steps per configuration (default 10)")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    p.add_argument("--train", action="store_true",
                   help="time a restoration network's whole training step (forward, pixel "
                        "loss, DiffLoss, backward, AdamW) with and without DiffLoss instead of "
                        "the loss step alone; the options below shape it")
    add_train_arguments(p)
    p.set_defaults(func=run, check=check)
