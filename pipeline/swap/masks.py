"""Soft face-shaped masks from a face's box and landmarks."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.types import Face


def face_region(face: Face, shape: tuple[int, int], grow: float = 1.0) -> tuple[slice, slice]:
    """The image window (rows, cols) that holds the face's mask, clipped to the image."""
    height, width = shape
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = 0.5 * grow * 1.35 * max(face.width, face.height) + 2
    x1, y1 = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
    x2, y2 = int(min(width, np.ceil(cx + half))), int(min(height, np.ceil(cy + half)))
    return slice(y1, y2), slice(x1, x2)


def face_mask(face: Face, shape: tuple[int, int], grow: float = 1.0, feather: float = 0.12) -> np.ndarray:
    """A float32 mask in 0..1 over the whole image: an ellipse covering forehead to chin.

    RetinaFace boxes stop at the eyebrows and the chin and leave out the ears, so the ellipse is
    a little taller than the box and shifted up; its edge is feathered over a fraction of the
    face size so a replaced face blends into hair and skin without a seam.
    """
    height, width = shape
    mask = np.zeros((height, width), np.float32)
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    axes = (0.5 * face.width * 1.08 * grow, 0.5 * face.height * 1.15 * grow)
    center = (cx, cy - 0.04 * face.height)
    angle = _roll_degrees(face)
    scale = 16  # sub-pixel precision for cv2.ellipse's integer arguments
    cv2.ellipse(mask, (int(center[0] * scale), int(center[1] * scale)),
                (max(1, int(axes[0] * scale)), max(1, int(axes[1] * scale))), angle, 0, 360, 1.0, -1,
                cv2.LINE_AA, shift=4)
    sigma = max(0.5, feather * min(face.width, face.height))
    rows, cols = face_region(face, shape, grow * 1.2)
    window = mask[rows, cols]
    if window.size:
        mask[rows, cols] = cv2.GaussianBlur(window, (0, 0), sigma)
    return mask


def _roll_degrees(face: Face) -> float:
    """In-plane rotation of the face from its eye line, so the ellipse follows a tilted head."""
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    if rx - lx <= 1:
        return 0.0
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))


# How far the inner ellipse reaches beyond brows-to-chin, eye to eye. Measured with eval-anonymize
# (14 photos, the 158 faces given a synthetic person): 1.0 left cheeks and jaw line of the original
# and 30% were still re-identified (blur on the same faces: 18%); 1.2 gives 16% and detection
# retention 0.97 (from 0.95), and looks as natural; 1.3-1.6 give 12-4% but the ellipse's edge then
# shows as a translucent oval over hair and forehead.
INNER_MASK_GROW = 1.2
# Under 64 px that edge is a pixel or two wide and does not show, while these faces are most of a
# crowd and the most often re-identified: the original's jaw and brows weigh more in a blurry face.
# eval-anonymize, 80 photos, the 271 faces given a synthetic person: re-identified 0.133 (1.2) ->
# 0.096 (1.4) -> 0.078 (1.5), still detected 0.996 -> 1.0, gender kept 0.940 -> 0.951, age group
# kept 0.758 -> 0.789 (all 340 faces); at 1.6 the edge shows at 3x zoom. 1.3-1.4 from 64 to 128 px
# changed one face of 74, so larger faces keep 1.2.
SMALL_FACE = 64.0
INNER_MASK_GROW_SMALL = 1.5


def inner_face_mask(face: Face, shape: tuple[int, int], feather: float = 0.18) -> np.ndarray:
    """A float32 mask over brows, eyes, nose, mouth and chin, placed by the 5 landmarks.

    This is the part a synthetic face replaces: the target keeps its own hair, ears and face
    outline, which hold the pose and light of the scene, while everything that makes a face
    recognizable comes from the synthetic person.
    """
    height, width = shape
    left_eye, right_eye, _, left_mouth, right_mouth = face.landmarks.astype(np.float64)
    eyes, mouth = (left_eye + right_eye) / 2, (left_mouth + right_mouth) / 2
    eye_distance = float(np.linalg.norm(right_eye - left_eye))
    down = mouth - eyes
    eye_to_mouth = max(float(np.linalg.norm(down)), 1.0)
    # A turned head shows less of its far side: the ellipse narrows and moves away from the nose,
    # so it stops at the far cheek's contour instead of reaching over it into the background.
    yaw = face.pose[0]
    across = (right_eye - left_eye) / max(eye_distance, 1e-3)
    center = eyes + 0.42 * down - 0.5 * yaw * eye_distance * across
    half_width = max(1.0, max(eye_distance, 0.7 * eye_to_mouth) * (1.0 - 0.5 * min(abs(yaw), 0.6)))
    grow = INNER_MASK_GROW_SMALL if face.size < SMALL_FACE else INNER_MASK_GROW
    axes = (grow * half_width, grow * 1.25 * eye_to_mouth)
    angle = float(np.degrees(np.arctan2(down[1], down[0]))) - 90.0
    mask = np.zeros((height, width), np.float32)
    scale = 16
    cv2.ellipse(mask, (int(center[0] * scale), int(center[1] * scale)),
                (int(axes[0] * scale), int(axes[1] * scale)), angle, 0, 360, 1.0, -1, cv2.LINE_AA, shift=4)
    sigma = max(0.5, feather * axes[0])
    rows, cols = face_region(face, shape, 1.3)
    window = mask[rows, cols]
    if window.size:
        # Erode before feathering so the soft edge falls inside the ellipse, not onto the hair.
        eroded = cv2.erode(window, np.ones((3, 3), np.uint8), iterations=max(1, int(sigma)))
        mask[rows, cols] = cv2.GaussianBlur(eroded, (0, 0), sigma)
    return mask
