"""The always-available swap: align a synthetic face by its 5 landmarks, match colour, light,
sharpness and grain to the target, and blend it in under a soft face-shaped mask."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.swap.masks import face_region
from pipeline.swap.obscure import composite, noise_sigma
from pipeline.types import Face


def similarity_transform(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """The 2x3 rotation + uniform scale + shift that best maps source landmarks onto target ones."""
    matrix, _ = cv2.estimateAffinePartial2D(source_points.astype(np.float32), target_points.astype(np.float32),
                                            method=cv2.LMEDS)
    if matrix is None:  # degenerate landmarks (all on a line): least squares over all points
        matrix = cv2.estimateAffinePartial2D(source_points.astype(np.float32), target_points.astype(np.float32))[0]
    return matrix


def _lab_stats(lab: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = weight[:, :, None]
    total = max(float(weight.sum()), 1e-6)
    mean = (lab * w).sum(axis=(0, 1)) / total
    std = np.sqrt(((lab - mean) ** 2 * w).sum(axis=(0, 1)) / total)
    return mean, np.maximum(std, 1e-3)


def match_colour(face: np.ndarray, reference: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Give the face the photo's light and skin colour, keeping only its own shading detail.

    Lightness: the face's Lab L is moved onto the reference's mean and spread inside the face.
    Colour: a and b are the reference's own, low-passed at a scale far coarser than facial
    features (so no identity comes with them), plus half of the face's finer colour detail
    (lips, eyes). Rendered or GAN faces carry odd tints (blue eye sockets, grey skin); taking
    the coarse colour from the photo removes them and matches the scene's white balance.
    Taking the photo's coarse lightness as well (the synthetic face's fine detail only) looked
    more evenly lit but measured worse on 93 synthetic faces of eval-anonymize: re-identified
    0.42 vs 0.30, still detected 0.92 vs 0.98 (the original's face-shape shading carries identity).
    """
    face_lab = cv2.cvtColor(face, cv2.COLOR_RGB2LAB).astype(np.float32)
    ref_lab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float32)
    face_mean, face_std = _lab_stats(face_lab, weight)
    ref_mean, ref_std = _lab_stats(ref_lab, weight)
    gain = float(np.clip(ref_std[0] / face_std[0], 0.6, 1.5))
    out = np.empty_like(face_lab)
    out[:, :, 0] = (face_lab[:, :, 0] - face_mean[0]) * gain + ref_mean[0]
    size = max(float(np.sqrt(weight.sum())), 4.0)
    coarse = max(1.0, size / 6)
    for ch in (1, 2):
        ref_low = _masked_lowpass(ref_lab[:, :, ch], weight, coarse)
        face_detail = face_lab[:, :, ch] - _masked_lowpass(face_lab[:, :, ch], weight, coarse)
        out[:, :, ch] = ref_low + 0.5 * face_detail
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def _masked_lowpass(channel: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass that only averages pixels inside the face (normalized convolution)."""
    soft = cv2.GaussianBlur(weight, (0, 0), sigma)
    blurred = cv2.GaussianBlur(channel * weight, (0, 0), sigma)
    inside = blurred / np.maximum(soft, 1e-4)
    fallback = float((channel * weight).sum() / max(float(weight.sum()), 1e-6))
    return np.where(soft > 1e-3, inside, fallback)


def _detail(image: np.ndarray, weight: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    return float(np.sqrt((lap**2 * weight).sum() / max(float(weight.sum()), 1e-6)))


def match_sharpness(face: np.ndarray, reference: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Blur the face until its fine detail is no higher than the reference's.

    A 30 px bystander in a soft photo must not get a crisp face; the reverse (a sharp photo and
    an upscaled face) is handled by grain, since detail cannot be invented here.
    """
    target = _detail(reference, weight)
    best = face
    for sigma in (0.6, 0.9, 1.3, 1.8, 2.5, 3.5):
        if _detail(best, weight) <= target * 1.1:
            break
        best = cv2.GaussianBlur(face, (0, 0), sigma)
    return best


# Measured by eye on group photos: Poisson cloning follows the scene's shading better but can
# carry a bright background into the face along the mask border; feathering never does.
BLENDS = ("feather", "poisson")


def poisson_blend(face: np.ndarray, window: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Gradient-domain blend: the synthetic face's features under the photo's own light.

    Poisson cloning keeps the face's gradients and takes the absolute brightness and colour
    from the photo along the mask's border, so shading across the face follows the scene.
    """
    region = (weight > 0.02).astype(np.uint8) * 255
    ys, xs = np.nonzero(region)
    if ys.size == 0 or ys.min() == 0 or xs.min() == 0 or ys.max() >= region.shape[0] - 1 \
            or xs.max() >= region.shape[1] - 1:
        return face  # seamlessClone needs a margin around the mask: keep the colour-matched face
    center = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    return cv2.seamlessClone(face, window, region, center, cv2.NORMAL_CLONE)


# JPEG's 8 x 8 blocks show as extra contrast across block edges. Ratio of the mean step across
# block edges to the mean step inside blocks: 1.09 for the example photo as stored, 1.23 / 1.33 /
# 1.52 after JPEG at quality 75 / 50 / 30; WIDER photos 1.11-1.39. A generated face is smooth, so
# pasted into a blocky photo it would be the one clean patch: it is compressed at the quality that
# gives it the blocking of the photo around it. Only where blocks show (about quality 60 and
# below): matching from 1.15 changed nothing visible on the 14 benchmark photos but cost age-group
# retention (0.763 -> 0.742, re-identified 0.161 -> 0.174); from 1.25 both are unchanged.
JPEG_VISIBLE = 1.25
JPEG_QUALITIES = (90, 80, 70, 60, 50, 40, 30, 20, 10)


def blockiness(grey: np.ndarray, x0: int = 0, y0: int = 0) -> float:
    """Block-edge over in-block step of a grey patch whose top-left pixel is (x0, y0) in the photo."""
    g = grey.astype(np.float32)
    dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
    if dx.shape[1] < 8 or dy.shape[0] < 8:
        return 1.0
    at_x = (np.arange(dx.shape[1]) + x0) % 8 == 7
    at_y = (np.arange(dy.shape[0]) + y0) % 8 == 7
    edge = dx[:, at_x].mean() + dy[at_y].mean()
    inside = dx[:, ~at_x].mean() + dy[~at_y].mean()
    return float(edge / max(inside, 1e-6))


def jpeg_round_trip(window: np.ndarray, x0: int, y0: int, quality: int) -> np.ndarray:
    """The window as it would come out of the photo's JPEG at ``quality``, on the photo's block grid."""
    top, left = y0 % 8, x0 % 8
    padded = cv2.copyMakeBorder(window, top, 0, left, 0, cv2.BORDER_REPLICATE)
    encoded = cv2.imencode(".jpg", padded[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[top:, left:, ::-1])


def match_jpeg(face: np.ndarray, image: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """The face window compressed until its blocking matches the photo's around it."""
    height, width = image.shape[:2]
    pad_y, pad_x = rows.stop - rows.start, cols.stop - cols.start  # context: the window's own size around it
    y0, x0 = max(0, rows.start - pad_y), max(0, cols.start - pad_x)
    context = cv2.cvtColor(image[y0:min(height, rows.stop + pad_y), x0:min(width, cols.stop + pad_x)],
                           cv2.COLOR_RGB2GRAY)
    target = blockiness(context, x0, y0)
    if target < JPEG_VISIBLE:
        return face
    best, best_gap = face, np.inf
    for quality in JPEG_QUALITIES:  # falling quality, rising blocking: stop at the closest
        candidate = jpeg_round_trip(face, cols.start, rows.start, quality)
        gap = blockiness(cv2.cvtColor(candidate, cv2.COLOR_RGB2GRAY), cols.start, rows.start) - target
        if abs(gap) < best_gap:
            best, best_gap = candidate, abs(gap)
        if gap >= 0:
            break
    return best


def _edge_ramp(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """1 inside, falling linearly to 0 at the border over ``fraction`` of the shorter side."""
    height, width = shape
    fade = max(1.0, fraction * min(height, width))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    distance = np.minimum(np.minimum(xs + 0.5, width - 0.5 - xs), np.minimum(ys + 0.5, height - 0.5 - ys))
    return np.clip(distance / fade, 0.0, 1.0)


def paste_synthetic(image: np.ndarray, target: Face, synthetic: np.ndarray, synthetic_landmarks: np.ndarray,
                    mask: np.ndarray, rng: np.random.Generator, blend: str = "feather") -> None:
    """Replace the target face in ``image`` (in place) by the aligned, matched synthetic face."""
    rows, cols = face_region(target, image.shape[:2], grow=1.3)
    origin = np.array([cols.start, rows.start], np.float32)
    window = image[rows, cols]
    height, width = window.shape[:2]
    matrix = similarity_transform(synthetic_landmarks, target.landmarks - origin)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    source = synthetic
    if scale < 0.8:  # shrinking: low-pass first so the warp does not alias
        source = cv2.GaussianBlur(synthetic, (0, 0), 0.45 / scale)
    warped = cv2.warpAffine(source, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    # Only where the synthetic image really is (its reflected border is no face), fading out over
    # its outer tenth: a face framed tightly (forehead cut at the top) must not end in a hard line.
    coverage = cv2.warpAffine(_edge_ramp(synthetic.shape[:2], 0.1), matrix, (width, height),
                              flags=cv2.INTER_LINEAR, borderValue=0.0)
    if scale > 1.5:  # enlarging a small generated face: restore some edge contrast the upscale lost
        soft = cv2.GaussianBlur(warped, (0, 0), 0.5 * scale)
        warped = cv2.addWeighted(warped, 1.6, soft, -0.6, 0)
    weight = mask[rows, cols] * coverage
    core = (weight > 0.5).astype(np.float32)
    if core.sum() < 4:
        return
    warped = match_colour(warped, window, core)
    if blend == "poisson":
        warped = poisson_blend(warped, window, weight)
    warped = match_sharpness(warped, window, core)
    missing_noise = max(0.0, noise_sigma(window) ** 2 - noise_sigma(warped) ** 2) ** 0.5
    grained = warped.astype(np.float32) + rng.normal(0, missing_noise, size=(height, width, 1))
    compressed = match_jpeg(np.clip(np.rint(grained), 0, 255).astype(np.uint8), image, rows, cols)
    full_weight = np.zeros_like(mask)
    full_weight[rows, cols] = weight
    composite(image, compressed, full_weight, rows, cols)
