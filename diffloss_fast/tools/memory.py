"""``diffloss-fast memory``: the largest batch of one loss step that fits a memory budget (24 GiB
by default: an RTX 4090, emulated on a bigger card), for the baselines and the fast variants in
the same run.

The budget is what NVML reports the process uses on the card, CUDA context and libraries
included, not only what torch's allocator holds. For each variant, after a warm-up step (which
loads the libraries and kernels it uses), the memory the process holds outside the allocator is
NVML's figure less the allocator's reserved bytes; torch's allocator is then capped
(``set_per_process_memory_fraction``) at the budget less that. A batch "fits" only when its
step completes under the cap AND NVML's figure for the process, with the step's memory still
held, is within the budget: what a library allocated on its own during the step counts.

Each (variant, batch) runs ONE forward + backward step after the peak statistics are reset. By
default the batch sizes are searched: 1, 2, 4, ... until the first batch that does not fit,
then a bisection between the last batch that fits and the first that does not (memory grows
with the batch, so "fits" is monotone). The largest batch of each variant is then timed: the
median of synchronised steps under the same cap. ``find_max_batch``, ``allocator_cap_bytes`` and
``plot_rows`` are pure and run on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..loss import resolve_precision
from . import hardware, harness
from .baselines import BASELINES, PRECISIONS, canonical, numerics, unsupported
from .harness import (add_measurement_arguments, check_prior, hidden_alias, positive_int,
                      prior_source, write_json)

# reference-tf32 holds what reference-fp32 holds; reference-compiled recompiles per batch size
BASELINE_VARIANTS = ("reference-fp32", "reference-tf32", "reference-bf16", "upstream-fp16")
FAST_VARIANTS = ("fast", "fast-fused", "fast-ckpt")
VARIANTS = BASELINE_VARIANTS + FAST_VARIANTS
DEFAULT_VARIANTS = ("reference-fp32", "reference-bf16", "upstream-fp16") + FAST_VARIANTS
DEFAULT_BUDGET_GIB = 24.0  # an RTX 4090
DEFAULT_MAX_BATCH = 1024
GIB = 2 ** 30
LEAK_TOLERANCE = 16 * 2 ** 20  # bytes left after a variant that only earn a note, not a warning
NO_CUDA_MESSAGE = ("diffloss-fast memory: the memory sweep needs a CUDA device (it caps the "
                   "CUDA allocator and reads NVML's figure for the process); {why}. Nothing "
                   "was run.")


@dataclass
class Row:
    variant: str
    terms: str
    batch: int
    fits: bool
    nvml_used_gib: float | None  # the process on the card, the step's memory still held
    allocator_peak_gib: float | None  # torch's peak allocated bytes during the step
    ms_per_step: float | None = None  # at each variant's largest batch only


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


def allocator_cap_bytes(budget: int, nvml_used: int, reserved: int) -> int:
    """What torch's allocator may reserve so that the process stays within ``budget``: the
    budget less what the process holds outside the allocator (``nvml_used - reserved``: the
    CUDA context, libraries' modules and handles). Zero or less: nothing fits."""
    return budget - max(nvml_used - reserved, 0)


def _dicts(rows: Iterable[Row | dict]) -> list[dict]:
    return [r if isinstance(r, dict) else asdict(r) for r in rows]


def max_batches(rows: Iterable[Row | dict], variants: Iterable[str]) -> dict[str, int]:
    """Largest batch that fitted per variant (0 when none did)."""
    rows = _dicts(rows)
    return {v: max((r["batch"] for r in rows if r["variant"] == v and r["fits"]), default=0)
            for v in variants}


def summary_line(max_batch: dict[str, int], budget_gib: float, *,
                 limit: int | None = None) -> str:
    """The largest batches, and each fast variant's over the best baseline's."""
    def show(v):
        b = max_batch[v]
        return f">={b} (search limit)" if limit is not None and b >= limit else str(b)
    text = (f"max batch within {budget_gib:g} GiB (NVML, the whole process): "
            + ", ".join(f"{v} {show(v)}" for v in max_batch))
    baselines = {v: b for v, b in max_batch.items() if v in BASELINES}
    fast = [v for v in max_batch if v not in BASELINES]
    if not baselines or not fast:
        return text
    best = max(baselines, key=baselines.get)
    if baselines[best]:
        text += f"; against the best baseline ({best} {baselines[best]}): " + ", ".join(
            f"{v} {max_batch[v] / baselines[best]:.2f}x" for v in fast)
    else:
        text += "; no baseline fits a batch: no ratio"
    return text


def status(row: dict) -> str:
    """yes; OOM (the capped allocator refused); over budget (NVML's figure above it)."""
    if row["fits"]:
        return "yes"
    return "OOM" if row["nvml_used_gib"] is None else "over budget"


def format_table(rows: Iterable[Row | dict]) -> str:
    rows = _dicts(rows)
    head = ("variant", "terms", "batch", "fits", "NVML used GiB", "alloc peak GiB", "ms/step")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [(r["variant"], r["terms"], str(r["batch"]), status(r),
              fmt(r["nvml_used_gib"]), fmt(r["allocator_peak_gib"]), fmt(r["ms_per_step"]))
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                      for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    return "\n".join(out)


def plot_rows(rows: Iterable[Row | dict], path: str | Path, *, budget_gib: float, device: str,
              resolution: int) -> Path:
    """PNG against batch size, one colour per variant: NVML's figure for the process (solid)
    and the allocator's peak (dotted) where the batch fits; an x where it does not (at NVML's
    figure when the step ran, at the budget when the allocator refused); the budget dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    rows = _dicts(rows)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for i, variant in enumerate(variants):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch"])
        ok = [r for r in mine if r["fits"]]
        ax.plot([r["batch"] for r in ok], [r["nvml_used_gib"] for r in ok], "o-",
                color=color, label=f"{variant} (NVML)")
        ax.plot([r["batch"] for r in ok], [r["allocator_peak_gib"] for r in ok], ":",
                color=color)
        over = [r for r in mine if not r["fits"]]
        if over:
            ax.plot([r["batch"] for r in over],
                    [budget_gib if r["nvml_used_gib"] is None else r["nvml_used_gib"]
                     for r in over], "x", color=color, markersize=10, markeredgewidth=2)
    ax.axhline(budget_gib, color="k", linestyle="--", linewidth=1,
               label=f"budget {budget_gib:g} GiB")
    batches = [r["batch"] for r in rows]
    if batches and max(batches) / max(min(batches), 1) >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:.0f}"))
    ax.set_xlabel("batch size (images per loss step)")
    ax.set_ylabel("GiB (solid: NVML, the process; dotted: allocator peak)")
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
    """What NVML says this process uses on the torch device's GPU.

    ``settle()``, once the process has its CUDA context, picks the figure: the process's own
    (``source = "process"``) when NVML lists this PID, else the card's whole used memory
    (``source = "device"``, an upper bound: in a container NVML lists host PIDs). ``note`` says
    which, or why NVML cannot be read.
    """

    def __init__(self, device: torch.device):
        self.handle, self.note, self.source, self._pynvml = None, None, None, None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._pynvml = pynvml
        except Exception as err:  # noqa: BLE001 - no library, no driver, ...
            self.note = f"NVML unavailable ({type(err).__name__}: {err})"
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
            self.note = f"NVML has no handle for {device} ({err})"

    def _process_bytes(self) -> int | None:
        try:
            processes = self._pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:  # noqa: BLE001 - not supported on this card or driver
            return None
        pid = os.getpid()
        return next((p.usedGpuMemory for p in processes
                     if p.pid == pid and p.usedGpuMemory is not None), None)

    def settle(self) -> None:
        """Choose the figure, once this process has created its CUDA context."""
        if self.handle is None:
            return
        if self._process_bytes() is not None:
            self.source = "process"
            self.note = "nvml_used_gib: NVML's figure for this process"
        else:
            self.source = "device"
            self.note = ("nvml_used_gib: the card's whole used memory (NVML does not list this "
                         "process's PID, as in a container): an upper bound of the process's")

    def used_bytes(self) -> int | None:
        if self.source == "process":
            return self._process_bytes()
        if self.source == "device":
            try:
                return int(self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            except Exception:  # noqa: BLE001
                return None
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


def measure_step(loss_fn, variant: str, terms: str, batch: int, resolution: int,
                 device: torch.device, nvml: NvmlReader, budget_gib: float) -> Row:
    """One forward + backward after a peak reset. It fits when it completes and NVML's figure
    for the process, read with the step's memory still held (and raised by any of the step's
    allocator peak released before the reading), is within the budget. An out-of-memory error
    gives ``fits=False`` with no figures, and every tensor of the failed step is released
    before returning."""
    row = Row(variant, terms, batch, False, None, None)
    hardware.reset_peak_memory(device)
    inputs = None
    oom = False
    try:
        with numerics(variant):
            inputs = harness.make_inputs(batch, resolution, device)
            harness.loss_step(loss_fn, *inputs)
        torch.cuda.synchronize(device)
        row.allocator_peak_gib = hardware.peak_memory_gib(device)
        used = nvml.used_bytes()  # inputs and their gradient are still alive
        released = torch.cuda.max_memory_reserved(device) - torch.cuda.memory_reserved(device)
        if used is not None:
            row.nvml_used_gib = (used + released) / GIB
            row.fits = row.nvml_used_gib <= budget_gib
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


def time_step(loss_fn, variant: str, batch: int, resolution: int, device: torch.device, *,
              warmup: int, repeats: int) -> float | None:
    """Median ms of a loss step at ``batch`` under the current cap; None if it ran out of
    memory this time (a batch at the edge can, as the allocator's cache fragments)."""
    inputs = None
    try:
        with numerics(variant):
            inputs = harness.make_inputs(batch, resolution, device)
            times = hardware.time_ms(lambda: harness.loss_step(loss_fn, *inputs), device,
                                     warmup=warmup, repeats=repeats)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        times = None
    del inputs
    _free(device)
    return statistics.median(times) if times else None


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


def _open_context(device: torch.device) -> None:
    """This process's CUDA context, before NVML is asked whether it lists the process."""
    torch.empty(1, device=device)
    torch.cuda.synchronize(device)


def device_copy(prior, device: torch.device):
    """A copy of the CPU prior on ``device``, for a variant that keeps its weights there."""
    return copy.deepcopy(prior).to(device)


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
    budget_gib = float(args.budget_gib)
    if not 0 < budget_gib * GIB <= total:
        _fail(f"diffloss-fast memory: --budget-gib {budget_gib:g} does not fit this card: "
              f"{hardware.device_name(device)} has {total / GIB:.2f} GiB in all "
              f"(give a budget between 0 and {total / GIB:.2f}).")

    notes: list[str] = []
    variants = []
    for variant in dict.fromkeys(canonical(v) for v in args.variants or DEFAULT_VARIANTS):
        why = unsupported(variant, device)
        if why:
            notes.append(f"{variant} not run: {why}")
        else:
            variants.append(variant)
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

    nvml = NvmlReader(device)
    _open_context(device)
    nvml.settle()
    if nvml.source is None:
        nvml.close()
        _fail(f"diffloss-fast memory: the budget counts what NVML reports the process uses, "
              f"and it cannot be read here: {nvml.note}. Nothing was run.")
    notes.append(nvml.note)
    print(f"device: {name} ({total / GIB:.2f} GiB); budget {budget_gib:g} GiB of NVML's figure "
          f"({nvml.source}), the allocator capped at the budget less what the process holds "
          f"outside it; baselines keep their prior on the device, the fast variants their "
          f"compute-dtype copy" + (" and the fp32 prior" if fast_prior == "device" else "")
          + f"; resolution {resolution}; terms {terms}; torch {torch.__version__}")
    print(nvml.note)

    rows: list[Row] = []
    outside: dict[str, float] = {}
    caps: dict[str, float] = {}
    precisions = {v: PRECISIONS.get(v) or resolve_precision(args.precision, device)
                  for v in variants}
    cpu_prior = harness.measurement_prior(weights, config, torch.device("cpu"), "memory")
    bar = tqdm(total=len(variants) * len(batches) if batches else None, desc="memory",
               unit="step")
    try:
        for variant in variants:
            baseline = _leftover_bytes(device, 0)
            torch.cuda.set_per_process_memory_fraction(1.0, device)  # uncapped while set up
            on_device = variant in BASELINES or fast_prior == "device"
            loss_fn = harness.make_loss(
                device_copy(cpu_prior, device) if on_device else cpu_prior,
                "fast" if variant == "fast-ckpt" else variant, terms,
                precision=precisions[variant], backend=backend,
                checkpoint=variant == "fast-ckpt")
            # the warm-up loads the libraries and kernels the variant's steps use, so that
            # what the process holds outside the allocator is known before the cap is set
            warm = measure_step(loss_fn, variant, terms, 1, resolution, device, nvml,
                                math.inf)
            used, reserved = nvml.used_bytes(), torch.cuda.memory_reserved(device)
            if not warm.fits or used is None:
                notes.append(f"{variant}: its warm-up step at batch 1 did not run on the whole "
                             f"card; nothing fits")
                cap = 0
            else:
                cap = allocator_cap_bytes(int(budget_gib * GIB), used, reserved)
                outside[variant] = (used - reserved) / GIB
            caps[variant] = cap / GIB
            torch.cuda.set_per_process_memory_fraction(max(cap, 0) / total, device)

            def fits(batch: int) -> bool:
                bar.set_postfix_str(f"{variant} b{batch}")
                row = measure_step(loss_fn, variant, terms, batch, resolution, device, nvml,
                                   budget_gib)
                rows.append(row)
                bar.update()
                return row.fits

            if batches:
                for b in batches:
                    fits(b)
            else:
                find_max_batch(fits, limit=limit)
            largest = max((r for r in rows if r.variant == variant and r.fits),
                          key=lambda r: r.batch, default=None)
            if largest is not None:
                largest.ms_per_step = time_step(loss_fn, variant, largest.batch, resolution,
                                                device, warmup=args.warmup,
                                                repeats=args.repeats)
                if largest.ms_per_step is None:
                    notes.append(f"{variant}: timing batch {largest.batch} ran out of memory "
                                 "under the cap")
            del loss_fn, fits  # with them the variant's weights on the device
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
    print(summary_line(best, budget_gib, limit=None if batches else limit))
    for note in notes:
        print("note: " + note)
    result = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "budget_gib": budget_gib,
        "rows": [asdict(r) for r in rows],
        "max_batch": best,
        "precisions": precisions,
        "nvml_source": nvml.source,
        "outside_allocator_gib": outside,  # context and libraries, after the warm-up
        "allocator_cap_gib": caps,
        "terms": terms,
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
        plot_rows(rows, args.plot, budget_gib=budget_gib, device=name, resolution=resolution)
        print(f"wrote {args.plot}")
    return result


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors in the prior options, before anything is built (``run`` refuses a machine
    without CUDA itself)."""
    check_prior(parser, args.prior, args.prior_config, args.checkpoint)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "memory", help="the largest batch within a memory budget, baselines and fast variants",
        description="Runs one loss step (forward + backward to the restored image) per batch "
                    "size within a budget of what NVML reports the process uses (24 GiB, an "
                    "RTX 4090, by default; the CUDA context, libraries and the weights each "
                    "variant keeps on the card count against it): torch's allocator is capped "
                    "at the budget less what the process holds outside it, and a batch fits "
                    "only if NVML then confirms it. Without --batch-sizes it doubles the batch "
                    "until the first that does not fit, then bisects to the largest that does, "
                    "and times that one. Needs a CUDA device and NVML.")
    add_measurement_arguments(p, device_help="cuda, cuda:1 (default: auto)",
                              prior_default="adm-256-uncond",
                              prior_default_text="default %(default)s", resolution_default=256)
    p.add_argument("--budget-gib", type=float, default=DEFAULT_BUDGET_GIB,
                   help="memory budget in GiB of NVML's figure for the process (default 24: "
                        "an RTX 4090); at most the card's memory")
    hidden_alias(p, "--cap-gib", "budget_gib", type=float)
    p.add_argument("--variants", nargs="+", type=canonical, choices=VARIANTS,
                   default=list(DEFAULT_VARIANTS),
                   help="baselines (reference-tf32 holds what reference-fp32 holds) and fast "
                        "variants: fast, PyTorch's norms; fast-fused, the fused norm kernels; "
                        "fast-ckpt, fast with activation checkpointing of the restored branch "
                        f"(default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--terms", default="both", choices=tuple(harness.TERMS))
    p.add_argument("--fast-prior", default="cpu", choices=("cpu", "device"),
                   help="where the fast variants' fp32 prior lives: on the CPU (DiffLoss then "
                        "puts only its compute-dtype copy on the device; the default, the lean "
                        "way to run) or on the device too (default: %(default)s)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None,
                   help="measure exactly these batch sizes instead of searching")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH,
                   help="upper limit of the search (default 1024)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before timing each variant's largest batch (default 2)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed steps at each variant's largest batch (default 10)")
    p.add_argument("--json", default=None, help="write the rows and max batches to this file")
    p.add_argument("--plot", default=None, help="write a PNG plot of memory per batch")
    p.set_defaults(func=run, check=check)
