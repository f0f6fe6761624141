"""UTKFace re-aligned to one 5-point template and packed into a single .npz for GAN training.

UTKFace crops are only roughly aligned and tightly framed; the generator should learn one
framing, so every crop is padded, run through our detector, and warped so its 5 landmarks land
on one fixed template (``face_template``: UTKFace's own average framing, chin to forehead).
Crops where the detector finds nothing are warped with the median landmarks of the detected
ones, i.e. they get the framing UTKFace's own alignment gives on average.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.detect.attributes import age_group_index
from pipeline.types import AGE_GROUPS, GENDERS

__all__ = [
    "NUM_CLASSES",
    "PackedFaces",
    "class_index",
    "face_template",
    "load_packed",
    "pack_utkface",
    "write_packed",
]

NUM_CLASSES = len(GENDERS) * len(AGE_GROUPS)
# insightface's ArcFace 112x112 template: eyes, nose tip, mouth corners (image left first).
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# Crop side and centre (below the eye midpoint) in eye-to-mouth distances: see face_template.
CROP_SIDE = 2.5
CROP_CENTRE = 0.5
DETECT_PAD = 50  # a detector sees an unpadded 200 px crop as "the whole image is a face"


def class_index(gender: np.ndarray | int, age_group: np.ndarray | int) -> np.ndarray:
    """The generator's class: gender * 4 + age group (0 male, 1 female; AGE_GROUPS order)."""
    return np.asarray(gender) * len(AGE_GROUPS) + np.asarray(age_group)


def face_template(resolution: int) -> np.ndarray:
    """The ArcFace points placed in a square crop framed like an average UTKFace crop.

    FFHQ's framing (side 3.6 eye-to-mouth distances, centred 0.1 below the eyes, with hair) would
    need ~300 px around faces whose UTKFace crop is 200 px wide: a third of every training image
    would be reflected padding, which the generator would learn. UTKFace's median crop is 2.6
    eye-to-mouth distances wide, centred 0.53 below the eye midpoint; the template takes 2.5 and
    0.5, so most faces, once rotated and scaled onto it, stay inside their crop.
    """
    eye_avg = ARCFACE_112[:2].mean(axis=0)
    eye_to_mouth = ARCFACE_112[3:].mean(axis=0) - eye_avg
    side = CROP_SIDE * np.linalg.norm(eye_to_mouth)
    centre = eye_avg + CROP_CENTRE * eye_to_mouth
    return ((ARCFACE_112 - centre) * (resolution / side) + resolution / 2).astype(np.float32)


@dataclass(frozen=True)
class PackedFaces:
    images: np.ndarray  # N x R x R x 3 uint8 RGB
    gender: np.ndarray  # N int64, 0 male 1 female
    age_group: np.ndarray  # N int64, index into AGE_GROUPS
    age: np.ndarray  # N int64, years
    names: np.ndarray  # N str, UTKFace file names
    held_out: np.ndarray  # N bool: sha1(name) % 10 == 0, never trained on
    detected: np.ndarray  # N bool: False where the median-landmark fallback was used
    landmarks: np.ndarray  # N x 5 x 2 float32, in the 200 px UTKFace crop (the ones warped with)
    template: np.ndarray  # 5 x 2 float32, the landmark positions at this resolution

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    @property
    def labels(self) -> np.ndarray:
        return class_index(self.gender, self.age_group)


def write_packed(path: Path, faces: PackedFaces, meta: dict[str, object], jpeg_quality: int | None = None) -> None:
    """One .npz; with ``jpeg_quality`` the images are stored as JPEG bytes (64 px, q90 4:4:4: ~2.6 kB a
    face, mean abs error ~2.3/255, instead of ~10 kB zlib-compressed), small enough to move around."""
    if jpeg_quality is None:
        pixels = {"images": faces.images}
    else:
        # Full-resolution chroma: at 64 px, 4:2:0 subsampling alone costs ~0.6 of mean abs error.
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality,
                  cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        encoded = [cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), params)[1] for im in faces.images]
        pixels = {"jpeg": np.concatenate(encoded), "jpeg_offsets": np.cumsum([0] + [len(e) for e in encoded]),
                  "resolution": np.array(faces.images.shape[1])}
    np.savez_compressed(path, gender=faces.gender, age_group=faces.age_group, age=faces.age, names=faces.names,
                        held_out=faces.held_out, detected=faces.detected, landmarks=faces.landmarks,
                        template=faces.template, meta=np.array(json.dumps(meta)), **pixels)


