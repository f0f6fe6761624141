"""The eigenface generator: fitting, conditioning, the file format, and the shipped model's faces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline.cli as cli
from pipeline.generate.eigenfaces import (
    NUM_CLASSES,
    EigenfaceGenerator,
    fit_eigenfaces,
    load_eigenfaces,
    save_eigenfaces,
)
from pipeline.generate.matching import SyntheticFaceSource, Target
from pipeline.types import AGE_GROUPS, GENDERS
from tests.conftest import shared_path

SIDE = 12


def _toy_faces(per_class: int = 40, seed: int = 0):
    """Images whose class sets a symmetric brightness level and whose yaw shifts a left/right
    contrast (which mirroring reverses, as a turned head does), plus noise."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(NUM_CLASSES), per_class)
    poses = np.stack([rng.normal(0, 0.15, len(classes)), rng.normal(0.08, 0.1, len(classes))], axis=1)
    ramp = np.linspace(-1, 1, SIDE)[None, :, None]
    images = 40 + 20 * classes[:, None, None, None] + 60 * poses[:, 0, None, None, None] * ramp
    images = images + rng.normal(0, 3, (len(classes), SIDE, SIDE, 3))
    return np.clip(images, 0, 255).astype(np.uint8), classes, poses


def _one_hot(index: int, count: int = 1) -> torch.Tensor:
    c = torch.zeros(count, NUM_CLASSES)
    c[:, index] = 1
    return c


def test_fit_learns_each_class_and_the_pose_and_sampling_is_seeded():
    images, classes, poses = _toy_faces()
    model = fit_eigenfaces(images, classes, poses, components=8)
    z = torch.zeros(1, model.z_dim)
    for index in (0, 3, 7):
        typical = model(z, _one_hot(index)).mean().item()
        expected = (40 + 20 * index) / 127.5 - 1
        assert typical == pytest.approx(expected, abs=0.03)
    # A yaw to image-right brightens the right side, as in the training images.
    turned = model(z, _one_hot(2), pose=torch.tensor([[0.3, 0.08]]))[0]
    assert (turned[:, :, -3:].mean() - turned[:, :, :3].mean()).item() > 0.15
    mirrored = model(z, _one_hot(2), pose=torch.tensor([[-0.3, 0.08]]))[0]
    assert (mirrored[:, :, -3:].mean() - mirrored[:, :, :3].mean()).item() < -0.15
    # Different latents give different faces; truncation 0 gives the class's typical face.
    draws = torch.randn(2, model.z_dim, generator=torch.Generator().manual_seed(1))
    a, b = model(draws, _one_hot(4, 2))
    assert (a - b).abs().mean().item() > 0.01
    assert torch.allclose(model(draws, _one_hot(4, 2), truncation_psi=0.0)[0], model(z, _one_hot(4))[0], atol=1e-5)
    again = fit_eigenfaces(images, classes, poses, components=8)
    assert torch.allclose(again(draws, _one_hot(4, 2)), model(draws, _one_hot(4, 2)), atol=1e-4)


def test_fit_refuses_a_missing_class_and_the_model_needs_a_label():
    images, classes, poses = _toy_faces()
    keep = classes != 5
    with pytest.raises(ValueError, match=r"classes \[5\]"):
        fit_eigenfaces(images[keep], classes[keep], poses[keep], components=4)
    model = EigenfaceGenerator(SIDE, 4)
    with pytest.raises(ValueError, match="conditional"):
        model(torch.zeros(1, 4))


def test_file_round_trip_is_close_and_other_files_are_refused(tmp_path):
    images, classes, poses = _toy_faces()
    model = fit_eigenfaces(images, classes, poses, components=8)
    path = tmp_path / "eigen.pt"
    save_eigenfaces(model, path, {"data": "toy"})
    loaded = load_eigenfaces(path)
    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    c = torch.eye(NUM_CLASSES)
    pose = torch.full((8, 2), 0.1)
    assert (loaded(z, c, pose=pose) - model(z, c, pose=pose)).abs().max().item() < 0.02
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(ValueError, match="not a facechange eigenface model"):
        load_eigenfaces(other)
    with pytest.raises(FileNotFoundError, match="train-eigenfaces"):
        load_eigenfaces(tmp_path / "missing.pt")


def test_shipped_model_makes_faces_our_detector_finds_with_the_asked_gender(anonymizer):
    """The embedded eigenface model, through the same pools the anonymizer uses."""
    source = SyntheticFaceSource(load_eigenfaces(), anonymizer.analyze_synthetic, None, torch.device("cpu"),
                                 pool_size=8, max_draws=16, sampling_kwargs={"truncation_psi": 0.8})
    for gender in GENDERS:
        for group in AGE_GROUPS:
            pool = source.pool(Target(gender, group))
            assert pool.detected / pool.draws >= 0.9, (gender, group, pool)
            assert len(pool.faces) >= 1, (gender, group)  # some are clearly the asked gender and age group


def test_train_eigenfaces_cli_on_a_subset(tmp_path, capsys, model_cache, monkeypatch):
    zip_path = shared_path("data/utkface.zip")
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    out = tmp_path / "eigen.pt"
    assert cli.main(["train-eigenfaces", "--utkface", str(zip_path), "--out", str(out), "--limit", "160",
                     "--resolution", "32", "--components", "12", "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faces"] >= 150 and sum(report["faces_per_class"]) == report["faces"]
    assert "--limit 160" in report["command"]
    model = load_eigenfaces(out)
    assert model.resolution == 32 and model.z_dim == 12
    z = torch.randn(NUM_CLASSES, 12, generator=torch.Generator().manual_seed(0))  # seeded: the bound is statistical
    images = model(z, torch.eye(NUM_CLASSES))
    assert images.shape == (NUM_CLASSES, 3, 32, 32) and images.abs().max().item() < 1.6


def test_resemblance_counts_generated_faces_that_match_a_training_person():
    from pipeline.eval.generator import resemblance_to_training

    rng = np.random.default_rng(0)
    training = rng.normal(size=(50, 16))
    training /= np.linalg.norm(training, axis=1, keepdims=True)
    strangers = rng.normal(size=(20, 16))
    strangers /= np.linalg.norm(strangers, axis=1, keepdims=True)
    copies = np.concatenate([training[:5], strangers[:15]])  # a quarter reproduce training people
    report = resemblance_to_training(copies, strangers, training, threshold=0.9)
    assert report["generated_matching_a_training_person"] == 0.25
    assert report["held_out_matching_a_training_person"] == 0.0
    assert report["generated_nearest_similarity"]["max"] > 0.99 > report["held_out_nearest_similarity"]["max"]


def test_eval_generator_cli_reports_every_target_and_resemblance(tmp_path, capsys, model_cache, monkeypatch):
    arcface = shared_path("models/arcface_mobilefacenet.onnx")
    zip_path = shared_path("data/utkface.zip")
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    out = tmp_path / "generator.json"
    assert cli.main(["eval-generator", "--arcface", str(arcface), "--utkface", str(zip_path), "--per-target", "2",
                     "--reference", "24", "--training-faces", "40", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["generator"].startswith("eigenfaces")
    assert len(report["targets"]) == 8 and all(t["declared_reachable"] for t in report["targets"].values())
    assert report["raw"]["detection_rate"] >= 0.9
    assert 0 <= report["overall"]["gender_hit_rate"] <= 1 and report["overall"]["faces"] == 16
    resemblance = report["resemblance_to_training_people"]
    assert resemblance["training_faces"] >= 35 and 0 <= resemblance["generated_matching_a_training_person"] <= 1
