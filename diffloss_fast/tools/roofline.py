"""``diffloss-fast roofline``: the least time a loss step can take on a card, and what bounds it.

One loss step's prior work (the ground-truth forward without autograd, the restored forward,
its backward to the input) of exactly the network DiffLoss runs is traced on the meta device:
no weights, no GPU, ADM-256 in seconds. Each ATen op gets its FLOPs (torch.utils.flop_counter's
formulas: the count MFU divides) and the bytes it must move (its tensor inputs read once, its
outputs written once; views move nothing). Attention is one fused kernel each way, as SDPA runs
on CUDA (FlashAttention: q, k, v in, o out; the T x T scores never reach memory).

An op takes at least max(FLOPs / peak, bytes / bandwidth). Summed three ways:

- ``eager``: every op is a pass over memory, as the eager step's kernels are;
- ``fused``: only convolutions, matmuls and attention cost; the norms, activations, casts and
  concatenations ride in their prologues and epilogues, except that each GroupNorm still reads
  its input (and, backward, its gradient) once for its statistics;
- ``fused-fp8``: ``fused`` with each forward convolution's operands in e4m3 (one byte each,
  the output still two) at the card's FP8 rate, as ``precision="fp8"`` plans to run them;
  the input-gradient convolutions stay bf16. Only for cards with FP8 (sm_89 and later);
- ``compute``: FLOPs / peak, i.e. 100% MFU (at the bf16 rate).

``compute / floor`` is the MFU ceiling of a scenario: no kernel can beat it. The eager step's
own launches (and the CPU time to issue them) are not in the floors; their count is reported.

The same trace counts the activations the restored branch keeps for its backward pass (the
part of peak memory that grows with the batch), and ``--time-convolutions`` runs the step's
convolutions on a device one by one (:mod:`diffloss_fast.tools.conv_replay`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections import defaultdict
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from ..loss import _DTYPES, DiffLoss
from ..prior import prior_architecture
from . import conv_replay, hardware
from .hardware import CARDS, Card, card_for
from .harness import (ACTIVATION_CHECKPOINTING_HELP, add_prior_arguments, categorize,
                      check_device, check_prior, hidden_alias, positive_int, prior_source,
                      write_json)

aten = torch.ops.aten
COMPUTE_CATEGORIES = ("convolution", "matmul", "attention")
SCENARIOS = ("eager", "fused", "fused-fp8", "compute")
# Ops that allocate or alias without touching memory (views are found by their schema).
_FREE_OPS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
             aten.new_empty_strided, aten._unsafe_view, aten.alias, aten.lift_fresh}


@dataclass(frozen=True)
class Op:
    """One kernel's worth of work: what it computes and what it must move."""
    name: str
    category: str
    flops: int
    bytes: int
    stat_bytes: int = 0  # GroupNorm: the activations its statistics must read even when fused
    written: int = 0  # of bytes, those its outputs take
    input_gradient: bool = False  # a convolution computing an input's gradient (dgrad)
    call: tuple | None = None  # convolutions: (ATen op, frozen arguments), to replay on a device


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    seen, out = set(), []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


def aten_op(func, args, kwargs, out) -> Op | None:
    """The Op of one ATen call, or None for views and allocations, which move no data."""
    if func.is_view or func._overloadpacket in _FREE_OPS:
        return None
    reads = list(args)
    if func._overloadpacket is aten.convolution_backward and not args[10][1]:
        reads[1] = None  # without a weight gradient the forward input is never read
    written = sum(_nbytes(t) for t in _tensors(out))
    moved = sum(_nbytes(t) for t in _tensors((reads, kwargs))) + written
    formula = flop_registry.get(func._overloadpacket)
    flops = formula(*args, **kwargs, out_val=out) if formula else 0
    name = func._schema.name
    category = categorize(name)
    stat = sum(_nbytes(t) for t in _tensors(args) if t.dim() == 4) if category == "norm" else 0
    call = (func, conv_replay.freeze(args)) if category == "convolution" and not kwargs else None
    # a frozen convolution's input gradient runs as a transposed convolution
    dgrad = category == "convolution" and (func._overloadpacket is aten.convolution_backward
                                           or (func._overloadpacket is aten.convolution
                                               and bool(args[6])))
    return Op(name, category, int(flops), moved, stat, written=written, call=call,
              input_gradient=dgrad)


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list[Op]):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = aten_op(func, args, kwargs, out)
        if op is not None:
            self.ops.append(op)
        return out


