"""Gender and age heads of the detector: sub-modules that run in the same pass that found the face.

Per-anchor 1x1 heads on MobileNet-0.25's 64-channel SSH maps see one cell per face, and even
RoIAlign over the frozen backbone stages (``AttributeHead``, the first shipped variant) falls
short of the targets: the detector's features carry little gender/age information. The
``AlignedAttributeHead`` instead samples a landmark-aligned 72 px face crop from the pass's own
input tensor (affine_grid + grid_sample, using the landmarks the pass just decoded) and runs a
small CNN trained from scratch on it. Either head only adds columns: one model, one call, and the
detector's boxes, scores and landmarks are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from pipeline.types import AGE_GROUPS, GENDERS
from pipeline.weights import load_verified

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "retinaface_attributes.pt"
MANIFEST_NAME = "retinaface-attributes-utkface"
# The identity branch: a probe on dlib's face descriptors, and our fp16 copy of dlib's network.
IDENTITY_WEIGHTS_FILE = WEIGHTS_DIR / "retinaface_attributes_identity.pt"
IDENTITY_MANIFEST_NAME = "retinaface-attributes-identity-probe-utkface"
DLIB_WEIGHTS_FILE = WEIGHTS_DIR / "dlib_face_recognition_resnet_v1.pt"
DLIB_MANIFEST_NAME = "dlib-face-recognition-resnet-v1"
IDENTITY_FORMAT = "facechange-attributes-identity-v1"
# The detector's input tensor is BGR minus this mean (DetectorSettings.mean_bgr); the heads were trained on it.
DETECTOR_MEAN_BGR = (104.0, 117.0, 123.0)
FORMAT = "facechange-attributes-v1"
ALIGNED_FORMAT = "facechange-attributes-aligned-v1"
FORMATS = (FORMAT, ALIGNED_FORMAT)

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

    def columns(self, body_maps: list[torch.Tensor], boxes: torch.Tensor, image: torch.Tensor | None = None,
                landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """The detector's extra row columns for these boxes: P(female), group probabilities, age."""
        return _columns(*self(pool_boxes(body_maps, boxes, self.pool).float()))


def _columns(gender: torch.Tensor, group: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.softmax(gender, 1)[:, 1:], torch.softmax(group, 1), expected_age(bins)[:, None]], 1)


# Aligned-face branch. Mean 5 landmarks (eyes, nose, mouth corners) that the detector finds on 260
# UTKFace training crops (200 x 200, padded 50 px before detecting): UTKFace crops are already
# aligned, so training reads a fixed window of every crop and inference maps each face's own
# landmarks onto the same points.
UTKFACE_MEAN_LANDMARKS = ((60.54, 58.37), (137.92, 59.80), (98.56, 106.55), (64.80, 137.10), (132.51, 138.43))
UTKFACE_CROP = 200
# Defaults of the aligned head unless a head file says otherwise: the side of the square window
# the CNN sees (in 200 px crop coordinates, centred on the crop), the side of the crop it reads,
# and its stage channels.
ALIGN_WINDOW = 184.0
ALIGN_SIZE = 72
ALIGN_WIDTHS = (48, 96, 192, 288)


def aligned_template(size: int = ALIGN_SIZE, window: float = ALIGN_WINDOW) -> torch.Tensor:
    """The 5 template points in the pixel coordinates of the size x size aligned crop."""
    start = (UTKFACE_CROP - window) / 2
    return (torch.tensor(UTKFACE_MEAN_LANDMARKS) - start) * (size / window)


