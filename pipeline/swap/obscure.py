"""Non-synthetic treatments of a face: a natural-looking blur and a pixelation mosaic.

Both only change pixels under the face's mask; everything else in the photo stays identical.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.swap.masks import face_region
from pipeline.types import Face


def composite(image: np.ndarray, replacement: np.ndarray, mask: np.ndarray, rows: slice, cols: slice) -> None:
    """Blend ``replacement`` (the window's new pixels) into ``image`` in place, weighted by the mask."""
    window = image[rows, cols].astype(np.float32)
    weight = mask[rows, cols][:, :, None]
    blended = window + (replacement.astype(np.float32) - window) * weight
    changed = weight[:, :, 0] > 0
    out = image[rows, cols]
    out[changed] = np.clip(np.rint(blended[changed]), 0, 255).astype(np.uint8)


def noise_sigma(window: np.ndarray) -> float:
    """Sensor/JPEG noise level of a patch (robust MAD of its Laplacian), in grey levels."""
    grey = cv2.cvtColor(window, cv2.COLOR_RGB2GRAY).astype(np.float32)
    laplacian = cv2.Laplacian(grey, cv2.CV_32F)
    return float(np.median(np.abs(laplacian - np.median(laplacian))) * 1.4826 / np.sqrt(20.0))


def blur_face(image: np.ndarray, face: Face, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Blur the face beyond recognition and give it back the photo's grain.

    The blur radius follows the face size (a fifth of it), so a 30 px bystander and a 600 px
    close-up are equally unrecognizable; re-adding noise at the photo's own level keeps the
    patch from looking like a smooth sticker.
    """
    rows, cols = face_region(face, image.shape[:2], grow=1.3)
    window = image[rows, cols]
    sigma = max(1.5, face.size / 5)
    blurred = cv2.GaussianBlur(window, (0, 0), sigma).astype(np.float32)
    noise = rng.normal(0.0, noise_sigma(window), size=blurred.shape[:2])[:, :, None]
    composite(image, np.clip(blurred + noise, 0, 255), mask, rows, cols)


def pixelate_face(image: np.ndarray, face: Face, mask: np.ndarray, blocks_across: int = 8) -> None:
    """Replace the face by a mosaic of about ``blocks_across`` blocks over its width."""
    rows, cols = face_region(face, image.shape[:2], grow=1.3)
    window = image[rows, cols]
    block = max(2, int(round(face.size / blocks_across)))
    small = cv2.resize(window, (max(1, window.shape[1] // block), max(1, window.shape[0] // block)),
                       interpolation=cv2.INTER_AREA)
    mosaic = cv2.resize(small, (window.shape[1], window.shape[0]), interpolation=cv2.INTER_NEAREST)
    # A mosaic reads as deliberate with crisp block edges, so the mask is hardened, not feathered.
    hard = (mask >= 0.5).astype(np.float32)
    composite(image, mosaic, hard, rows, cols)