def _fused_attention(ops: list[Op]):
    """``F.scaled_dot_product_attention`` as one recorded kernel forward and one backward."""
    def moved(*tensors):
        return sum(_nbytes(t) for t in tensors)

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            b, heads, tokens, dim = q.shape
            # laid out as FlashAttention returns it: (b, T, heads, d), seen as (b, heads, T, d)
            o = q.new_empty((b, tokens, heads, v.shape[-1])).transpose(1, 2)
            ctx.save_for_backward(q, k, v, o)
            ops.append(Op("attention (fused forward)", "attention",
                          sdpa_flop_count(q.shape, k.shape, v.shape), moved(q, k, v, o)))
            return o

        @staticmethod
        def backward(ctx, grad):
            q, k, v, o = ctx.saved_tensors
            grads = tuple(torch.empty_like(x) for x in (q, k, v))
            ops.append(Op("attention (fused backward)", "attention",
                          sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape),
                          moved(q, k, v, o, grad, *grads)))
            return grads

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs:
            raise NotImplementedError("roofline: plain attention only")
        return FusedAttention.apply(q, k, v)
    return attention


def _fused_norm_silu(ops: list[Op]):
    """``group_norm_silu_triton`` as its kernels move memory: forward, x read twice (statistics,
    then output) and y written; backward, x and dy read twice and dx written, and with
    ``pass_x`` the passed-on x's gradient read once (autograd's add of the two is gone)."""
    class FusedNormSiLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, num_groups, weight, bias, eps, scale=None, shift=None,
                    x_bias=None, pass_x=False, silu=True):
            ctx.save_for_backward(x)  # all the kernels keep, with two floats per group
            ctx.set_materialize_grads(False)
            ops.append(Op("group_norm_silu (fused forward)", "norm", 0, 3 * _nbytes(x),
                          _nbytes(x)))
            y = torch.empty_like(x)
            return (y, x) if pass_x else y

        @staticmethod
        def backward(ctx, dy, dp=None):
            (x,) = ctx.saved_tensors
            if dy is None:
                return (dp,) + (None,) * 9
            ops.append(Op("group_norm_silu (fused backward)", "norm", 0,
                          (5 + (dp is not None)) * _nbytes(x), 2 * _nbytes(x)))
            return (torch.empty_like(x),) + (None,) * 9
    return FusedNormSiLU.apply


def _fused_residual(ops: list[Op]):
    """``residual_bias_add_triton`` as its kernel moves memory: x and y read, the sum written;
    its backward hands the gradient on and runs no kernel."""
    class FusedResidual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, bias):
            ops.append(Op("residual_bias_add (fused)", "elementwise", 0, 3 * _nbytes(x)))
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):
            return grad, grad, None
    return FusedResidual.apply


def _traced_network(config, terms: str, precision: str, checkpoint: bool, fused_norm: bool,
                    ops: list[Op]):
    """The network DiffLoss runs for these options, on the meta device, as two passes (the
    difference path does the same convolution and attention work, with its pair ops in place
    of the norms); with ``fused_norm`` its Triton kernels (norms, residual sums) record their
    traffic into ``ops``."""
    natural = terms in ("both", "natural")
    loss_fn = DiffLoss(prior_architecture(config), natural_weight=float(natural),
                       semantic_weight=float(terms in ("both", "semantic")),
                       precision=precision, checkpoint=checkpoint, fused_kernels=False,
                       propagation="two-pass")
    net = loss_fn._net(torch.device("meta"), _DTYPES[precision], decoder=natural)
    if fused_norm:
        # the plan's PyTorch resampling moves what the resampling kernels move: x read, the
        # result written; the norms and residual sums record their kernels' traffic
        net.plan = dataclasses.replace(net.plan, fused=True, norm_silu=_fused_norm_silu(ops),
                                       residual_bias_add=_fused_residual(ops))
    return net


def _inputs(batch: int, resolution: int, precision: str):
    """The two noised images (the restored one differentiable) and the timesteps."""
    shape, dtype = (batch, 3, resolution, resolution), _DTYPES[precision]
    return (torch.empty(shape, device="meta", dtype=dtype),
            torch.empty(shape, device="meta", dtype=dtype, requires_grad=True),
            torch.zeros(batch, dtype=torch.long, device="meta"))


def _outputs(terms: str, eps, h) -> list[torch.Tensor]:
    return [y for y, want in ((eps, terms in ("both", "natural")),
                              (h, terms in ("both", "semantic"))) if want]


