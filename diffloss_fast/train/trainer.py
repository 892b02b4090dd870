"""The training loop: a restoration network trained on a pixel loss plus DiffLoss.

One process, or one per device under torchrun. DistributedDataParallel wraps the restoration
network only: the frozen prior inside DiffLoss is replicated in every process, never wrapped
(it has no gradients to synchronise, and DDP refuses a module without trainable parameters).

Each micro-batch runs one ordinary backward of pixel + DiffLoss; ``loss_fn.timings()`` times
DiffLoss's share of it (``ms_diffloss``). The pixel loss and DiffLoss each read the network's
output through their own view of it, whose gradient hook gives that loss's gradient with
respect to the restored images: ``grad_ratio`` (the DiffLoss gradient's norm over the pixel
loss's) comes out of the same backward, with no second pass through the prior.

Each step's entry in metrics.json holds ``loss``, ``pixel``, ``diffloss`` (weighted),
``natural`` and ``semantic`` (DiffLoss's terms before weighting; None for a weight of 0),
``grad_ratio``, ``lr`` (the LR of this step's update), ``ms_restoration`` and ``ms_diffloss``.

The LR schedule is a function of the step and of the current arguments. A run resumed with a
larger ``--max-steps`` follows, from the resumed step on, the schedule of a run started with
that ``--max-steps``: under cosine, the LR moves up to the longer curve's value at that step
(from the floor, for a run that had finished: a warm restart), then decays to ``--min-lr`` at
the new ``--max-steps``.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import diffloss_fast as dl

from . import distributed, report, sources
from .checkpoint import read_checkpoint, save_checkpoint
from .metrics import psnr_ssim
from .nets import build_net, parse_kwargs, restore, size_multiple
from .sampling import SeededSampler, derive_seed

PIXEL_LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss}
GRID_IMAGES = 4


def build_diffloss(args, say):
    """The DiffLoss module of this run, or None for ``--no-diffloss``."""
    if args.no_diffloss:
        return None
    if args.natural_weight == 0 and args.semantic_weight == 0:
        raise ValueError("--natural-weight and --semantic-weight are both 0: use --no-diffloss")
    if not args.prior:
        raise ValueError("DiffLoss needs a prior: --prior PATH (e.g. guided-diffusion's "
                         "256x256_diffusion_uncond.pt), --prior tiny (random weights, for a "
                         "quick check), or --no-diffloss for the pixel-loss baseline")
    if args.prior == "tiny":
        prior = dl.build_prior("tiny", seed=0)
        say("prior: the 'tiny' preset with RANDOM weights (--prior tiny): it exercises the "
            "whole pipeline quickly, but its DiffLoss carries no knowledge of natural images")
    else:
        config = args.prior_config
        if config and config.lstrip().startswith("{"):
            config = json.loads(config)
        prior = dl.load_prior(args.prior, config=config)
        say(f"prior: {args.prior} ({args.prior_config or 'adm-256-uncond'})")
    # the targets come from the data loader in [0, 1], and the network's output is whatever
    # training makes it: no range check on either
    return dl.DiffLoss(prior, natural_weight=args.natural_weight,
                       semantic_weight=args.semantic_weight, target=args.target,
                       precision=args.precision, backend=args.backend, compile=args.compile,
                       check_range=False,
                       checkpoint=args.activation_checkpointing)


def lr_factor(args):
    """The LR multiplier after ``step`` optimizer steps: linear warm-up, then cosine decay to
    ``min_lr`` at ``max_steps`` or a step decay by ``lr_gamma`` every ``lr_step`` steps.
    It reads the arguments of the current run, so a resumed run follows its own schedule."""
    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.schedule == "cosine":
            progress = min(1.0, (step - args.warmup_steps)
                           / max(1, args.max_steps - args.warmup_steps))
            floor = args.min_lr / args.lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return args.lr_gamma ** (step // (args.lr_step or max(1, args.max_steps // 4)))
    return factor


def train(args) -> dict:
    """Run ``diffloss-fast train`` with parsed arguments; returns what metrics.json holds."""
    ctx = distributed.setup(args.device)
    try:
        return Trainer(args, ctx).run()
    finally:
        distributed.teardown(ctx)


def _branch(out: torch.Tensor, sums: dict, key: str) -> torch.Tensor:
    """``out`` as a view of its own: the squared norm of the gradient that reaches it in the
    backward pass (one loss's gradient with respect to the restored images) is added to
    ``sums[key]``."""
    view = out.view_as(out)
    view.register_hook(
        lambda grad: sums.__setitem__(key, sums[key] + grad.double().square().sum()))
    return view


def check_patch_size(args, net, loss_fn) -> None:
    """Training crops must suit the prior's downsampling and the network's own."""
    for multiple, what in ((dl.downsampling_factor(loss_fn.prior) if loss_fn else 1,
                            "the prior's downsampling factor"),
                           (getattr(net, "size_multiple", 1), f"what --net {args.net} needs")):
        if args.patch_size % multiple:
            raise ValueError(f"--patch-size {args.patch_size} must be a multiple of {multiple}, "
                             f"{what}")


class Trainer:
    """One training run. Everything is built, and all data checked, before the first step, so
    that bad arguments or files fail in seconds rather than hours in."""

    def __init__(self, args, ctx: distributed.Context):
        self.args, self.ctx, self.out = args, ctx, Path(args.out)
        device = ctx.device
        self.say(f"device: {device}" + (f", {ctx.world} processes" if ctx.world > 1 else ""))
        torch.manual_seed(args.seed)
        self.net_spec = {"net": args.net, "kwargs": parse_kwargs(args.net_kwargs)}
        self.net = build_net(args.net, self.net_spec["kwargs"]).to(device)
        # the prior stays on the CPU: DiffLoss builds its compute-dtype copy on the images'
        # device, so the fp32 weights never take GPU memory
        self.loss_fn = build_diffloss(args, self.say)
        check_patch_size(args, self.net, self.loss_fn)
        self.pad_multiple = args.pad_multiple or size_multiple(self.net)
        self.data = sources.select(args, patch_size=args.patch_size)
        self.say(f"data: {self.data.note}")

        self.amp = args.amp and device.type == "cuda"
        if args.amp and not self.amp:
            self.say("--amp is for CUDA devices: training in fp32 on the CPU")
        self.amp_dtype = (torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported()
                          else torch.float16)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=self.amp and self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=args.lr,
                                           weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(args))
        self.step, self.history, self.val, self.val_history = 0, [], None, []
        if args.resume:
            self._resume(args.resume)

        self.model = (DistributedDataParallel(self.net, device_ids=[device.index]
                                              if device.type == "cuda" else None)
                      if ctx.world > 1 else self.net)
        sampler = SeededSampler(self.data.train, seed=args.seed, rank=ctx.rank, world=ctx.world,
                                start=self.step * args.accum_steps * args.batch_size)
        self.loader = DataLoader(self.data.train, batch_size=args.batch_size, sampler=sampler,
                                 num_workers=args.workers, pin_memory=device.type == "cuda",
                                 drop_last=True)

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)

    def _resume(self, path: str) -> None:
        if path == "latest":
            found = sorted((self.out / "checkpoints").glob("step_*.safetensors"))
            if not found:
                raise FileNotFoundError(f"--resume latest: no checkpoint in {self.out}/checkpoints")
            path = found[-1]
        ck = read_checkpoint(path)
        if ck["net"] != self.net_spec:
            raise ValueError(f"--resume {path}: the checkpoint holds {ck['net']}, this run builds "
                             f"{self.net_spec} (--net/--net-kwargs)")
        self.net.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.step = ck["step"]
        # LambdaLR restores the LR the checkpoint's schedule had set for the next step; the
        # schedule is this run's (its --max-steps may be larger)
        self.scheduler.base_lrs = [self.args.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = self.args.lr * self.scheduler.lr_lambdas[0](self.step)
        if self.scaler.is_enabled() and ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        previous = self.out / "metrics.json"
        if previous.is_file():
            old = json.loads(previous.read_text())
            self.history = [e for e in old.get("train", []) if e["step"] <= self.step]
            self.val_history = [e for e in old.get("val_history", []) if e["step"] <= self.step]
            self.val = ({k: self.val_history[-1][k] for k in ("psnr", "ssim")}
                        if self.val_history else None)
        self.say(f"resumed from {path} at step {self.step}")

    def _clock(self) -> float:
        """Wall-clock seconds once the device has finished the work queued so far."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def _train_step(self, batches) -> dict:
        args, device, accum = self.args, self.ctx.device, self.args.accum_steps
        pixel_fn = PIXEL_LOSSES[args.pixel_loss]
        use_diff = self.loss_fn is not None
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = {key: zero for key in ("pixel", "diffloss", "natural", "semantic",
                                      "grad_pixel", "grad_diffloss")}
        seconds = 0.0
        with self.loss_fn.timings() if use_diff else contextlib.nullcontext() as timer:
            for micro in range(accum):
                inp, tgt = (x.to(device, non_blocking=True) for x in next(batches))
                start = self._clock()
                no_sync = (self.model.no_sync() if self.ctx.world > 1 and micro < accum - 1
                           else contextlib.nullcontext())
                with no_sync:
                    with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp):
                        out = self.model(inp)
                    out = out.float()
                    pixel = pixel_fn(_branch(out, sums, "grad_pixel"), tgt)
                    loss = pixel
                    if use_diff:
                        gen = torch.Generator(device).manual_seed(
                            derive_seed(args.seed, self.step + 1, micro, self.ctx.rank))
                        diff = self.loss_fn(_branch(out, sums, "grad_diffloss"), tgt,
                                            generator=gen)
                        loss = pixel + diff
                        sums["diffloss"] = sums["diffloss"] + diff.detach()
                        for key, term in self.loss_fn.last_terms.items():
                            if term is not None:
                                sums[key] = sums[key] + term
                    self.scaler.scale(loss / accum).backward()
                sums["pixel"] = sums["pixel"] + pixel.detach()
                seconds += self._clock() - start
        start = self._clock()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ms_total = 1000 * (seconds + self._clock() - start)
        ms_diff = timer.forward_ms + timer.backward_ms if use_diff else 0.0
        self.step += 1
        mean = dict(zip(sums, self.ctx.mean((torch.stack(list(sums.values())) / accum).tolist())))
        # both gradients carry the same loss scale; an fp16 step whose gradients overflowed
        # (skipped by the GradScaler) has no ratio
        grads = mean["grad_diffloss"], mean["grad_pixel"]
        ratio = (math.sqrt(grads[0] / grads[1])
                 if use_diff and all(map(math.isfinite, grads)) and grads[1] > 0 else None)
        terms = self.loss_fn.last_terms if use_diff else {}
        return {"step": self.step, "loss": mean["pixel"] + mean["diffloss"],
                "pixel": mean["pixel"], "diffloss": mean["diffloss"] if use_diff else None,
                **{key: mean[key] if terms.get(key) is not None else None
                   for key in ("natural", "semantic")},
                "grad_ratio": ratio, "lr": lr, "ms_restoration": round(ms_total - ms_diff, 3),
                "ms_diffloss": round(ms_diff, 3) if use_diff else None}

    @torch.no_grad()
    def _validate(self) -> None:
        """PSNR/SSIM over the validation set and a grid of the first images (main process)."""
        if self.ctx.is_main:
            self.net.eval()
            scores, rows = [], []
            for i in range(len(self.data.val)):
                inp, tgt = self.data.val[i]
                with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp):
                    out = restore(self.net, inp[None].to(self.ctx.device), self.pad_multiple)
                out = out[0].float().clamp(0, 1).cpu()
                scores.append(psnr_ssim(out, tgt, self.data.channel))
                if i < GRID_IMAGES:
                    rows.append([inp, out, tgt])
            psnr = sum(s[0] for s in scores) / len(scores)
            ssim = sum(s[1] for s in scores) / len(scores)
            self.val = {"psnr": psnr, "ssim": ssim}
            self.val_history.append({"step": self.step, **self.val})
            report.save_grid(self.out / "val" / f"step_{self.step:07d}.png", rows)
            self.say(f"step {self.step}: val PSNR {psnr:.2f} dB, SSIM {ssim:.4f} "
                     f"({self.data.channel.upper()}, {len(scores)} images)")
        self.ctx.barrier()

    def _save(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.out / "checkpoints" / f"step_{self.step:07d}.safetensors",
                            step=self.step, net=self.net, net_spec=self.net_spec,
                            optimizer=self.optimizer, scheduler=self.scheduler,
                            scaler=self.scaler)

    def metrics(self) -> dict:
        config = {k: v for k, v in vars(self.args).items() if not callable(v)}
        return {"train": self.history, "val": self.val, "val_history": self.val_history,
                "metric_channel": self.data.channel, "config": config}

    def _write_report(self) -> None:
        if self.ctx.is_main:
            report.write_json(self.out / "metrics.json", self.metrics())
            if self.history:
                report.plot_losses(self.out / "loss.png", self.history, self.val_history)

    def run(self) -> dict:
        args = self.args
        bar = tqdm(total=args.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not self.ctx.is_main)
        batches = iter(self.loader)
        while self.step < args.max_steps:
            entry = self._train_step(batches)
            self.history.append(entry)
            bar.update(1)
            bar.set_postfix({k: f"{entry[k]:.4g}" for k in ("loss", "pixel", "diffloss")
                             if entry[k] is not None})
            final = self.step == args.max_steps
            validate = final or (args.val_every and self.step % args.val_every == 0)
            save = final or (args.save_every and self.step % args.save_every == 0)
            if validate:
                self._validate()
            if save:
                self._save()
            if validate or save:
                self._write_report()
        bar.close()
        self.say(f"done at step {self.step}: {self.out / 'metrics.json'}, "
                 f"{self.out / 'loss.png'}, grids in {self.out / 'val'}, "
                 f"checkpoints in {self.out / 'checkpoints'}")
        return self.metrics()
