"""StyleGAN2-ADA trainer: ADA, the discriminator, a tiny training run, resume, the ship file, packing.

The training tests run the 'tiny' preset (16 px, 32 channels) at batch 4 on a fake dataset of
crops of skimage's sample photos, so they need nothing from ../shared; the packing test reads
30 real UTKFace faces and is skipped without them.
"""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.generate.augment import AugmentPipe, ada_adjust
from pipeline.generate.checkpoint import load_trained_generator
from pipeline.generate.dataset import PackedFaces, face_template, load_packed, pack_utkface, write_packed
from pipeline.generate.discriminator import Discriminator
from pipeline.generate.stylegan2 import Generator
from pipeline.generate.train import TrainConfig, Trainer
from tests.conftest import shared_path

RES = 16


def _fake_faces(n: int = 48) -> PackedFaces:
    """Random 16 px crops of skimage photos with random labels; every 8th is 'held out' and
    painted pure white, so a trainer that used it would be caught by the data it holds."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    rng = np.random.default_rng(0)
    images = np.empty((n, RES, RES, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(64, min(photo.shape[:2])))
        y, x = (int(rng.integers(0, photo.shape[d] - side + 1)) for d in (0, 1))
        images[i] = cv2.resize(photo[y:y + side, x:x + side], (RES, RES), interpolation=cv2.INTER_AREA)
    held_out = np.arange(n) % 8 == 0
    images[held_out] = 255
    age = rng.integers(1, 90, n)
    return PackedFaces(images=images, gender=rng.integers(0, 2, n),
                       age_group=np.searchsorted([10, 30, 60], age, "right"), age=age,
                       names=np.array([f"{a}_{i}.jpg" for i, a in enumerate(age)]), held_out=held_out,
                       detected=np.ones(n, bool), landmarks=np.zeros((n, 5, 2), np.float32),
                       template=face_template(RES))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --- ADA ----------------------------------------------------------------------------------
def test_ada_adjust_follows_the_sign_of_d_on_reals():
    p = torch.tensor(0.5)
    overfit = torch.tensor([4.0, 2.0, 1.0, 3.0]).sign().mean()  # D calls every real real: r_t = 1
    unsure = torch.tensor([3.0, 2.0, -5.0, -0.1]).sign().mean()  # r_t = 0 < target 0.6
    assert ada_adjust(p, overfit, 0.6, 64, 4, 500) > p
    assert ada_adjust(p, unsure, 0.6, 64, 4, 500) < p
    step = float(ada_adjust(p, overfit, 0.6, 64, 4, 500) - p)
    assert step == pytest.approx(64 * 4 / 500_000, rel=1e-4)  # 0 -> 1 takes 500 kimg
    assert float(ada_adjust(torch.tensor(0.0), unsure, 0.6, 64, 4, 500)) == 0.0
    assert float(ada_adjust(torch.tensor(1.0), overfit, 0.6, 64, 4, 500)) == 1.0


def test_augment_pipe_identity_at_p0_and_differentiable_at_p1():
    torch.manual_seed(0)
    x = torch.rand(6, 3, RES, RES) * 2 - 1
    torch.testing.assert_close(AugmentPipe(0.0)(x), x, rtol=0, atol=1e-5)
    x.requires_grad_(True)
    y = AugmentPipe(1.0)(x)
    assert y.shape == x.shape
    assert (y - x).abs().mean() > 0.05
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_augment_pipe_geometry_adds_no_borders():
    """Reflection padding: however an image is moved, scaled or rotated, a flat image stays flat
    (the colour transforms are global per image), so D cannot spot augmented images by borders."""
    torch.manual_seed(1)
    flat = torch.full((8, 3, 32, 32), 0.3)
    out = AugmentPipe(1.0)(flat)
    assert out.shape == flat.shape
    assert out.flatten(2).std(dim=2).max() < 1e-4
    assert out.flatten(1).std(dim=0).max() > 0.01  # but each image got its own colour change


# --- networks -----------------------------------------------------------------------------
def test_discriminator_has_nvidia_names_and_projects_the_label():
    kwargs = {"c_dim": 8, "img_resolution": RES, "img_channels": 3, "channel_base": 512, "channel_max": 32,
              "conv_clamp": 256, "epilogue_kwargs": {"mbstd_group_size": 4}}
    D = Discriminator(**kwargs)
    keys = set(D.state_dict())
    for key in ["b16.fromrgb.weight", "b16.conv0.weight", "b16.conv1.bias", "b16.skip.weight", "b8.conv0.weight",
                "b4.conv.weight", "b4.fc.weight", "b4.out.weight", "mapping.embed.weight", "mapping.fc7.weight",
                "b16.resample_filter", "b16.conv1.resample_filter"]:
        assert key in keys, key
    assert "b8.fromrgb.weight" not in keys and "b16.skip.bias" not in keys
    assert D.b4.out.weight.shape == (32, 32)  # cmap_dim = channels at 4x4
    img = torch.randn(4, 3, RES, RES)
    c0, c7 = torch.zeros(4, 8), torch.zeros(4, 8)
    c0[:, 0], c7[:, 7] = 1, 1
    out = D(img, c0)
    assert out.shape == (4, 1)
    assert not torch.allclose(out, D(img, c7))


# --- training -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, object]:
    """Through the CLI: 2 steps and a snapshot; then in-process: 2 more steps from that snapshot,
    and a straight 4-step run for comparison."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("train-generator")
    faces = _fake_faces()
    data_path = root / "fake.npz"
    write_packed(data_path, faces, {"fake": True})
    outdir = root / "run"
    assert main(["train-generator", "--data", str(data_path), "--outdir", str(outdir), "--preset", "tiny",
                 "--batch", "4", "--max-kimg", "0.008", "--device", "cpu", "--seed", "3"]) == 0
    snapshot = outdir / "network-snapshot-000000.pt"
    state = torch.load(snapshot, map_location="cpu", weights_only=True)
    data = load_packed(data_path)
    resumed = Trainer.resume(snapshot, data, root / "resumed", torch.device("cpu"))
    resumed_at = (resumed.cur_nimg, resumed.iteration, resumed.augment_p)
    resumed_state = {k: v.clone() for k, v in resumed.G.state_dict().items()}
    resumed.train(max_kimg=0.016, log=lambda line: None)
    straight = Trainer(TrainConfig(**state["config"]), data, root / "straight", torch.device("cpu"), seed=3)
    logs: list[dict[str, float]] = []
    straight.train(max_kimg=0.016, log=lambda line: logs.append(json.loads(line)))
    return {"outdir": outdir, "state": state, "resumed": resumed, "resumed_at": resumed_at,
            "resumed_state": resumed_state, "straight": straight, "logs": logs, "faces": faces}


