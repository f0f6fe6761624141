"""Our own trained generators on disk: the small fp16 ship file and the trainer's snapshots.

Both are ``torch.save`` dicts of plain tensors, numbers and strings, so they load with
``weights_only=True``; this module imports nothing of the trainer, so the anonymizer can use
it cheaply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.generate.stylegan2 import Generator

__all__ = ["load_trained_generator", "save_ship_file"]


def save_ship_file(G_ema: Generator, init_kwargs: dict[str, Any], path: Path, meta: dict[str, Any]) -> None:
    """G_ema in float16 (half the bytes; inference upcasts) with what it takes to rebuild it."""
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
             for k, v in G_ema.state_dict().items()}
    torch.save({"G_ema": state, "init_kwargs": init_kwargs, "meta": meta}, path)


def load_trained_generator(path: str | Path, device: torch.device | str = "cpu") -> Generator:
    """A float32 ``Generator`` in eval mode from a ship file or a full training snapshot."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "G_ema" not in data or "init_kwargs" not in data:
        raise ValueError(f"{path}: not a facechange generator file (expected G_ema and init_kwargs)")
    G = Generator(**data["init_kwargs"]["G"])
    G.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in data["G_ema"].items()})
    return G.to(device).eval().requires_grad_(False)
