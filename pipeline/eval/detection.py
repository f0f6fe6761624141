"""WIDER FACE evaluation of the detector: AP per setting, recall and false boxes, timing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.detect import RetinaFaceDetector
from pipeline.detect.detector import ANONYMIZE_THRESHOLD
from pipeline.eval.wider import evaluate, load_wider, low_scores_by_size, recall_and_false_boxes
from pipeline.image_io import load_image

# Thresholds at which recall and false boxes per photo are reported, to choose the default.
REPORT_THRESHOLDS = (0.02, 0.1, 0.2, 0.3, 0.5, 0.8)


def evaluate_detector(
    detector: RetinaFaceDetector, wider_root: Path, threshold: float = 0.02, limit: int | None = None
) -> dict:
    samples = load_wider(wider_root)[:limit]
    predictions: dict[str, np.ndarray] = {}
    seconds = 0.0
    for sample in samples:
        image = load_image(wider_root / "images" / sample.relpath)
        start = time.perf_counter()
        faces = detector.detect(image, threshold=threshold)
        seconds += time.perf_counter() - start
        predictions[sample.relpath] = np.array(
            [[*face.box, face.score] for face in faces], dtype=np.float64
        ).reshape(-1, 5)
    ap = evaluate(predictions, samples)
    operating_points = {
        f"{t:g}": recall_and_false_boxes(predictions, samples, score_threshold=t)
        for t in REPORT_THRESHOLDS
        if t >= threshold
    }
    return {
        "images": len(samples),
        "ap": {k: round(v, 4) for k, v in ap.items()},
        "seconds_per_image": round(seconds / max(len(samples), 1), 4),
        "operating_points": operating_points,
        # what the anonymizer's "doubtful box" rule (AnonymizerConfig.doubtful_*) weighs
        "low_scores_by_size": low_scores_by_size(predictions, samples, floor=max(threshold, ANONYMIZE_THRESHOLD)),
    }