def _decode_jpegs(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(cv2.imdecode(data[a:b], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                     for a, b in zip(offsets[:-1], offsets[1:])])


def load_packed(path: str | Path) -> PackedFaces:
    with np.load(path, allow_pickle=False) as data:
        images = data["images"] if "images" in data else _decode_jpegs(data["jpeg"], data["jpeg_offsets"])
        return PackedFaces(images=images, gender=data["gender"].astype(np.int64),
                           age_group=data["age_group"].astype(np.int64), age=data["age"].astype(np.int64),
                           names=data["names"], held_out=data["held_out"].astype(bool),
                           detected=data["detected"].astype(bool), landmarks=data["landmarks"],
                           template=data["template"])


def _read_rgb(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(archive.read(member), np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{member}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def align(rgb: np.ndarray, landmarks: np.ndarray, template: np.ndarray, resolution: int) -> np.ndarray:
    """Similarity warp of the landmarks onto the template; warped at 2x then area-downscaled so
    the ~200 px crop is resampled with an anti-aliasing filter rather than point-sampled."""
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template * 2, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("degenerate landmarks")
    big = cv2.warpAffine(rgb, matrix, (2 * resolution, 2 * resolution), flags=cv2.INTER_CUBIC,
                         borderMode=cv2.BORDER_REFLECT101)
    return cv2.resize(big, (resolution, resolution), interpolation=cv2.INTER_AREA)


def pack_utkface(zip_path: Path, out: Path, resolution: int, detect: Callable[[np.ndarray], np.ndarray | None],
                 limit: int | None = None, jpeg_quality: int | None = None,
                 log: Callable[[str], None] = print) -> dict[str, object]:
    """Detect, align and pack every UTKFace crop (or the first ``limit`` by name).

    ``detect`` maps an RGB image to the best face's 5x2 landmarks, or None.
    """
    from pipeline.detect.train_attributes import is_held_out, read_utkface

    samples = read_utkface(zip_path)[:limit]
    template = face_template(resolution)
    landmarks = np.full((len(samples), 5, 2), np.nan, dtype=np.float32)
    start = time.time()
    with zipfile.ZipFile(zip_path) as archive:
        for i, sample in enumerate(samples):
            rgb = _read_rgb(archive, sample.member)
            padded = cv2.copyMakeBorder(rgb, DETECT_PAD, DETECT_PAD, DETECT_PAD, DETECT_PAD, cv2.BORDER_CONSTANT)
            found = detect(padded)
            if found is not None:
                landmarks[i] = found - DETECT_PAD
            if (i + 1) % 1000 == 0:
                log(json.dumps({"detected": i + 1, "of": len(samples), "seconds": round(time.time() - start, 1)}))
        detected = ~np.isnan(landmarks[:, 0, 0])
        if not detected.any():
            raise ValueError("the detector found no face in any crop")
        fallback = np.median(landmarks[detected], axis=0)
        landmarks[~detected] = fallback
        images = np.empty((len(samples), resolution, resolution, 3), dtype=np.uint8)
        for i, sample in enumerate(samples):
            rgb = _read_rgb(archive, sample.member)
            try:
                images[i] = align(rgb, landmarks[i], template, resolution)
            except ValueError:  # a detection too degenerate to fit: one bad face must not end the pack
                detected[i], landmarks[i] = False, fallback
                images[i] = align(rgb, fallback, template, resolution)
    names = np.array([Path(s.member).name for s in samples])
    age = np.array([s.age for s in samples], dtype=np.int64)
    faces = PackedFaces(images=images, gender=np.array([s.gender for s in samples], dtype=np.int64),
                        age_group=age_group_index(age).astype(np.int64), age=age, names=names,
                        held_out=np.array([is_held_out(s) for s in samples]), detected=detected,
                        landmarks=landmarks, template=template)
    report = {"faces": len(samples), "detected": int(detected.sum()), "fallback": int((~detected).sum()),
              "held_out": int(faces.held_out.sum()), "resolution": resolution, "zip": str(zip_path),
              "jpeg_quality": jpeg_quality, "seconds": round(time.time() - start, 1),
              "fallback_landmarks": fallback.round(2).tolist()}
    write_packed(out, faces, report, jpeg_quality)
    return report
