"""INSwapper (``inswapper_128.onnx``), run by insightface's own ``INSwapper`` class.

insightface does the alignment (``norm_crop2`` at 128), the identity projection through the
model's ``emap`` initializer, and its own paste-back; keeping its code path means a user's
file behaves exactly as it does in insightface. This wrapper only adapts the calling
convention: RGB images, 5x2 landmarks and a raw 512-d ArcFace embedding.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
from insightface.app.common import Face
from insightface.model_zoo.inswapper import INSwapper

from pipeline.weights import CheckpointError


class InSwapperSwapper:
    def __init__(self, model_path: str | Path, providers: list[str] | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such INSwapper model")
        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
            with contextlib.redirect_stdout(io.StringIO()):  # INSwapper prints its input shape
                self.model = INSwapper(model_file=str(path), session=session)
        except Exception as exc:  # onnx / onnxruntime raise many types for a bad file
            raise CheckpointError(f"{path}: not an INSwapper ONNX model ({type(exc).__name__}: {exc})") from exc
        names = [item.name for item in session.get_inputs()]
        if len(names) != 2 or self.model.emap.shape != (512, 512):
            raise CheckpointError(f"{path}: expected inputs (target, source) and a 512x512 emap, "
                                  f"found inputs {names} and emap {self.model.emap.shape}")

    def swap(self, image_rgb: np.ndarray, target_kps: np.ndarray, source_embedding: np.ndarray) -> np.ndarray:
        """The image with the face at ``target_kps`` (5x2, image pixels) given the source identity."""
        target = Face(kps=np.asarray(target_kps, dtype=np.float32).reshape(5, 2))
        source = Face(embedding=np.asarray(source_embedding, dtype=np.float32).reshape(-1))
        bgr = np.ascontiguousarray(image_rgb[..., ::-1])
        with warnings.catch_warnings():
            # insightface 2.1 aligns with a scikit-image call deprecated in 0.26; nothing a user can act on.
            warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")
            swapped = self.model.get(bgr, target, source, paste_back=True)
        return np.ascontiguousarray(swapped[..., ::-1])
