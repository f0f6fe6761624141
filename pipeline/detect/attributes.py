"""Gender and age heads that read the detector's own feature maps at each detected face.

Per-anchor 1x1 heads on MobileNet-0.25's 64-channel SSH maps see one cell per face; measured on
held-out UTKFace they fall short of the targets (see weights/manifest.json), so the shipped head
pools the backbone stage outputs (64/128/256 channels, strides 8/16/32) over the face's box with
RoIAlign and runs a small conv + MLP on them. It is a sub-module of the detector network and runs
on the maps of the same forward pass that found the face: one model, one call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.types import AGE_GROUPS, GENDERS
from pipeline.weights import sha256_file

WEIGHTS_FILE = Path(__file__).resolve().parents[2] / "weights" / "retinaface_attributes.pt"
MANIFEST_NAME = "retinaface-attributes-utkface"
FORMAT = "facechange-attributes-v1"

STRIDES: tuple[int, ...] = (8, 16, 32)
MAX_AGE = 100  # fine age bins are whole years 0..MAX_AGE; older faces count as MAX_AGE
AGE_GROUP_EDGES: tuple[int, ...] = (10, 30, 60)  # first age of each group after the first
# Columns the detector appends to each detection row: P(female), the group probabilities, age.
ATTRIBUTE_COLUMNS = 1 + len(AGE_GROUPS) + 1


def age_group_index(age: np.ndarray | int) -> np.ndarray:
    return np.searchsorted(np.asarray(AGE_GROUP_EDGES), np.asarray(age), side="right")


def pool_boxes(maps: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """RoIAlign every map over each box (input pixels, image 0 of the batch) -> (N, sum C, size, size)."""
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes.to(maps[0].dtype)], dim=1)
    return torch.cat([
        torchvision.ops.roi_align(m, rois, size, spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
        for m, stride in zip(maps, STRIDES)
    ], dim=1)


class AttributeHead(nn.Module):
    """Pooled box features -> gender logits (2), age-group logits (4), age-bin logits (MAX_AGE + 1)."""

    def __init__(self, in_channels: int = 448, pool: int = 4, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.pool = pool
        self.config = {"in_channels": in_channels, "pool": pool, "width": width, "hidden": hidden}
        self.reduce = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(width * pool * pool, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
        )
        self.out = nn.Linear(hidden, len(GENDERS) + len(AGE_GROUPS) + MAX_AGE + 1)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.out(self.mlp(self.reduce(pooled)))
        return logits[:, :2], logits[:, 2:6], logits[:, 6:]

    def columns(self, body_maps: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """The detector's extra row columns for these boxes: P(female), group probabilities, age."""
        gender, group, bins = self(pool_boxes(body_maps, boxes, self.pool).float())
        return torch.cat([torch.softmax(gender, 1)[:, 1:], torch.softmax(group, 1), expected_age(bins)[:, None]], 1)


def expected_age(bin_logits: torch.Tensor) -> torch.Tensor:
    ages = torch.arange(MAX_AGE + 1, dtype=bin_logits.dtype, device=bin_logits.device)
    return torch.softmax(bin_logits, 1) @ ages


def save_head(head: AttributeHead, path: Path, provenance: dict) -> None:
    """fp16 weights (the head is ~0.6 M parameters, ~1.2 MB) plus what is needed to rebuild it."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "config": head.config, "state_dict": state, "provenance": provenance}, path)


def load_head(path: Path, sha256: str | None) -> AttributeHead:
    """Rebuild a head from ``save_head``'s file; refuses a file whose hash differs from the given one."""
    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(f"{path}: sha256 differs from weights/manifest.json; retrain or update the manifest")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    head = AttributeHead(**blob["config"])
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return head.eval()
