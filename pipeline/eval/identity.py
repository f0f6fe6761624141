"""Identity embeddings for privacy measurements (research-only model; never in the product path).

The ArcFace MobileFaceNet ONNX model in ../shared embeds a face aligned to the standard 5-point
ArcFace template; cosine similarity of L2-normalized embeddings says whether two faces are the
same person. The threshold is calibrated at a fixed false-accept rate on CelebA identities.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float32,
)


# A detector sees an unpadded UTKFace crop as "the whole image is a face": measurements pad it
# with grey before detecting (as the generator's data packing does, DETECT_PAD there).
UTKFACE_PAD = 50


def detected_utkface_faces(zip_path: Path, samples: list, detect_landmarks: Callable[[np.ndarray], np.ndarray | None]
                           ) -> Iterator[tuple[object, np.ndarray, np.ndarray]]:
    """(sample, crop padded by UTKFACE_PAD with grey, landmarks in the padded crop) for every sample
    whose face ``detect_landmarks`` finds; the others are skipped."""
    with zipfile.ZipFile(zip_path) as archive:
        for sample in samples:
            crop = np.asarray(Image.open(io.BytesIO(archive.read(sample.member))).convert("RGB"))
            padded = np.pad(crop, ((UTKFACE_PAD, UTKFACE_PAD), (UTKFACE_PAD, UTKFACE_PAD), (0, 0)),
                            constant_values=127)
            landmarks = detect_landmarks(padded)
            if landmarks is not None:
                yield sample, padded, landmarks


def align_112(image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), ARCFACE_TEMPLATE_112, method=cv2.LMEDS)
    return cv2.warpAffine(image_rgb, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class Embedder(Protocol):
    def embed(self, image_rgb: np.ndarray, landmarks: list[np.ndarray]) -> np.ndarray:
        """L2-normalized identity embeddings (N, D) of the faces with these 5 landmarks."""


class IdentityEmbedder:
    def __init__(self, onnx_path: Path) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the converted model carries unused initializers; not our concern
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def embed_aligned(self, faces_112: list[np.ndarray]) -> np.ndarray:
        if not faces_112:
            return np.zeros((0, 128), np.float32)
        batch = np.stack(faces_112).astype(np.float32).transpose(0, 3, 1, 2)
        (embeddings,) = self.session.run(["fc1"], {"data": batch})
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-8)

    def embed(self, image_rgb: np.ndarray, landmarks: list[np.ndarray]) -> np.ndarray:
        return self.embed_aligned([align_112(image_rgb, lm) for lm in landmarks])


# Face sizes (px, the box's shorter side) at which the calibration also reports how the threshold
# holds: bystanders are 32-64 px, CelebA faces ~86 px.
CALIBRATION_SIZES = (64, 48, 32)


def calibrate_threshold(embedder: Embedder, detect_face, celeba_dir: Path, far: float = 1e-3,
                        sizes: tuple[int, ...] = CALIBRATION_SIZES) -> dict:
    """The similarity above which two CelebA photos of different people are accepted at rate ``far``.

    ``detect_face(image_rgb)`` gives the main Face or None. ``by_face_size`` repeats the measure
    with every photo downscaled so its face is that many pixels (larger faces only): the false-accept
    rate the threshold really has there, the threshold that would give ``far``, and the share of
    genuine pairs accepted.
    """
    from pipeline.image_io import load_image

    identities = json.loads((celeba_dir / "identities.json").read_text())
    photos, labels = [], []
    for name in sorted(identities):
        image = load_image(celeba_dir / "images" / name)
        face = detect_face(image)
        if face is not None:
            photos.append((image, face))
            labels.append(identities[name])
    ids = np.array(labels)
    upper = np.triu(np.ones((len(ids), len(ids)), dtype=bool), k=1)
    same = ids[:, None] == ids[None, :]

    def pairs(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        similarity = embeddings @ embeddings.T
        return similarity[upper & ~same], similarity[upper & same]

    native = np.stack([embedder.embed(image, [face.landmarks])[0] for image, face in photos])
    impostor, genuine = pairs(native)
    threshold = float(np.quantile(impostor, 1.0 - far))
    by_size = {}
    for size in sizes:
        embeddings = native.copy()
        for i, (image, face) in enumerate(photos):
            scale = size / max(face.size, 1.0)
            if scale < 1:  # a face already this small or smaller keeps its native embedding
                small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                embeddings[i] = embedder.embed(small, [face.landmarks * scale])[0]
        small_impostor, small_genuine = pairs(embeddings)
        by_size[f"{size}px"] = {"far_at_threshold": round(float((small_impostor > threshold).mean()), 5),
                                "threshold_at_far": round(float(np.quantile(small_impostor, 1.0 - far)), 4),
                                "tar_at_threshold": round(float((small_genuine > threshold).mean()), 4)}
    return {"threshold": round(threshold, 4), "far": far, "tar": round(float((genuine > threshold).mean()), 4),
            "faces": len(labels), "identities": len(set(labels)), "impostor_pairs": int(impostor.size),
            "genuine_pairs": int(genuine.size), "median_face_px": round(float(np.median([f.size for _, f in photos])), 1),
            "by_face_size": by_size}
