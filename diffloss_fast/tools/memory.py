"""``diffloss-fast memory``: peak memory of one loss step per batch size, and the largest batch
that fits under a memory cap (24 GiB by default: an RTX 4090, emulated on a bigger card).

The cap is ``torch.cuda.set_per_process_memory_fraction(cap / total)``: it limits what torch's
caching allocator may reserve, and that includes the weights a variant keeps on the card (the
reference its fp32 prior; DiffLoss its compute-dtype copy, and the fp32 prior too only with
``--fast-prior device``). The CUDA context and memory allocated outside torch's allocator are
not counted.

Each (variant, batch) runs ONE forward + backward step after the peak statistics are reset. By
default the batch sizes are searched: 1, 2, 4, ... until the first out-of-memory error, then a
bisection between the last batch that fits and the first that does not (memory grows with the
batch, so "fits" is monotone). ``find_max_batch`` and ``plot_rows`` are pure and run on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..loss import resolve_precision
from . import hardware, harness
from .harness import (add_measurement_arguments, check_prior, positive_int, prior_source,
                      write_json)

VARIANTS = ("reference", "fast", "fast-fused", "fast-ckpt")
DEFAULT_CAP_GIB = 24.0  # an RTX 4090
DEFAULT_MAX_BATCH = 1024
GIB = 2 ** 30
LEAK_TOLERANCE = 16 * 2 ** 20  # bytes left after a variant that only earn a note, not a warning
NO_CUDA_MESSAGE = ("diffloss-fast memory: the memory sweep needs a CUDA device (it measures the "
                   "CUDA allocator's peak and caps it with set_per_process_memory_fraction); "
                   "{why}. Nothing was run.")


@dataclass
class Row:
    variant: str
    precision: str
    terms: str
    batch: int
    fits: bool
    peak_allocated_gib: float | None
    nvml_used_gib: float | None


# --------------------------------------------------------------------------- pure parts


def find_max_batch(fits: Callable[[int], bool], *, limit: int = DEFAULT_MAX_BATCH) -> int:
    """The largest batch in [1, limit] for which ``fits(batch)`` is true, 0 when batch 1 fails.

    Doubles from 1 until the first failure (or the limit), then bisects between the last batch
    that fitted and the first that failed. Assumes ``fits`` is monotone (true up to some batch,
    false after) and calls it at most once per batch, never above ``limit``.
    """
    if limit < 1:
        raise ValueError(f"limit must be a positive batch size, got {limit}")
    good, bad = 0, None
    batch = 1
    while True:
        if fits(batch):
            good = batch
            if batch >= limit:
                return good
            batch = min(batch * 2, limit)
        else:
            bad = batch
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def max_batches(rows: Iterable[Row | dict], variants: Iterable[str]) -> dict[str, int]:
    """Largest batch that fitted per variant (0 when none did)."""
    rows = [r if isinstance(r, dict) else asdict(r) for r in rows]
    return {v: max((r["batch"] for r in rows if r["variant"] == v and r["fits"]), default=0)
            for v in variants}


def summary_line(max_batch: dict[str, int], cap_gib: float, *, limit: int | None = None) -> str:
    def show(v):
        b = max_batch[v]
        return f">={b} (search limit)" if limit is not None and b >= limit else str(b)
    text = f"max batch under {cap_gib:g} GiB: " + ", ".join(f"{v} {show(v)}" for v in max_batch)
    ref = max_batch.get("reference")
    ratios = [f"{v}/reference {max_batch[v] / ref:.2f}x" for v in max_batch
              if v != "reference" and ref]
    if ratios:
        text += "; " + ", ".join(ratios)
    elif "reference" in max_batch and len(max_batch) > 1:
        text += "; fast/reference ratio undefined (the reference fits no batch)"
    return text


def format_table(rows: Iterable[Row | dict]) -> str:
    rows = [r if isinstance(r, dict) else asdict(r) for r in rows]
    head = ("variant", "precision", "terms", "batch", "fits", "peak alloc GiB", "NVML used GiB")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [(r["variant"], r["precision"], r["terms"], str(r["batch"]),
              "yes" if r["fits"] else "OOM", fmt(r["peak_allocated_gib"]),
              fmt(r["nvml_used_gib"])) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i > 2 else c.ljust(w)
                      for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    return "\n".join(out)


def plot_rows(rows: Iterable[Row | dict], path: str | Path, *, cap_gib: float, device: str,
              resolution: int) -> Path:
    """PNG: peak allocated GiB against batch size, one line per variant, OOM points as an x at
    the cap, the cap as a dashed horizontal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    rows = [r if isinstance(r, dict) else asdict(r) for r in rows]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for i, variant in enumerate(variants):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch"])
        ok = [r for r in mine if r["fits"] and r["peak_allocated_gib"] is not None]
        oom = [r for r in mine if not r["fits"]]
        ax.plot([r["batch"] for r in ok], [r["peak_allocated_gib"] for r in ok], "o-",
                color=color, label=variant)
        if oom:
            ax.plot([r["batch"] for r in oom], [cap_gib] * len(oom), "x", color=color,
                    markersize=10, markeredgewidth=2, label=f"{variant} OOM")
    ax.axhline(cap_gib, color="k", linestyle="--", linewidth=1, label=f"cap {cap_gib:g} GiB")
    batches = [r["batch"] for r in rows]
    if batches and max(batches) / max(min(batches), 1) >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    ax.set_xlabel("batch size (images per loss step)")
    ax.set_ylabel("peak allocated memory (GiB)")
    ax.set_title(f"DiffLoss forward + backward memory, {device}, {resolution}x{resolution}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- CUDA parts


class NvmlReader:
    """Used memory of the torch device's GPU according to NVML, or None with a note."""

    def __init__(self, device: torch.device):
        self.handle, self.note, self._pynvml = None, None, None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._pynvml = pynvml
        except Exception as err:  # noqa: BLE001 - no library, no driver, ...
            self.note = f"NVML unavailable ({type(err).__name__}: {err}); nvml_used_gib is null"
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # the UUID names the same GPU whatever CUDA_VISIBLE_DEVICES renumbers
            uuid = str(torch.cuda.get_device_properties(index).uuid)
        except Exception:  # noqa: BLE001 - an old torch without .uuid
            uuid = None
        if uuid:
            names = [uuid] if uuid.startswith(("GPU-", "MIG-")) else ["GPU-" + uuid, "MIG-" + uuid]
            for name in names:
                try:
                    self.handle = pynvml.nvmlDeviceGetHandleByUUID(name)
                    return
                except Exception:  # noqa: BLE001 - NVML does not know it by that name
                    pass
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [s.strip() for s in visible.split(",")] if visible else []
            nvml_index = int(ids[index]) if index < len(ids) and ids[index].isdigit() else index
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        except Exception as err:  # noqa: BLE001
            self.note = f"NVML has no handle for {device} ({err}); nvml_used_gib is null"

    def used_gib(self) -> float | None:
        if self.handle is None:
            return None
        try:
            return self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / GIB
        except Exception:  # noqa: BLE001
            return None

    def close(self) -> None:
        if self._pynvml is not None:
            try:
                self._pynvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    # cuBLAS/cuDNN workspaces can fail as a plain RuntimeError
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower()
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _free(device: torch.device, *, collect: bool = True) -> None:
    if collect:  # a full collection costs ~0.3 s with torch and matplotlib loaded
        gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def measure_step(loss_fn, variant: str, precision: str, terms: str, batch: int,
                 resolution: int, device: torch.device, nvml: NvmlReader) -> Row:
    """One forward + backward after a peak reset; an out-of-memory error gives ``fits=False``
    and every tensor of the failed step is released before returning."""
    row = Row(variant, precision, terms, batch, False, None, None)
    hardware.reset_peak_memory(device)
    inputs = None
    oom = False
    try:
        inputs = harness.make_inputs(batch, resolution, device)
        harness.loss_step(loss_fn, *inputs)
        torch.cuda.synchronize(device)
        row.peak_allocated_gib = hardware.peak_memory_gib(device)
        row.nvml_used_gib = nvml.used_gib()  # inputs and their gradient are still alive
        row.fits = True
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        oom = True
    # outside the except block: the traceback and the frames holding the step's activations
    # are gone; drop the inputs too, then collect and give the cached blocks back.
    if inputs is not None:
        inputs[0].grad = None
    del inputs
    _free(device, collect=oom)  # a step that finished frees its graph by reference counting
    return row


def _leftover_bytes(device: torch.device, baseline: int) -> int:
    """What torch's allocator still holds beyond ``baseline`` once everything is released."""
    _free(device)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:  # cuBLAS keeps its workspaces in the caching allocator
        clear()
    return torch.cuda.memory_allocated(device) - baseline


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def run(args: argparse.Namespace) -> dict:
    try:
        device = hardware.resolve_device(getattr(args, "device", "auto"))
    except (ValueError, RuntimeError) as err:
        _fail(NO_CUDA_MESSAGE.format(why=str(err)))
    if device.type != "cuda":
        why = ("this torch sees no CUDA device (torch " + torch.__version__ + ")"
               if not torch.cuda.is_available() else f"--device {args.device} is not a CUDA device")
        _fail(NO_CUDA_MESSAGE.format(why=why))
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    total = torch.cuda.get_device_properties(device).total_memory
    cap_gib = float(args.cap_gib)
    if not 0 < cap_gib * GIB <= total:
        _fail(f"diffloss-fast memory: --cap-gib {cap_gib:g} does not fit this card: "
              f"{hardware.device_name(device)} has {total / GIB:.2f} GiB in all "
              f"(give a cap between 0 and {total / GIB:.2f}).")

    variants = list(dict.fromkeys(args.variants or VARIANTS))
    limit = int(getattr(args, "max_batch", None) or DEFAULT_MAX_BATCH)
    batches = sorted(set(args.batch_sizes)) if args.batch_sizes else None
    if batches and batches[0] < 1:
        _fail(f"diffloss-fast memory: batch sizes must be positive, got {args.batch_sizes}")
    weights, config = prior_source(args.prior or "adm-256-uncond", args.prior_config,
                                   args.checkpoint)
    resolution = args.resolution or 256
    terms = args.terms or "both"
    backend = getattr(args, "backend", "auto") or "auto"

    fast_prior = getattr(args, "fast_prior", "cpu") or "cpu"
    name = hardware.device_name(device)
    print(f"device: {name} ({total / GIB:.2f} GiB), capped at {cap_gib:g} GiB with "
          f"set_per_process_memory_fraction({cap_gib * GIB / total:.4f}); what a variant keeps "
          f"on the device counts against the cap: the reference its fp32 prior, the fast "
          f"variants their compute-dtype copy"
          + (" and the fp32 prior" if fast_prior == "device" else " (the prior stays on the CPU)")
          + f"; resolution {resolution}; terms {terms}; torch {torch.__version__}")

    notes: list[str] = []
    nvml = NvmlReader(device)
    if nvml.note:
        notes.append(nvml.note)
        print(nvml.note)
    rows: list[Row] = []
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total, device)
    bar = tqdm(total=len(variants) * len(batches) if batches else None, desc="memory",
               unit="step")
    cpu_prior = None
    try:
        for variant in variants:
            baseline = _leftover_bytes(device, 0)
            if variant == "reference" or fast_prior == "device":  # a device copy per variant
                prior = harness.measurement_prior(weights, config, device, "memory")
            else:
                cpu_prior = cpu_prior or harness.measurement_prior(
                    weights, config, torch.device("cpu"), "memory")
                prior = cpu_prior
            precision = "fp32" if variant == "reference" else resolve_precision(args.precision,
                                                                                device)
            loss_fn = harness.make_loss(prior, "fast" if variant == "fast-ckpt" else variant,
                                      terms, precision=precision, backend=backend,
                                      checkpoint=variant == "fast-ckpt")

            def fits(batch: int) -> bool:
                bar.set_postfix_str(f"{variant} b{batch}")
                row = measure_step(loss_fn, variant, precision, terms, batch, resolution,
                                   device, nvml)
                rows.append(row)
                bar.update()
                return row.fits

            if batches:
                for b in batches:
                    fits(b)
            else:
                find_max_batch(fits, limit=limit)
            del loss_fn, fits, prior  # with them the fast path's copy and a device prior
            leak = _leftover_bytes(device, baseline)
            if leak:
                note = (f"{variant}: {leak / 2 ** 20:.1f} MiB still allocated after the variant "
                        "was freed")
                if leak > LEAK_TOLERANCE:
                    warnings.warn(note + " (a leak?)", RuntimeWarning, stacklevel=1)
                notes.append(note)
    finally:
        bar.close()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        nvml.close()

    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (order[r.variant], r.batch))
    best = max_batches(rows, variants)
    print(format_table(rows))
    print(summary_line(best, cap_gib, limit=None if batches else limit))
    result = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cap_gib": cap_gib,
        "rows": [asdict(r) for r in rows],
        "max_batch": best,
        "prior": config,
        "weights": weights,  # None: random weights
        "fast_prior": fast_prior,
        "resolution": resolution,
        "device_total_gib": total / GIB,
        "search_limit": None if batches else limit,
        "notes": notes,
    }
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot_rows(rows, args.plot, cap_gib=cap_gib, device=name, resolution=resolution)
        print(f"wrote {args.plot}")
    return result


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors in the prior options, before anything is built (``run`` refuses a machine
    without CUDA itself)."""
    check_prior(parser, args.prior, args.prior_config, args.checkpoint)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="peak memory per batch size, and the largest batch under a cap",
        description="Runs one loss step (forward + backward to the restored image) per batch "
                    "size and records torch's peak allocated memory and NVML's used memory, "
                    "under a cap emulated with set_per_process_memory_fraction (24 GiB, an RTX "
                    "4090, by default; the weights each variant keeps on the card count against "
                    "it). Without --batch-sizes it doubles the batch until the first "
                    "out-of-memory error, then bisects to the largest batch that fits. Needs a "
                    "CUDA device.")
    add_measurement_arguments(p, device_help="cuda, cuda:1 (default: auto)",
                              prior_default="adm-256-uncond",
                              prior_default_text="default %(default)s", resolution_default=256)
    p.add_argument("--cap-gib", type=float, default=DEFAULT_CAP_GIB,
                   help="memory cap in GiB (default 24: an RTX 4090); at most the card's memory")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="fast: PyTorch's norms; fast-fused: the fused norm kernels (the default "
                        "on CUDA); fast-ckpt: fast with activation checkpointing of the restored "
                        "branch (default: all four)")
    p.add_argument("--terms", default="both", choices=tuple(harness.TERMS))
    p.add_argument("--fast-prior", default="cpu", choices=("cpu", "device"),
                   help="where the fast variants' fp32 prior lives: on the CPU (DiffLoss then "
                        "puts only its compute-dtype copy on the device; the default, the lean "
                        "way to run) or on the device too (default: %(default)s)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                   help="measure exactly these batch sizes instead of searching")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH,
                   help="upper limit of the search (default 1024)")
    p.add_argument("--json", default=None, help="write the rows and max batches to this file")
    p.add_argument("--plot", default=None, help="write a PNG plot of peak memory per batch")
    p.set_defaults(func=run, check=check)
