"""INSwapper backend, run through insightface's own INSwapper on a stand-in ONNX model.

The stand-in has inswapper_128's interface (inputs ``target`` 1x3x128x128 and ``source`` 1x512,
output 1x3x128x128 in 0..1, a 512x512 ``emap`` as the last initializer) and computes
``clip(0.5 * target + 5 * mean(source))``: the face brightens or darkens depending on the sign
of the projected identity, which shows that the emap projection is applied.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from insightface.utils import face_align

from pipeline.weights import CheckpointError
from pipeline.swap.inswapper import InSwapperSwapper

ARCFACE_KPS_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                            [41.5493, 92.3655], [70.7299, 92.2041]])


def build_stand_in(path: Path, emap: np.ndarray) -> None:
    target = helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128])
    source = helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512])
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])
    initializers = [
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array(0.5, np.float32), "a"),
        numpy_helper.from_array(np.array(5.0, np.float32), "b"),
        numpy_helper.from_array(np.array(0.0, np.float32), "low"),
        numpy_helper.from_array(np.array(1.0, np.float32), "high"),
        numpy_helper.from_array(emap.astype(np.float32), "emap"),
    ]
    nodes = [
        helper.make_node("Mul", ["target", "a"], ["scaled"]),
        helper.make_node("ReduceMean", ["source"], ["identity"], keepdims=1),
        helper.make_node("Mul", ["identity", "b"], ["shift"]),
        helper.make_node("Unsqueeze", ["shift", "axes"], ["shift4"]),
        helper.make_node("Add", ["scaled", "shift4"], ["raw"]),
        helper.make_node("Clip", ["raw", "low", "high"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "inswapper_stand_in", [target, source], [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    assert model.graph.initializer[-1].name == "emap"
    onnx.save(model, path)


@pytest.fixture(params=[1.0, -1.0], ids=["emap=I", "emap=-I"])
def stand_in(request, tmp_path) -> tuple[Path, float]:
    path = tmp_path / "inswapper_128.onnx"
    build_stand_in(path, request.param * np.eye(512))
    return path, request.param


def test_insightface_inswapper_runs_the_stand_in_and_changes_only_the_face(stand_in):
    path, sign = stand_in
    image = np.full((300, 400, 3), 200, np.uint8)
    image[:, :40] = 90  # a band far from the face, so that a resample of the whole image would show
    kps = ARCFACE_KPS_112 * 1.2 + (140, 60)
    embedding = np.full(512, 3.0, np.float32)  # not unit length: the wrapper must leave normalising to insightface

    result = InSwapperSwapper(path).swap(image, kps, embedding)

    assert result.shape == image.shape and result.dtype == np.uint8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # insightface's own scikit-image call
        matrix = face_align.estimate_norm(kps, 128)
    footprint = cv2.warpAffine(np.ones((128, 128), np.float32), cv2.invertAffineTransform(matrix),
                               (400, 300), borderValue=0.0)
    outside = footprint == 0
    assert outside.any() and np.array_equal(result[outside], image[outside])
    nose = tuple(int(v) for v in np.rint(kps[2]))
    # latent = normalise(ones @ emap) = sign / sqrt(512); output = 0.5 * pixel + 5 * mean(latent)
    expected = 255 * np.clip(0.5 * 200 / 255 + 5 * sign / np.sqrt(512), 0, 1)
    np.testing.assert_allclose(result[nose[1], nose[0]].astype(float), expected, atol=2)


def test_non_model_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "inswapper_128.onnx"
    path.write_bytes(b"not onnx")
    with pytest.raises(CheckpointError):
        InSwapperSwapper(path)
