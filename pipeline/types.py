"""The typed records that travel between pipeline stages.

A ``Face`` is created by the detector and read by every later stage; per-face decisions
(keep, and later how the face was replaced) are fields on the record, never parallel lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

AGE_GROUPS: tuple[str, ...] = ("0-9", "10-29", "30-59", "60+")
GENDERS: tuple[str, ...] = ("male", "female")


@dataclass
class Face:
    """One detected face in image pixel coordinates (x to the right, y down)."""

    box: np.ndarray  # (4,) float32: x1, y1, x2, y2
    # (5, 2) float32, in image terms: left eye, right eye, nose, left mouth corner, right mouth corner
    landmarks: np.ndarray
    score: float
    gender: str | None = None
    gender_prob: float | None = None
    age_group: str | None = None
    age_group_probs: np.ndarray | None = None  # (len(AGE_GROUPS),)
    age: float | None = None
    number: int | None = None  # 1-based, in reading order, as shown to the user
    keep: bool = False

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """Face size in pixels, the shorter side of the box."""
        return min(self.width, self.height)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 5),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }
        if self.number is not None:
            record["number"] = self.number
        if self.gender is not None:
            record["gender"] = self.gender
            record["gender_prob"] = round(float(self.gender_prob), 4)
        if self.age_group is not None:
            record["age_group"] = self.age_group
            record["age"] = round(float(self.age), 1)
        return record


@dataclass
class DetectionResult:
    """All faces found in one image, numbered in reading order."""

    width: int
    height: int
    faces: list[Face] = field(default_factory=list)