def test_training_steps_are_finite_and_ema_lags(run):
    state = run["state"]
    assert state["kimg"] == pytest.approx(0.008) and state["iteration"] == 2
    assert set(state) >= {"G", "G_ema", "D", "G_opt", "D_opt", "augment_p", "kimg", "init_kwargs"}
    assert state["init_kwargs"]["G"]["c_dim"] == 8 and "mapping.embed.weight" in state["G"]
    ticks = [line for line in run["logs"] if "loss_G" in line]
    assert ticks and all(np.isfinite(t["loss_G"]) and np.isfinite(t["loss_D"]) for t in ticks)
    assert any("r1" in t for t in ticks) and any("pl" in t for t in ticks)
    straight = run["straight"]
    assert all(torch.isfinite(p).all() for p in straight.G.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(straight.G.parameters(), straight.G_ema.parameters()))
    assert not torch.equal(straight.G.mapping.w_avg, torch.zeros_like(straight.G.mapping.w_avg))
    assert len(straight.images) == int((~run["faces"].held_out).sum())
    assert not (straight.images == 255).all(dim=(1, 2, 3)).any()  # the white held-out faces stay out
    outdir = run["outdir"]
    assert (outdir / "G_ema-000000.fp16.pt").is_file() and (outdir / "fakes-000000.png").is_file()


