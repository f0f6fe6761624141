"""SimSwap backend: checkpoint compatibility, the safe ArcFace loader, alignment and paste-back.

The official weights cannot be downloaded here, so the tests build files in the official
layouts: the ArcFace checkpoint is ``torch.save`` of a whole module whose classes live in a
throwaway ``models.arcface_models`` (SimSwap's module path), and the generator is a state dict
with the official key names. Expected outputs come from code written plainly in this file
from the published architecture, not from the module under test.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.transform import SimilarityTransform
from torchvision import transforms

from pipeline.cli import main
from pipeline.weights import CheckpointError
from pipeline.image_io import save_image
from pipeline.swap.arcface_checkpoint import UnsafeCheckpointError, load_arcface
from pipeline.swap.simswap import (SIMSWAP_TEMPLATES_112, SimSwapSwapper, estimate_alignment,
                                   load_simswap_generator, paste_back)

OFFICIAL_ARCFACE_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    def conv3x3(in_planes, out_planes, stride=1):
        return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)

    class SEBlock(nn.Module):
        def __init__(self, channel, reduction=16):
            super().__init__()
            self.avg_pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Sequential(nn.Linear(channel, channel // reduction), nn.PReLU(),
                                    nn.Linear(channel // reduction, channel), nn.Sigmoid())

        def forward(self, x):
            b, c, _, _ = x.size()
            y = self.avg_pool(x).view(b, c)
            return x * self.fc(y).view(b, c, 1, 1)

    class IRBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None, use_se=True):
            super().__init__()
            self.bn0 = nn.BatchNorm2d(inplanes)
            self.conv1 = conv3x3(inplanes, inplanes)
            self.bn1 = nn.BatchNorm2d(inplanes)
            self.prelu = nn.PReLU()
            self.conv2 = conv3x3(inplanes, planes, stride)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
            self.stride = stride
            self.use_se = use_se
            if self.use_se:
                self.se = SEBlock(planes)

        def forward(self, x):
            residual = x
            out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
            out = self.bn2(self.conv2(out))
            if self.use_se:
                out = self.se(out)
            if self.downsample is not None:
                residual = self.downsample(x)
            out += residual
            return self.prelu(out)

    class ResNet(nn.Module):
        def __init__(self, block, layers, use_se=True):
            self.inplanes = 64
            self.use_se = use_se
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.prelu = nn.PReLU()
            self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
            self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
            self.bn2 = nn.BatchNorm2d(512)
            self.dropout = nn.Dropout()
            self.fc = nn.Linear(512 * 7 * 7, 512)
            self.bn3 = nn.BatchNorm1d(512)

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
            layers = [block(self.inplanes, planes, stride, downsample, use_se=self.use_se)]
            self.inplanes = planes
            for _ in range(1, blocks):
                layers.append(block(self.inplanes, planes, use_se=self.use_se))
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(self.bn2(x))
            return self.bn3(self.fc(x.view(x.size(0), -1)))
''')


def _randomise_batchnorm_stats(model: torch.nn.Module, generator: torch.Generator) -> None:
    """So that a loader which drops running statistics cannot pass."""
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(0.1, 0.4, generator=generator)


def save_official_arcface(directory: Path, path: Path, layers: list[int], use_se: bool,
                          wrapped: bool = False) -> torch.nn.Module:
    """Pickle a whole official-layout ResNet to ``path``; returns the live reference model.

    The class module is removed from ``sys.modules`` and ``sys.path`` afterwards, so only a
    loader that never imports the pickled classes can read the file.
    """
    package = directory / "models"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "arcface_models.py").write_text(OFFICIAL_ARCFACE_SOURCE)
    sys.path.insert(0, str(directory))
    try:
        official = importlib.import_module("models.arcface_models")
        model = official.ResNet(official.IRBlock, layers, use_se=use_se)
        with torch.no_grad():
            _randomise_batchnorm_stats(model, torch.Generator().manual_seed(len(layers) + use_se))
        model.eval()
        torch.save({"model": torch.nn.DataParallel(model)} if wrapped else model, path)
    finally:
        sys.path.remove(str(directory))
        for name in ("models.arcface_models", "models"):
            sys.modules.pop(name, None)
    return model


@pytest.fixture(scope="module")
def official_arcface(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("arcface")
    path = directory / "arcface_checkpoint.tar"
    return path, save_official_arcface(directory / "src", path, [3, 4, 6, 3], use_se=False)


@pytest.mark.parametrize("layers, use_se, wrapped", [([1, 2, 1, 1], True, False), ([1, 1, 1, 1], False, True)])
def test_arcface_loader_matches_pickled_module(tmp_path, layers, use_se, wrapped):
    path = tmp_path / "arcface.tar"
    reference = save_official_arcface(tmp_path / "src", path, layers, use_se, wrapped)
    loaded = load_arcface(path)
    assert "models.arcface_models" not in sys.modules  # read as data, never imported
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-4, atol=1e-4)


def test_arcface_loader_matches_official_resnet50(official_arcface):
    path, reference = official_arcface
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_arcface(path)(x), reference(x), rtol=1e-4, atol=1e-4)


class _RunsShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsPythonCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_RunsShellCommand, _RunsPythonCode])
def test_arcface_loader_refuses_hostile_pickle(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "arcface_checkpoint.tar"
    torch.save({"model": payload(marker), "weights": torch.zeros(3)}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_arcface(path)
    assert not marker.exists()


def test_arcface_loader_rejects_non_checkpoints(tmp_path):
    path = tmp_path / "arcface_checkpoint.tar"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        load_arcface(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="no pickled ResNet"):
        load_arcface(path)


# --- generator -------------------------------------------------------------------------

def _official_generator_shapes(n_blocks: int = 9) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of SimSwap's Generator_Adain_Upsample(3, 3, 512, n_blocks, deep=False)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def batchnorm(name: str, c: int) -> None:
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{field}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("first_layer.1", 3, 64, 7)
    batchnorm("first_layer.2", 64)
    for index, (cin, cout) in enumerate([(64, 128), (128, 256), (256, 512)], start=1):
        conv(f"down{index}.0", cin, cout, 3)
        batchnorm(f"down{index}.1", cout)
    for block in range(n_blocks):
        for part in ("1", "2"):
            conv(f"BottleNeck.{block}.conv{part}.1", 512, 512, 3)
            shapes[f"BottleNeck.{block}.style{part}.linear.weight"] = (1024, 512)
            shapes[f"BottleNeck.{block}.style{part}.linear.bias"] = (1024,)
    for index, (cin, cout) in zip((3, 2, 1), [(512, 256), (256, 128), (128, 64)]):
        conv(f"up{index}.1", cin, cout, 3)
        batchnorm(f"up{index}.2", cout)
    conv("last_layer.1", 64, 3, 7)
    return shapes


def _random_official_generator(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _official_generator_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=generator) / np.sqrt(np.prod(shape[1:]))
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


def _reference_generator(w: dict[str, torch.Tensor], target: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """SimSwap's 224 generator forward, written out from fs_networks.py."""
    def bn(x, name):
        return F.batch_norm(x, w[f"{name}.running_mean"], w[f"{name}.running_var"],
                            w[f"{name}.weight"], w[f"{name}.bias"], training=False, eps=1e-5)

    def conv(x, name, stride=1, padding=0):
        return F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride=stride, padding=padding)

    def adain(x, name):
        x = x - x.mean((2, 3), keepdim=True)
        x = x / torch.sqrt((x ** 2).mean((2, 3), keepdim=True) + 1e-8)
        style = F.linear(latent, w[f"{name}.linear.weight"], w[f"{name}.linear.bias"])
        scale, shift = style[:, :512], style[:, 512:]
        return x * (scale[:, :, None, None] + 1) + shift[:, :, None, None]

    x = F.relu(bn(conv(F.pad(target, (3, 3, 3, 3), mode="reflect"), "first_layer.1"), "first_layer.2"))
    for index in (1, 2, 3):
        x = F.relu(bn(conv(x, f"down{index}.0", stride=2, padding=1), f"down{index}.1"))
    for block in range(9):
        name = f"BottleNeck.{block}"
        y = F.relu(adain(conv(F.pad(x, (1, 1, 1, 1), mode="reflect"), f"{name}.conv1.1"), f"{name}.style1"))
        y = adain(conv(F.pad(y, (1, 1, 1, 1), mode="reflect"), f"{name}.conv2.1"), f"{name}.style2")
        x = x + y
    for index in (3, 2, 1):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.relu(bn(conv(x, f"up{index}.1", padding=1), f"up{index}.2"))
    x = torch.tanh(conv(F.pad(x, (3, 3, 3, 3), mode="reflect"), "last_layer.1"))
    return (x + 1) / 2


