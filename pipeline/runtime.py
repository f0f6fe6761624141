"""Where models run and where their converted weights are cached: decided once per process."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def cache_dir() -> Path:
    """Converted weights live here; FACECHANGE_CACHE_DIR overrides the per-user cache."""
    override = os.environ.get("FACECHANGE_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("facechange"))


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
