"""Face detection with RetinaFace: pre-processing, resize policy, decoding and merging."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torchvision
from facexlib.detection.retinaface_utils import decode, decode_landm

from pipeline.detect.attributes import ATTRIBUTE_COLUMNS, DETECTOR_MEAN_BGR
from pipeline.detect.network import VARIANCES, RetinaFaceNet, fuse_batchnorm, prior_boxes
from pipeline.types import AGE_GROUPS, GENDERS, Face

# Default score threshold for anonymization. A missed face is a privacy leak while a false box
# only costs a replaced patch, so it sits well below the usual 0.5-0.8 (see README for the
# recall / false-box trade-off measured on WIDER FACE).
ANONYMIZE_THRESHOLD = 0.3


@dataclass(frozen=True)
class DetectorSettings:
    threshold: float = ANONYMIZE_THRESHOLD
    nms_iou: float = 0.4
    # BGR channel means the weights were trained with (measured on WIDER: see README).
    mean_bgr: tuple[float, float, float] = DETECTOR_MEAN_BGR
    # Resize policy: the network input's long side is capped at max_side; smaller photos run at
    # their own size (upscaling is only done in multi-scale mode, where it finds tiny faces).
    max_side: int = 2048
    # Multi-scale mode for crowds: extra passes at these factors of the capped scale.
    multiscale: bool = False
    extra_scales: tuple[float, ...] = (2.0,)
    coarse_side: int = 640
    # Passes larger than this are cut into overlapping tiles to bound memory.
    tile_side: int = 2048
    tile_overlap: int = 256
    max_faces: int = 1000


# Detection rows are x1 y1 x2 y2 score, then five landmark (x, y) pairs, then (when the network
# has an attribute head) the attribute columns computed from the same pass's feature maps.
_X_COLUMNS = [0, 2, 5, 7, 9, 11, 13]
_Y_COLUMNS = [1, 3, 6, 8, 10, 12, 14]


def _drop_fragments_of_large_faces(passes: list[tuple[float, np.ndarray]], largest_anchor: float,
                                   columns: int) -> np.ndarray:
    """Merge the passes, dropping finer-pass boxes that lie inside a face too big for that pass.

    A face wider than the largest anchor at some scale is seen there in parts (eyes, mouth,
    half a face); only a coarser pass sees it whole, so whatever a finer pass finds mostly
    inside it is a fragment of the same face, not another person.
    """
    merged = []
    for scale, rows in passes:
        keep = np.ones(rows.shape[0], dtype=bool)
        for other_scale, others in passes:
            if other_scale >= scale or others.shape[0] == 0 or rows.shape[0] == 0:
                continue
            big = others[np.minimum(others[:, 2] - others[:, 0], others[:, 3] - others[:, 1]) * scale
                         > largest_anchor]
            for x1, y1, x2, y2 in big[:, :4]:
                inter = (np.clip(np.minimum(rows[:, 2], x2) - np.maximum(rows[:, 0], x1), 0, None)
                         * np.clip(np.minimum(rows[:, 3], y2) - np.maximum(rows[:, 1], y1), 0, None))
                area = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
                keep &= inter < 0.5 * area
        merged.append(rows[keep])
    return np.concatenate(merged, axis=0) if merged else np.zeros((0, columns), dtype=np.float32)


class RetinaFaceDetector:
    """Finds faces in RGB uint8 images; one instance loads its network once."""

    def __init__(self, net: RetinaFaceNet, settings: DetectorSettings, device: torch.device) -> None:
        # NHWC: oneDNN runs MobileNet's depthwise convolutions about twice as fast in this layout
        # (forward pass at 1024 x 683 on 2 CPU threads: 0.056 s NCHW, 0.027 s NHWC).
        self.net = fuse_batchnorm(net.to(device).eval()).to(memory_format=torch.channels_last)
        self.settings = settings
        self.device = device
        self._mean = torch.tensor(settings.mean_bgr, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.attribute_head = getattr(net, "attribute_head", None)
        self._columns = 15 + (ATTRIBUTE_COLUMNS if self.attribute_head is not None else 0)

    def without_attributes(self) -> RetinaFaceDetector:
        """The same network and settings, skipping the attribute heads: what they cost, what they change."""
        plain = copy.copy(self)
        plain.attribute_head = None
        plain._columns = 15
        return plain

    def scales_for(self, height: int, width: int) -> list[float]:
        s = self.settings
        long_side = max(height, width)
        base = min(1.0, s.max_side / long_side)
        scales = [base]
        if s.multiscale:
            scales += [base * f for f in s.extra_scales]
        # Photos much larger than the largest anchor also get a coarse pass so that a face
        # filling the frame is seen whole.
        coarse = s.coarse_side / long_side
        if coarse < 0.5 * base:
            scales.append(coarse)
        return scales

    @torch.inference_mode()
    def raw_outputs(self, image_rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's loc, softmax conf and landmark outputs for one image at its own size."""
        return self._forward(self._to_tensor(image_rgb))[:3]

    def _to_tensor(self, image_rgb: np.ndarray) -> torch.Tensor:
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1]).transpose(2, 0, 1)
        tensor = torch.from_numpy(bgr).to(self.device, non_blocking=True).unsqueeze(0).float()
        return (tensor - self._mean).contiguous(memory_format=torch.channels_last)

    def _forward(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        loc, conf, landmarks, body, _ = self.net.forward_with_maps(tensor)
        return loc[0], torch.softmax(conf[0], dim=-1), landmarks[0], body

    @torch.inference_mode()
    def detect(self, image_rgb: np.ndarray, threshold: float | None = None) -> list[Face]:
        """Faces above the threshold, highest score first, boxes clipped to the image."""
        threshold = self.settings.threshold if threshold is None else threshold
        height, width = image_rgb.shape[:2]
        passes = [(scale, self._detect_at_scale(image_rgb, scale, threshold))
                  for scale in self.scales_for(height, width)]
        rows = _drop_fragments_of_large_faces(passes, float(self.net.min_sizes[-1][-1]), self._columns)
        if rows.shape[0] == 0:
            return []
        keep = torchvision.ops.nms(torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4]), self.settings.nms_iou)
        rows = rows[keep.numpy()[: self.settings.max_faces]]
        rows[:, [0, 2]] = rows[:, [0, 2]].clip(0, width)
        rows[:, [1, 3]] = rows[:, [1, 3]].clip(0, height)
        faces = [
            Face(box=row[:4].copy(), landmarks=row[5:15].reshape(5, 2).copy(), score=float(row[4])) for row in rows
        ]
        if self.attribute_head is not None:
            for face, row in zip(faces, rows):
                female, group_probs, age = float(row[15]), row[16:20].copy(), float(row[20])
                face.gender = GENDERS[int(female >= 0.5)]
                face.gender_prob = max(female, 1.0 - female)
                face.age_group = AGE_GROUPS[int(np.argmax(group_probs))]
                face.age_group_probs = group_probs
                face.age = age
        return faces

    def _detect_at_scale(self, image_rgb: np.ndarray, scale: float, threshold: float) -> np.ndarray:
        if scale == 1.0:
            scaled = image_rgb
        else:
            interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            scaled = cv2.resize(image_rgb, None, fx=scale, fy=scale, interpolation=interpolation)
        height, width = scaled.shape[:2]
        found = []
        for top, left, tile in self._tiles(scaled):
            rows = self._decode(tile, threshold)
            if rows.shape[0] == 0:
                continue
            rows = self._in_tile_core(rows, top, left, tile.shape[0], tile.shape[1], height, width)
            rows[:, _X_COLUMNS] += left
            rows[:, _Y_COLUMNS] += top
            found.append(rows)
        rows = np.concatenate(found, axis=0) if found else np.zeros((0, self._columns), dtype=np.float32)
        rows[:, :4] /= scale
        rows[:, 5:15] /= scale
        return rows

    def _tiles(self, image: np.ndarray):
        side, overlap = self.settings.tile_side, self.settings.tile_overlap
        height, width = image.shape[:2]
        if height <= side and width <= side:
            yield 0, 0, image
            return
        step = side - overlap
        for top in range(0, max(height - overlap, 1), step):
            for left in range(0, max(width - overlap, 1), step):
                yield top, left, image[top : top + side, left : left + side]

    def _in_tile_core(self, rows, top, left, tile_h, tile_w, height, width) -> np.ndarray:
        """Keep faces centred in this tile's core: the tile less a quarter of the overlap on inner sides.

        Partial faces found at a tile's inner edge are centred near that edge and dropped; the
        neighbouring tile sees them whole. Cores overlap by half the overlap so that a face whose
        centre jitters between two tiles is kept by both and merged by NMS, never lost.
        """
        margin = self.settings.tile_overlap / 4
        x0 = margin if left > 0 else -np.inf
        y0 = margin if top > 0 else -np.inf
        x1 = tile_w - margin if left + tile_w < width else np.inf
        y1 = tile_h - margin if top + tile_h < height else np.inf
        cx = (rows[:, 0] + rows[:, 2]) / 2
        cy = (rows[:, 1] + rows[:, 3]) / 2
        return rows[(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)]

    def _decode(self, image_rgb: np.ndarray, threshold: float) -> np.ndarray:
        """Rows for one network pass; attribute columns come from this pass's maps at the final boxes."""
        tensor = self._to_tensor(image_rgb)
        loc, conf, landmarks, body = self._forward(tensor)
        rows = self.rows_from_outputs(loc, conf, landmarks, image_rgb.shape[:2], threshold)
        if rows.shape[0] == 0:
            return np.zeros((0, self._columns), dtype=np.float32)
        if self.attribute_head is None:
            return rows
        attributes = self.attribute_head.columns(body, torch.from_numpy(rows[:, :4]).to(self.device), tensor,
                                                 torch.from_numpy(rows[:, 5:15]).to(self.device))
        return np.concatenate([rows, attributes.float().cpu().numpy()], axis=1)

    def rows_from_outputs(self, loc: torch.Tensor, conf: torch.Tensor, landmarks: torch.Tensor,
                          shape: tuple[int, int], threshold: float) -> np.ndarray:
        """Decoded, NMS-merged (N, 15) rows from one image's loc, softmax conf and landmark outputs."""
        scores = conf[:, 1]
        selected = torch.nonzero(scores > threshold).squeeze(1)
        if selected.numel() == 0:
            return np.zeros((0, 15), dtype=np.float32)
        priors = torch.from_numpy(prior_boxes(*shape, self.net.min_sizes)).to(self.device)[selected]
        boxes = decode(loc[selected], priors, VARIANCES)
        points = decode_landm(landmarks[selected], priors, VARIANCES)
        rows = torch.cat([boxes, scores[selected, None], points], dim=1).float().cpu().numpy()
        order = np.argsort(-rows[:, 4], kind="stable")
        rows = rows[order]
        keep = torchvision.ops.nms(torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4]), self.settings.nms_iou)
        return rows[keep.numpy()]
