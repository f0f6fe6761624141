"""`facechange train-eigenfaces`: fit the eigenface model on UTKFace's training faces.

Each crop is aligned to the generator template (``face_template``) by the landmarks our
detector finds on it, the same landmarks (and cache) the attribute heads train with; crops
where the detector finds nothing are left out. The held-out tenth is never used, so
``eval-generator`` can compare samples with faces the model has not seen.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline.detect.attributes import age_group_index
from pipeline.detect.detector import RetinaFaceDetector
from pipeline.detect.train_attributes import _read_crop, cached_landmarks, detect_crop_landmarks, split_utkface
from pipeline.generate.dataset import align, class_index, face_template
from pipeline.generate.eigenfaces import fit_eigenfaces, save_eigenfaces
from pipeline.types import landmark_pose


def run_eigenface_training(zip_path: Path, out: Path, detector: RetinaFaceDetector, resolution: int = 96,
                           components: int = 192, limit: int | None = None, seed: int = 0,
                           cache: Path | None = None, command: str = "", log=print) -> dict:
    train, _ = split_utkface(zip_path, limit, 0, seed)
    start = time.perf_counter()
    points = cached_landmarks(cache, f"landmarks-train-{len(train)}-s{seed}",
                              lambda: detect_crop_landmarks(detector, zip_path, train, log))
    landmarks_seconds = time.perf_counter() - start
    template = face_template(resolution)
    images, classes, poses = [], [], []
    with zipfile.ZipFile(zip_path) as archive:
        for sample, found in zip(train, points):
            if np.isnan(found).any():
                continue
            try:
                images.append(align(_read_crop(archive, sample), found, template, resolution))
            except ValueError:  # degenerate landmarks: leave the face out
                continue
            classes.append(int(class_index(sample.gender, age_group_index(sample.age))))
            poses.append(landmark_pose(found))
    log(f"aligned {len(images)} of {len(train)} training faces")
    start = time.perf_counter()
    model = fit_eigenfaces(np.stack(images), np.array(classes), np.array(poses), components, seed)
    fit_seconds = time.perf_counter() - start
    counts = np.bincount(classes, minlength=model.c_dim).tolist()
    report = {"faces": len(images), "of": len(train), "faces_per_class": counts, "resolution": resolution,
              "components": components, "landmark_seconds": round(landmarks_seconds, 1),
              "fit_seconds": round(fit_seconds, 1), "command": command}
    save_eigenfaces(model, out, report)
    report["out"] = str(out)
    return report
