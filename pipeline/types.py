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


TREATMENTS: tuple[str, ...] = ("synthetic", "blur", "pixelate")


# Why a face got the blur instead of a synthetic face: code -> English text (front ends translate
# by code; the text is what the CLI's JSON reports as "fallback_reason").
FALLBACK_REASONS: dict[str, str] = {
    "doubtful": "large box with a low score ({score:g}): maybe not a face",
    "too_small": "face under {size:g} px",
    "profile": "profile face",
    "unreachable": "the generator cannot make {gender} {age_group} faces",
    "pose": "no synthetic face in this pose",
    "no_match": "no generated face met the target",
}


@dataclass(frozen=True)
class Fallback:
    code: str  # a key of FALLBACK_REASONS
    values: tuple[tuple[str, Any], ...] = ()  # what its text mentions

    @property
    def text(self) -> str:
        return FALLBACK_REASONS[self.code].format(**dict(self.values))


@dataclass
class Replacement:
    """What the anonymizer did to one face that was not kept."""

    treatment: str  # one of TREATMENTS: what was actually applied
    fallback: Fallback | None = None  # why it differs from the requested mode, if it does
    seed: int | None = None  # the per-face seed: re-rolling one face means changing only this
    latent: list[float] | None = None  # the generator latent the synthetic face came from
    # With the latent and the face's gender / age group, what it takes to make that face again:
    # the pose a pose-conditioned generator drew it at, and whether it was used mirrored.
    pose_condition: tuple[float, float] | None = None
    mirrored: bool | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"treatment": self.treatment}
        if self.fallback:
            record["fallback_reason"] = self.fallback.text
            record["fallback_code"] = self.fallback.code
        if self.seed is not None:
            record["seed"] = self.seed
        if self.latent is not None:
            record["latent"] = [round(float(v), 5) for v in self.latent]
        if self.pose_condition is not None:
            record["pose_condition"] = [round(float(v), 4) for v in self.pose_condition]
        if self.mirrored is not None:
            record["mirrored"] = self.mirrored
        return record


def landmark_pose(landmarks: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) estimated from 5 landmarks, both about -0.5..0.5, 0 when frontal.

    yaw: horizontal offset of the nose from the eyes' midpoint over the eye distance (positive
    when the nose points to image-right); pitch: where the nose sits between the eye line and
    the mouth line, relative to a frontal face's ~0.5.
    """
    left_eye, right_eye, nose, left_mouth, right_mouth = landmarks
    eyes = (left_eye + right_eye) / 2
    mouth = (left_mouth + right_mouth) / 2
    eye_distance = max(float(np.linalg.norm(right_eye - left_eye)), 1e-3)
    yaw = float(nose[0] - eyes[0]) / eye_distance
    span = float(mouth[1] - eyes[1])
    pitch = float(nose[1] - eyes[1]) / span - 0.55 if abs(span) > 1e-3 else 0.0
    return yaw, pitch


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
    replacement: Replacement | None = None  # how the anonymizer treated it (None: not yet, or kept)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def pose(self) -> tuple[float, float]:
        return landmark_pose(self.landmarks)

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
        if self.keep or self.replacement is not None:  # set once the user's choice is applied
            record["kept"] = self.keep
        if self.replacement is not None:
            record.update(self.replacement.to_json())
        return record


@dataclass
class DetectionResult:
    """All faces found in one image, numbered in reading order."""

    width: int
    height: int
    faces: list[Face] = field(default_factory=list)
