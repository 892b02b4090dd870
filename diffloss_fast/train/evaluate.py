"""``diffloss-fast eval``: restore a folder or a data set's held-out split with a trained
checkpoint, save the restored images, and report PSNR/SSIM (printed, and as JSON).

With targets, the inputs' own PSNR/SSIM against them (``input_psnr``, ``input_ssim``) are
reported beside the outputs': the gain is what the network adds."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from . import report, sources
from .checkpoint import read_checkpoint
from .data import list_images, read_image, to_tensor
from .distributed import pick_device
from .metrics import psnr_ssim
from .nets import build_net, restore, size_multiple


def load_trained(path: Path, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The restoration network of a training checkpoint, in eval mode, and its step."""
    ck = read_checkpoint(path)
    net = build_net(ck["net"]["net"], ck["net"]["kwargs"])
    net.load_state_dict(ck["model"])
    return net.to(device).eval(), ck["step"]


def _items(args):
    """(name, input, target or None) triples, and the metric channel."""
    if args.input_dir and not args.target_dir:
        files = list_images(args.input_dir)
        return ((p.name, to_tensor(read_image(p)), None) for p in files), len(files), None
    if args.input_dir and not args.dataset:
        args.dataset = "paired"
    chosen = sources.select(args)
    data = chosen.val
    return ((data.name(i), *data[i]) for i in range(len(data))), len(data), chosen.channel


@torch.no_grad()
def evaluate(args) -> dict:
    """Run ``diffloss-fast eval`` with parsed arguments; returns what eval.json holds."""
    device = pick_device(args.device)
    net, step = load_trained(args.checkpoint, device)
    multiple = args.pad_multiple or size_multiple(net)
    items, count, channel = _items(args)
    out_dir = Path(args.out) if args.out else None
    images = []
    for name, inp, tgt in tqdm(items, total=count, desc="eval", dynamic_ncols=True):
        restored = restore(net, inp[None].to(device), multiple)[0].float().clamp(0, 1).cpu()
        entry = {"name": name}
        if tgt is not None:
            entry["psnr"], entry["ssim"] = psnr_ssim(restored, tgt, channel)
            entry["input_psnr"], entry["input_ssim"] = psnr_ssim(inp, tgt, channel)
        images.append(entry)
        if out_dir:
            report.save_image(out_dir / (Path(name).stem + ".png"), restored)
    result = {"checkpoint": str(args.checkpoint), "step": step, "count": len(images),
              "metric_channel": channel, "images": images}
    if channel:
        for key in ("psnr", "ssim", "input_psnr", "input_ssim"):
            result[key] = sum(e[key] for e in images) / len(images)
    if out_dir:
        report.write_json(out_dir / "eval.json", result)
    if args.json:
        print(json.dumps(result, indent=1))
    elif channel:
        print(f"{len(images)} images ({channel.upper()}): output PSNR {result['psnr']:.2f} dB, "
              f"SSIM {result['ssim']:.4f}; input PSNR {result['input_psnr']:.2f} dB, "
              f"SSIM {result['input_ssim']:.4f}"
              + (f"; restored images and eval.json in {out_dir}" if out_dir else ""))
    else:
        print(f"{len(images)} images restored" + (f" into {out_dir}" if out_dir else ""))
    return result
