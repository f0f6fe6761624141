"""Swap stage: put a synthetic identity onto a detected face, in place, inside an allowed area.

Backends (``SwapConfig.backend``):
- ``blend`` (default, always available): align by 5 landmarks, match colour, light, sharpness
  and grain, feathered blend of the inner face;
- ``simswap``: SimSwap 224 with its ArcFace encoder, from the official checkpoints;
- ``inswapper``: insightface's INSwapper with a user-supplied ``inswapper_128.onnx`` and the
  insightface recognition model it expects for the source embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.swap.blend import paste_synthetic
from pipeline.swap.masks import inner_face_mask
from pipeline.types import Face

BACKENDS = ("blend", "simswap", "inswapper")


@dataclass(frozen=True)
class SwapConfig:
    backend: str = "blend"
    simswap_checkpoint: Path | None = None  # checkpoints/people/latest_net_G.pth
    simswap_arcface: Path | None = None  # arcface_model/arcface_checkpoint.tar
    inswapper_model: Path | None = None  # inswapper_128.onnx
    inswapper_arcface: Path | None = None  # insightface recognition model, e.g. w600k_r50.onnx


class FaceSwapper(Protocol):
    name: str

    def swap(self, image: np.ndarray, target: Face, source: np.ndarray, source_landmarks: np.ndarray,
             allowed: np.ndarray, rng: np.random.Generator) -> None:
        """Replace ``target`` in ``image`` by the identity of ``source``; 0 in ``allowed`` stays untouched."""


def _apply_within(image: np.ndarray, swapped: np.ndarray, allowed: np.ndarray) -> None:
    """Take the backend's result only where changes are allowed (kept faces stay identical)."""
    weight = allowed[:, :, None]
    changed = np.any(swapped != image, axis=2) & (allowed > 0)
    blended = image.astype(np.float32) + (swapped.astype(np.float32) - image) * weight
    image[changed] = np.clip(np.rint(blended[changed]), 0, 255).astype(np.uint8)


class BlendSwapper:
    name = "blend"

    def swap(self, image, target, source, source_landmarks, allowed, rng) -> None:
        mask = inner_face_mask(target, image.shape[:2]) * allowed
        paste_synthetic(image, target, source, source_landmarks, mask, rng)


class SimSwapBackend:
    name = "simswap"

    def __init__(self, checkpoint: Path, arcface: Path, device: torch.device) -> None:
        from pipeline.swap.simswap import SimSwapSwapper

        self.swapper = SimSwapSwapper.from_files(checkpoint, arcface, device)

    def swap(self, image, target, source, source_landmarks, allowed, rng) -> None:
        from pipeline.swap.simswap import align_face, paste_back

        target_crop, matrix = align_face(image, target.landmarks)
        source_crop, _ = align_face(source, source_landmarks)
        _apply_within(image, paste_back(image, self.swapper.swap(target_crop, source_crop), matrix), allowed)


class InSwapperBackend:
    name = "inswapper"

    def __init__(self, model: Path, recognition_model: Path) -> None:
        from insightface.app.common import Face as InsightFace
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        from pipeline.swap.inswapper import InSwapperSwapper

        self.swapper = InSwapperSwapper(model)
        self.recognition = ArcFaceONNX(model_file=str(recognition_model))
        self.recognition.prepare(ctx_id=-1)
        self._face = InsightFace

    def swap(self, image, target, source, source_landmarks, allowed, rng) -> None:
        bgr = np.ascontiguousarray(source[..., ::-1])
        embedding = self.recognition.get(bgr, self._face(kps=source_landmarks.astype(np.float32)))
        _apply_within(image, self.swapper.swap(image, target.landmarks, embedding), allowed)


def build_swapper(cfg: SwapConfig, device: torch.device) -> FaceSwapper:
    if cfg.backend == "blend":
        return BlendSwapper()
    if cfg.backend == "simswap":
        if not (cfg.simswap_checkpoint and cfg.simswap_arcface):
            raise ValueError("the simswap backend needs --simswap-checkpoint and --simswap-arcface")
        return SimSwapBackend(cfg.simswap_checkpoint, cfg.simswap_arcface, device)
    if cfg.backend == "inswapper":
        if not (cfg.inswapper_model and cfg.inswapper_arcface):
            raise ValueError("the inswapper backend needs --inswapper-model and --inswapper-arcface")
        return InSwapperBackend(cfg.inswapper_model, cfg.inswapper_arcface)
    raise ValueError(f"unknown swap backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")