def similarity_to(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms (N, 2, 3) taking src (5, 2) onto each dst (N, 5, 2)."""
    src_mean, dst_mean = src.mean(0), dst.mean(1, keepdim=True)
    s, d = src - src_mean, dst - dst_mean
    norm = (s**2).sum()
    a = ((d[..., 0] * s[:, 0] + d[..., 1] * s[:, 1]).sum(1)) / norm  # s cos
    b = ((d[..., 1] * s[:, 0] - d[..., 0] * s[:, 1]).sum(1)) / norm  # s sin
    rot = torch.stack([torch.stack([a, -b], 1), torch.stack([b, a], 1)], 1)  # (N, 2, 2)
    shift = dst_mean[:, 0] - (rot @ src_mean)
    return torch.cat([rot, shift[..., None]], 2)


def sample_aligned(image: torch.Tensor, pixel_map: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crops (N, C, size, size) of image 0 where pixel_map (N, 2, 3) takes crop pixels to image pixels."""
    height, width = image.shape[-2:]
    # crop normalised -> crop pixel: u = ((x + 1) * size - 1) / 2 ; image pixel -> normalised: (2 p + 1) / W - 1
    to_pixel = pixel_map.new_tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]])
    to_norm = pixel_map.new_tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
    full = torch.cat([pixel_map, pixel_map.new_tensor([0, 0, 1]).expand(len(pixel_map), 1, 3)], 1)
    theta = (to_norm @ full @ to_pixel)[:, :2]
    grid = F.affine_grid(theta, [len(pixel_map), image.shape[1], size, size], align_corners=False)
    return F.grid_sample(image[:1].expand(len(pixel_map), -1, -1, -1), grid, mode="bilinear",
                         padding_mode="border", align_corners=False)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AlignedAttributeHead(nn.Module):
    """Landmark-aligned face crop from the network's input tensor -> small CNN -> gender, age group, age bins.

    The crop is sampled (bilinear, 2x supersampled then averaged) from the same BGR-minus-mean
    tensor the detector just ran on, with the similarity transform from this head's template to
    the face's detected landmarks; the detector's own outputs are untouched. With ``flip`` the
    logits of the crop and its mirror image are averaged.
    """

    def __init__(self, size: int = ALIGN_SIZE, widths: tuple[int, ...] = ALIGN_WIDTHS, dropout: float = 0.3,
                 flip: bool = True, window: float = ALIGN_WINDOW) -> None:
        super().__init__()
        self.size, self.flip, self.window = size, flip, window
        self.config = {"size": size, "widths": list(widths), "dropout": dropout, "flip": flip, "window": window}
        self.register_buffer("template", aligned_template(size, window))
        layers, cin = [], 3
        for i, width in enumerate(widths):  # the first stage is a single stride-2 conv: full resolution is costly
            layers += [_block(cin, width, 2)] + ([_block(width, width, 1)] if i else [])
            cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.out = nn.Linear(cin, len(GENDERS) + len(AGE_GROUPS) + MAX_AGE + 1)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """crops: (N, 3, size, size) BGR minus the detector's mean, as the detector's input tensor."""
        logits = self.out(self.features(crops / 64.0))
        return logits[:, :2], logits[:, 2:6], logits[:, 6:]

    def crops(self, image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Aligned crops of the faces with these (N, 5, 2) landmarks in the input tensor's pixels."""
        fine = 2 * self.size
        # template and landmarks are continuous coordinates (pixel i spans [i, i + 1)); the map wants pixel centres
        pixel_map = similarity_to(self.template * 2 - 0.5, landmarks.float() - 0.5)
        return F.avg_pool2d(sample_aligned(image.float(), pixel_map, fine), 2)

    def columns(self, body_maps: list[torch.Tensor], boxes: torch.Tensor, image: torch.Tensor | None = None,
                landmarks: torch.Tensor | None = None) -> torch.Tensor:
        crops = self.crops(image, landmarks.reshape(-1, 5, 2))
        if self.flip:
            gender, group, bins = self(torch.cat([crops, crops.flip(3)]))
            n = len(crops)
            gender, group, bins = [(t[:n] + t[n:]) / 2 for t in (gender, group, bins)]
        else:
            gender, group, bins = self(crops)
        return _columns(gender, group, bins)


class IdentityProbe(nn.Module):
    """dlib face descriptor (128) -> gender logits (2), age-group logits (4)."""

    def __init__(self, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.config = {"hidden": hidden, "dropout": dropout}
        self.net = nn.Sequential(nn.Linear(128, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, len(GENDERS) + len(AGE_GROUPS)))

    def forward(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(descriptors * 10.0)  # descriptors have norm ~1: scaled to unit-ish features
        return logits[:, :2], logits[:, 2:]


def dlib_chips(image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """dlib's 150 px RGB 0..255 chips of the faces with these (N, 5, 2) landmarks, sampled from the
    detector's input tensor (BGR minus DETECTOR_MEAN_BGR), 2x supersampled like the aligned crops."""
    from pipeline.detect.dlib_resnet import CHIP, DLIB_CHIP_TEMPLATE

    template = torch.from_numpy(DLIB_CHIP_TEMPLATE).to(image.device, torch.float32)
    pixel_map = similarity_to(template * 2 - 0.5, landmarks.float() - 0.5)
    chips = F.avg_pool2d(sample_aligned(image.float(), pixel_map, 2 * CHIP), 2)
    # the mean back and BGR -> RGB on the small chips, not on the whole photo's tensor
    return (chips + chips.new_tensor(DETECTOR_MEAN_BGR).view(1, 3, 1, 1)).flip(1)


class CascadeAttributeHead(nn.Module):
    """The aligned head first; where it is unsure, its probabilities averaged with the identity probe's.

    Unsure: P(female) within ``gender_margin`` of 0.5, or no age group above ``group_confidence``
    (a third of held-out faces). dlib's network (5 ms for one face on 2 cores) then runs on those
    faces only, so a photo of clear faces costs what the aligned head costs. The age in years is
    the aligned head's.
    """

    def __init__(self, aligned: AlignedAttributeHead, network: nn.Module, probe: IdentityProbe,
                 gender_margin: float, group_confidence: float) -> None:
        super().__init__()
        self.aligned, self.network, self.probe = aligned, network, probe.eval()
        self.gender_margin, self.group_confidence = gender_margin, group_confidence

    def unsure(self, female: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return ((female - 0.5).abs() < self.gender_margin) | (groups.max(1).values < self.group_confidence)

    def columns(self, body_maps: list[torch.Tensor], boxes: torch.Tensor, image: torch.Tensor | None = None,
                landmarks: torch.Tensor | None = None) -> torch.Tensor:
        columns = self.aligned.columns(body_maps, boxes, image, landmarks)
        unsure = self.unsure(columns[:, 0], columns[:, 1:5])
        if not unsure.any():
            return columns
        gender, group = self.probe(self.network(dlib_chips(image, landmarks.reshape(-1, 5, 2)[unsure])))
        columns = columns.clone()
        columns[unsure, 0] = (columns[unsure, 0] + torch.softmax(gender, 1)[:, 1]) / 2
        columns[unsure, 1:5] = (columns[unsure, 1:5] + torch.softmax(group, 1)) / 2
        return columns


def save_identity_probe(probe: IdentityProbe, path: Path, gender_margin: float, group_confidence: float,
                        provenance: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": IDENTITY_FORMAT, "config": probe.config, "state_dict": probe.state_dict(),
                "gender_margin": gender_margin, "group_confidence": group_confidence,
                "provenance": provenance}, path)


def load_cascade(aligned: AlignedAttributeHead, probe_path: Path, probe_sha256: str | None, network_path: Path,
                 network_sha256: str | None) -> CascadeAttributeHead:
    from pipeline.detect.dlib_resnet import load_network

    blob = load_verified(probe_path, probe_sha256, (IDENTITY_FORMAT,))
    probe = IdentityProbe(**blob["config"])
    probe.load_state_dict(blob["state_dict"])
    return CascadeAttributeHead(aligned, load_network(network_path, network_sha256), probe,
                                blob["gender_margin"], blob["group_confidence"])


def expected_age(bin_logits: torch.Tensor) -> torch.Tensor:
    ages = torch.arange(MAX_AGE + 1, dtype=bin_logits.dtype, device=bin_logits.device)
    return torch.softmax(bin_logits, 1) @ ages


def save_head(head: AttributeHead | AlignedAttributeHead, path: Path, provenance: dict) -> None:
    """fp16 weights (either head is ~1 M parameters, ~2 MB) plus what is needed to rebuild it."""
    state = {k: (v.half() if v.is_floating_point() and k != "template" else v) for k, v in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = ALIGNED_FORMAT if isinstance(head, AlignedAttributeHead) else FORMAT
    torch.save({"format": fmt, "config": head.config, "state_dict": state, "provenance": provenance}, path)


def load_head(path: Path, sha256: str | None) -> AttributeHead | AlignedAttributeHead:
    """Rebuild a head from ``save_head``'s file; refuses a file whose hash differs from the given one."""
    blob = load_verified(path, sha256, FORMATS)
    head = (AlignedAttributeHead if blob["format"] == ALIGNED_FORMAT else AttributeHead)(**blob["config"])
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return head.eval()