def trace_step(config: str = "adm-256-uncond", *, terms: str = "both", batch: int = 8,
               resolution: int = 256, precision: str = "bf16", fused_norm: bool = False,
               checkpoint: bool = False) -> list[Op]:
    """The ops of one loss step's prior work, in execution order, on the meta device;
    ``fused_norm``, ``checkpoint``: as DiffLoss runs it with those options."""
    ops: list[Op] = []
    net = _traced_network(config, terms, precision, checkpoint, fused_norm, ops)
    x_gt, x_res, t = _inputs(batch, resolution, precision)
    with _Recorder(ops), mock.patch.object(F, "scaled_dot_product_attention",
                                           _fused_attention(ops)):
        with torch.no_grad():
            net(x_gt, t)
        wanted = _outputs(terms, *net(x_res, t))
        torch.autograd.backward(wanted, [torch.empty_like(y) for y in wanted])
    return ops


def saved_activation_bytes(config: str = "adm-256-uncond", *, terms: str = "both",
                           batch: int = 8, resolution: int = 256, precision: str = "bf16",
                           fused_norm: bool = False, checkpoint: bool = False) -> int:
    """Bytes the restored branch's forward keeps for its backward pass (each storage once):
    the part of a step's peak memory that grows with the batch."""
    net = _traced_network(config, terms, precision, checkpoint, fused_norm, [])
    x_gt, x_res, t = _inputs(batch, resolution, precision)
    weights = {p.untyped_storage()._cdata for p in net.parameters()}  # resident anyway
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with mock.patch.object(F, "scaled_dot_product_attention", _fused_attention([])):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            net(x_res, t)
    return sum(storages.values())


def _fp8_forward(op: Op) -> bool:
    return op.category == "convolution" and not op.input_gradient


def floors_ms(ops: list[Op], card: Card) -> dict[str, float]:
    """The least time of the traced work in each scenario, milliseconds (``fused-fp8`` only
    for a card with an FP8 rate)."""
    peak, bandwidth = card.peak_tflops * 1e12, card.bandwidth_tbs * 1e12

    def roof(flops, moved, rate=peak):
        return max(flops / rate, moved / bandwidth) * 1e3

    def fused(op: Op) -> float:
        if op.category in COMPUTE_CATEGORIES:
            return roof(op.flops, op.bytes)
        return roof(0, op.stat_bytes)

    floors = {"eager": sum(roof(op.flops, op.bytes) for op in ops),
              "fused": sum(fused(op) for op in ops)}
    if card.fp8_peak_tflops:
        fp8 = card.fp8_peak_tflops * 1e12
        # e4m3 operands are half the bytes of bf16 ones; the output stays 16-bit
        floors["fused-fp8"] = sum(
            roof(op.flops, (op.bytes - op.written) / 2 + op.written, fp8) if _fp8_forward(op)
            else fused(op) for op in ops)
    floors["compute"] = sum(op.flops for op in ops) / peak * 1e3
    return floors


def by_category(ops: list[Op], card: Card) -> list[dict]:
    """FLOPs, bytes, eager and fused floors and op count per category, largest floor first."""
    groups: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        groups[op.category].append(op)
    rows = []
    for category, group in groups.items():
        floors = floors_ms(group, card)
        rows.append({"category": category, "ops": len(group),
                     "gflop": sum(o.flops for o in group) / 1e9,
                     "gib": sum(o.bytes for o in group) / 2 ** 30,
                     "eager_ms": floors["eager"], "fused_ms": floors["fused"]})
    return sorted(rows, key=lambda r: -r["eager_ms"])


def analyse(ops: list[Op], card: Card) -> dict:
    floors = floors_ms(ops, card)
    return {"tflop": sum(op.flops for op in ops) / 1e12, "ops": len(ops),
            "floors_ms": floors,
            # MFU is against the bf16 peak: not defined for a scenario at the FP8 rate
            "mfu_ceiling": {s: floors["compute"] / ms for s, ms in floors.items()
                            if s != "fused-fp8"},
            "categories": by_category(ops, card)}