def test_resume_continues_exactly(run):
    resumed, state = run["resumed"], run["state"]
    assert run["resumed_at"] == (state["cur_nimg"], state["iteration"], state["augment_p"])
    _assert_same_state(run["resumed_state"], state["G"])
    # 2 steps + resume + 2 steps is the same computation as 4 steps in one go.
    straight = run["straight"]
    assert resumed.cur_nimg == straight.cur_nimg == 16
    _assert_same_state(resumed.G.state_dict(), straight.G.state_dict())
    _assert_same_state(resumed.D.state_dict(), straight.D.state_dict())
    _assert_same_state(resumed.G_ema.state_dict(), straight.G_ema.state_dict())
    assert resumed.augment_p == straight.augment_p


def test_ship_file_loads_and_is_conditional(run):
    G = load_trained_generator(run["outdir"] / "G_ema-000000.fp16.pt")
    assert isinstance(G, Generator) and not G.training
    assert all(p.dtype == torch.float32 for p in G.parameters())
    z = torch.randn(2, G.z_dim)
    c = torch.zeros(2, 8)
    c[0, 0], c[1, 7] = 1, 1
    with torch.no_grad():
        img = G(z[[0, 0]], c, noise_mode="const")
    assert img.shape == (2, 3, RES, RES) and torch.isfinite(img).all()
    assert (img[0] - img[1]).abs().mean() > 1e-3  # same z, other class: another face
    full = Generator(**run["state"]["init_kwargs"]["G"])
    full.load_state_dict(run["state"]["G_ema"])
    with torch.no_grad():
        reference = full.eval()(z[[0, 0]], c, noise_mode="const")
    torch.testing.assert_close(img, reference, rtol=0, atol=0.05)  # float16 storage only


# --- packing ------------------------------------------------------------------------------
def test_pack_utkface_sample(tmp_path, detector):
    zip_path = shared_path("data/utkface.zip")

    def best_landmarks(rgb: np.ndarray) -> np.ndarray | None:
        faces = detector.detect(rgb)
        return max(faces, key=lambda f: f.score).landmarks if faces else None

    out = tmp_path / "utk30.npz"
    report = pack_utkface(zip_path, out, 64, best_landmarks, limit=30, log=lambda line: None)
    packed = load_packed(out)
    assert packed.images.shape == (30, 64, 64, 3) and packed.images.dtype == np.uint8
    assert report["detected"] >= 27, report
    for name, held in zip(packed.names, packed.held_out):
        assert held == (int(hashlib.sha1(str(name).encode()).hexdigest(), 16) % 10 == 0)
    assert set(packed.gender) <= {0, 1} and set(packed.age_group) <= {0, 1, 2, 3}
    write_packed(tmp_path / "utk30-jpeg.npz", packed, report, jpeg_quality=90)
    as_jpeg = load_packed(tmp_path / "utk30-jpeg.npz")
    assert as_jpeg.images.shape == packed.images.shape
    assert np.abs(as_jpeg.images.astype(int) - packed.images).mean() < 2.6
    assert (tmp_path / "utk30-jpeg.npz").stat().st_size < out.stat().st_size / 3
    np.testing.assert_array_equal(packed.age_group, np.searchsorted([10, 30, 60], packed.age, "right"))
    # Detected again, the re-aligned faces sit where the template says. Compared are the
    # landmarks' centroid and spread, not single points: this detector's 5-point shape differs
    # from ArcFace's (its mouth sits ~13% closer to the eyes), which no similarity warp removes.
    for image in packed.images[packed.detected][:3]:
        big = cv2.copyMakeBorder(cv2.resize(image, (192, 192), interpolation=cv2.INTER_CUBIC), 48, 48, 48, 48,
                                 cv2.BORDER_CONSTANT)
        found = best_landmarks(big)
        assert found is not None
        found = (found - 48) / 3  # back to 64 px coordinates
        assert np.abs(found.mean(axis=0) - packed.template.mean(axis=0)).max() < 2.0
        spread = np.linalg.norm(found - found.mean(axis=0), axis=1).mean()
        assert spread == pytest.approx(np.linalg.norm(packed.template - packed.template.mean(axis=0), axis=1).mean(),
                                       rel=0.15)