def _test_crop(seed: int, size: int = 224) -> np.ndarray:
    """Smooth colour fields with pixel-level grain, so that resampling choices change the result."""
    rng = np.random.default_rng(seed)
    smooth = cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def official_generator(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _random_official_generator()
    path = tmp_path_factory.mktemp("simswap") / "latest_net_G.pth"
    torch.save(state, path)
    return path, state


def test_generator_checkpoint_with_wrong_keys_is_refused(tmp_path, official_generator):
    _, state = official_generator
    path = tmp_path / "latest_net_G.pth"
    torch.save({key.replace("style1", "style_a"): value for key, value in state.items()}, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_simswap_generator(path)


def test_swap_aligned_cli_matches_reference_forward(tmp_path, official_generator, official_arcface):
    generator_path, weights = official_generator
    arcface_path, arcface_reference = official_arcface
    target, source = _test_crop(1), _test_crop(2)
    save_image(target, tmp_path / "T.png")
    save_image(source, tmp_path / "S.png")
    out = tmp_path / "OUT.npy"
    assert main(["swap-aligned", "--simswap-checkpoint", str(generator_path), "--arcface", str(arcface_path),
                 "--target", str(tmp_path / "T.png"), "--source", str(tmp_path / "S.png"),
                 "--save-array", str(out)]) == 0
    result = np.load(out)
    assert result.dtype == np.float32 and result.shape == (1, 3, 224, 224)

    # SimSwap's test scripts: ImageNet-normalised source, F.interpolate (nearest) to 112, L2 norm.
    to_arcface = transforms.Compose([transforms.ToTensor(),
                                     transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        latent = F.normalize(arcface_reference(F.interpolate(to_arcface(source)[None], size=(112, 112))), dim=1)
        expected = _reference_generator(weights, transforms.ToTensor()(target)[None], latent)
    np.testing.assert_allclose(result, expected.numpy(), atol=2e-4)
    assert 0.0 <= result.min() and result.max() <= 1.0
    assert result.std() > 0.01  # a constant output would hide a broken generator

    swapped = SimSwapSwapper.from_files(generator_path, arcface_path).swap(target, source)
    assert swapped.dtype == np.uint8 and swapped.shape == (224, 224, 3)
    np.testing.assert_allclose(swapped, np.rint(expected[0].permute(1, 2, 0).numpy() * 255), atol=1)


# --- alignment and paste-back ----------------------------------------------------------

def _rotation_matrix(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(angle), -scale * np.sin(angle), shift[0]],
                     [scale * np.sin(angle), scale * np.cos(angle), shift[1]]])


def test_alignment_recovers_a_known_similarity():
    template = SIMSWAP_TEMPLATES_112[2] * 2  # the frontal template at 224
    to_image = _rotation_matrix(17, 1.6, (310.0, 95.0))
    kps = template @ to_image[:, :2].T + to_image[:, 2]
    matrix = estimate_alignment(kps)
    np.testing.assert_allclose(kps @ matrix[:, :2].T + matrix[:, 2], template, atol=1e-6)


def test_alignment_matches_skimage_similarity_on_noisy_landmarks():
    rng = np.random.default_rng(3)
    kps = SIMSWAP_TEMPLATES_112[1] * 1.3 + 40 + rng.normal(0, 2.0, (5, 2))
    matrix = estimate_alignment(kps)
    errors = []
    for template in SIMSWAP_TEMPLATES_112 * 2:
        tform = SimilarityTransform.from_estimate(kps, template)
        mapped = np.c_[kps, np.ones(5)] @ tform.params[:2].T
        errors.append((np.linalg.norm(mapped - template, axis=1).sum(), tform.params[:2]))
    np.testing.assert_allclose(matrix, min(errors, key=lambda item: item[0])[1], atol=1e-6)


@pytest.mark.parametrize("scale", [1.5, 0.25])
def test_paste_back_changes_only_the_face_region(scale):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    kps = SIMSWAP_TEMPLATES_112[2] * 2 * scale + (150, 60)
    matrix = estimate_alignment(kps)
    face = np.full((224, 224, 3), (10, 200, 30), np.uint8)
    result = paste_back(image, face, matrix)

    footprint = cv2.warpAffine(np.ones((224, 224), np.float32), cv2.invertAffineTransform(matrix),
                               (480, 360), borderValue=0.0)
    outside = footprint == 0
    assert outside.any() and np.array_equal(result[outside], image[outside])
    centre = tuple(int(v) for v in np.rint(kps[2]))  # the nose, well inside the face
    np.testing.assert_array_equal(result[centre[1], centre[0]], face[0, 0])
    assert (result != image).any(axis=2).sum() > 0.3 * (footprint > 0).sum()
