"""Training checkpoints as one safetensors file: no pickle, so loading one never runs code.

Tensors: the network's state dict under ``model.``, the optimizer's per-parameter state under
``optimizer.<param index>.<name>``. Everything else (step, how to rebuild the network, the
optimizer's hyperparameters, the LR scheduler and the AMP grad scaler) is JSON in the header.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "diffloss_fast.train/1"


def save_checkpoint(path: Path, *, step: int, net: torch.nn.Module, net_spec: dict,
                    optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
    """Write atomically (a crash mid-write leaves the previous file intact)."""
    tensors = {f"model.{k}": v.detach().contiguous().clone()
               for k, v in net.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{index}.{name}"] = value
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "net": json.dumps(net_spec),
        "optimizer_param_groups": json.dumps(opt["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict()),
        "scaler": json.dumps(scaler.state_dict()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """``{"step", "net" (spec), "model" (state dict), "optimizer" (state dict), "scheduler",
    "scaler"}`` from a file written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ValueError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: not a diffloss-fast training checkpoint "
                         f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            index, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta["optimizer_scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {
        "step": int(meta["step"]),
        "net": json.loads(meta["net"]),
        "model": model,
        "optimizer": {"state": state,
                      "param_groups": json.loads(meta["optimizer_param_groups"])},
        "scheduler": json.loads(meta["scheduler"]),
        "scaler": json.loads(meta["scaler"]),
    }