def format_analysis(terms: str, a: dict) -> str:
    lines = [f"{terms}: {a['tflop']:.2f} TFLOP in {a['ops']} ops; the backward keeps "
             f"{a['saved_gib_per_image']:.2f} GiB of activations per image",
             f"  {'scenario':<10}{'floor ms':>10}{'MFU ceiling':>13}"]
    for s in SCENARIOS:
        if s in a["floors_ms"]:
            mfu = a["mfu_ceiling"].get(s)
            lines.append(f"  {s:<10}{a['floors_ms'][s]:>10.1f}"
                         + (f"{mfu:>13.1%}" if mfu is not None else f"{'(fp8 rate)':>13}"))
    lines += ["", f"  {'category':<16}{'ops':>6}{'GFLOP':>10}{'GiB moved':>11}{'eager ms':>10}"]
    lines += [f"  {r['category']:<16}{r['ops']:>6}{r['gflop']:>10.0f}{r['gib']:>11.2f}"
              f"{r['eager_ms']:>10.2f}" for r in a["categories"]]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """PNG: per terms, the eager and fused floors stacked by kind of op, and 100% MFU."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    analyses = result["terms"]
    fig = Figure(figsize=(8, 1.2 + 1.3 * len(analyses)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    categories = list(dict.fromkeys(c["category"] for a in analyses.values()
                                    for c in a["categories"]))
    colors = {c: f"C{i}" for i, c in enumerate(categories)}
    labels, y = [], 0
    for terms, a in analyses.items():
        for scenario in ("eager", "fused"):
            left = 0.0
            for c in a["categories"]:
                ms = c[f"{scenario}_ms"]
                ax.barh(y, ms, left=left, color=colors[c["category"]])
                left += ms
            labels.append(f"{terms}: {scenario} ({a['mfu_ceiling'][scenario]:.0%} MFU)")
            y += 1
        ax.barh(y, a["floors_ms"]["compute"], color="0.6")
        labels.append(f"{terms}: 100% MFU")
        y += 1.5
    ax.set_yticks([i + 0.5 * (i // 3) for i in range(len(labels))], labels, fontsize=8)
    ax.invert_yaxis()
    for c in categories:
        ax.barh(0, 0, color=colors[c], label=c)
    ax.legend(fontsize=7, loc="lower right")
    card = result["card"]
    ax.set_xlabel(f"least ms per loss step at {card['peak_tflops']:g} TFLOP/s and "
                  f"{card['bandwidth_tbs']:g} TB/s")
    ax.set_title(f"{result['prior']}, batch {result['batch']} at {result['resolution']}x"
                 f"{result['resolution']}, {card['name']}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def _card(args, device: torch.device | None) -> Card:
    """--card, else the device being timed if it is a known card, else an RTX 4090; a
    device being timed brings its measured matmul rate unless --peak-tflops is given."""
    if args.card:
        card = CARDS[args.card]
    else:
        timed = card_for(hardware.device_name(device)) if device is not None else None
        card = timed or CARDS["rtx-4090"]
    peak = args.peak_tflops
    if peak is None and device is not None and device.type == "cuda":
        peak = hardware.matmul_peak_tflops(device)
        print(f"measured {args.precision} matmul rate: {peak:.1f} TFLOP/s")
    return Card(card.name, peak or card.peak_tflops, args.bandwidth_tbs or card.bandwidth_tbs,
                card.fp8_peak_tflops)


def time_convolutions(ops: list[Op], card: Card, device: torch.device, *,
                      channels_last: bool = False) -> dict:
    """The traced convolutions run one distinct call at a time on ``device``, against their
    floor: their own rate, apart from everything around them."""
    convs = [op for op in ops if op.call is not None]
    rows = conv_replay.time_calls([op.call for op in convs], {op.call: op.flops for op in convs},
                             device, channels_last=channels_last)
    tflops = sum(op.flops for op in convs) / sum(r["total_ms"] for r in rows) / 1e9
    return {"device": hardware.device_name(device), "channels_last": channels_last,
            "ops": len(convs), "distinct": len(rows),
            "measured_ms": sum(r["total_ms"] for r in rows),
            "floor_ms": floors_ms(convs, card)["eager"], "tflops": tflops,
            # the peak is the device's own only where it was measured there
            "of_peak": tflops / card.peak_tflops if device.type == "cuda" else None,
            "calls": rows}


def format_convolutions(t: dict) -> str:
    of_peak = f", {t['of_peak']:.0%} of the matmul rate" if t["of_peak"] is not None else ""
    layout = "channels_last" if t["channels_last"] else "NCHW"
    lines = [f"  convolutions alone ({layout}) on {t['device']}: {t['measured_ms']:.1f} ms "
             f"({t['ops']} ops, {t['distinct']} distinct) against a {t['floor_ms']:.1f} ms floor: "
             f"{t['tflops']:.3g} TFLOP/s{of_peak}",
             f"  {'count':>7}{'ms each':>10}{'TFLOP/s':>9}  call"]
    lines += [f"  {r['count']:>7}{r['ms']:>10.3f}{r['tflops']:>9.3g}  {r['call']}"
              for r in t["calls"][:12]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    device = hardware.resolve_device(args.device) if args.time_convolutions else None
    if device is not None:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    card = _card(args, device)
    _, config = prior_source(args.prior, args.prior_config)  # the weights are never read
    how = "".join((", fused norms" if args.fused_norm else "",
                   ", activation checkpointing" if args.activation_checkpointing else ""))
    print(f"{config}, batch {args.batch} at {args.resolution}x{args.resolution}, "
          f"{args.precision}{how}, on {card.name}: {card.peak_tflops:g} TFLOP/s, "
          f"{card.bandwidth_tbs:g} TB/s")
    result = {"computed": "floors from the roofline model, not measured; a 'convolutions' entry "
                          "holds timings made on the device it names",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "prior": config, "batch": args.batch, "resolution": args.resolution,
              "precision": args.precision, "fused_norm": args.fused_norm,
              "activation_checkpointing": args.activation_checkpointing,
              "card": asdict(card), "terms": {}}
    if device is not None:
        result["cudnn_benchmark"] = args.cudnn_benchmark
    for terms in args.terms:
        options = dict(terms=terms, batch=args.batch, resolution=args.resolution,
                       precision=args.precision, fused_norm=args.fused_norm,
                       checkpoint=args.activation_checkpointing)
        ops = trace_step(config, **options)
        analysis = result["terms"][terms] = analyse(ops, card)
        analysis["saved_gib_per_image"] = (saved_activation_bytes(config, **options)
                                           / args.batch / 2 ** 30)
        print("\n" + format_analysis(terms, analysis))
        if device is not None:
            analysis["convolutions"] = time_convolutions(ops, card, device,
                                                         channels_last=args.channels_last)
            print(format_convolutions(analysis["convolutions"]))
    if {"both", "semantic"} <= set(result["terms"]):
        both, sem = result["terms"]["both"], result["terms"]["semantic"]
        result["semantic_speedup_bound"] = {s: both["floors_ms"][s] / sem["floors_ms"][s]
                                            for s in SCENARIOS if s in both["floors_ms"]}
        print("\nsemantic only vs both terms, ratio of floors: " + ", ".join(
            f"{s} {r:.2f}x" for s, r in result["semantic_speedup_bound"].items()))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)
    return result


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors in the prior options, and a --time-convolutions device this machine lacks,
    before anything is traced."""
    check_prior(parser, args.prior, args.prior_config)
    if args.time_convolutions:
        check_device(parser, args.device)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "roofline", help="the least time a loss step can take on a card (no GPU needed)",
        description="Traces one loss step of the network DiffLoss runs on the meta device "
                    "and bounds its time on a card by FLOPs / peak and bytes / bandwidth, "
                    "with every op a pass over memory (eager), with the elementwise work "
                    "fused into the convolutions (fused), and at 100% MFU (compute).")
    add_prior_arguments(p, default="adm-256-uncond",
                        default_text="only its architecture is traced (default %(default)s)",
                        legacy_weights=False)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--resolution", type=positive_int, default=256)
    p.add_argument("--precision", default="bf16", choices=tuple(_DTYPES))
    p.add_argument("--terms", nargs="+", default=["both", "semantic"],
                   choices=("both", "semantic", "natural"))
    p.add_argument("--fused-norm", action="store_true",
                   help="trace the step as DiffLoss(fused_norm=True) runs it")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="trace the step as DiffLoss(checkpoint=True) runs it: "
                        + ACTIVATION_CHECKPOINTING_HELP)
    hidden_alias(p, "--checkpoint", "activation_checkpointing", action="store_true")
    p.add_argument("--card", default=None, choices=tuple(CARDS),
                   help="spec-sheet peak and bandwidth (default: the device timed, if known, "
                        "else rtx-4090)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the card's peak, e.g. with the matmul rate bench measured")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="override the card's memory bandwidth, TB/s")
    p.add_argument("--time-convolutions", action="store_true",
                   help="also run each distinct convolution of the step on --device, timed "
                        "alone (on CUDA, against the matmul rate measured there)")
    p.add_argument("--device", default="auto", help="for --time-convolutions: cuda, cpu, auto")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="for --time-convolutions: let cuDNN time its algorithms per shape")
    p.add_argument("--channels-last", action="store_true",
                   help="for --time-convolutions: channels_last activations and weights")
    p.add_argument("--json", default=None, help="write the analysis to this JSON file")
    p.add_argument("--plot", default=None, help="draw the floors, by kind of op, to this PNG")
    p.set_defaults(func=run, check=check)
