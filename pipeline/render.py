"""Preview images: numbered face boxes as the user sees them before choosing whom to keep."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.types import Face

KEPT_RGB = (40, 200, 80)
REPLACED_RGB = (255, 120, 0)


def draw_numbered_faces(image_rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
    """A copy of the image with each face boxed and its number in a label above (or inside) it.

    Line width and label size follow the image size so that numbers stay readable both on a
    phone photo shown small in a chat and on a crowd where faces are 20 px wide.
    """
    canvas = image_rgb.copy()
    height, width = canvas.shape[:2]
    line = max(1, round(max(height, width) / 500))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for face in faces:
        colour = KEPT_RGB if face.keep else REPLACED_RGB
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, line, cv2.LINE_AA)
        label = str(face.number if face.number is not None else "?")
        font_scale = max(0.4, min(2.5, max(face.width, 24.0) / 60.0, max(height, width) / 1200))
        thickness = max(1, round(font_scale * 2))
        (text_w, text_h), baseline = cv2.getTextSize(label, font, font_scale, thickness)
        pad = max(2, thickness)
        top = y1 - text_h - baseline - 2 * pad
        if top < 0:  # no room above the face: put the label inside its top edge
            top = y1
        left = min(max(x1, 0), max(width - text_w - 2 * pad, 0))
        bottom = top + text_h + baseline + 2 * pad
        cv2.rectangle(canvas, (left, top), (left + text_w + 2 * pad, bottom), colour, -1)
        cv2.putText(canvas, label, (left + pad, bottom - baseline - pad), font, font_scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return canvas
