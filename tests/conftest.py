"""Shared fixtures: the real detector (loaded once per test session) and the shared data paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pipeline  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(relative: str) -> Path:
    """A path under ../shared, or a skip when the research data is not next to the checkout."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"../shared/{relative} not present (research data lives beside the repo, not in it)")
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def detector(model_cache):
    from pipeline.detect import DetectorConfig, build_detector

    return build_detector(DetectorConfig(), torch.device("cpu"), model_cache)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


# Where the astronaut's face is in skimage's 512x512 photo, measured once by eye on the image.
ASTRONAUT_FACE_BOX = (175.0, 55.0, 275.0, 180.0)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="session")
def anonymizer(model_cache):
    import os

    os.environ.setdefault("FACECHANGE_CACHE_DIR", str(model_cache))
    from pipeline.anonymizer import Anonymizer, AnonymizerConfig

    return Anonymizer(AnonymizerConfig(device="cpu"))


@pytest.fixture(scope="session")
def two_people(astronaut) -> np.ndarray:
    """Two real faces side by side: the astronaut and her mirror image, on a 1024 x 512 photo."""
    return np.ascontiguousarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1))
