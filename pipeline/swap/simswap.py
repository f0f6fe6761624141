"""SimSwap (224 "people" model): identity injection by AdaIN, alignment and paste-back.

The generator mirrors ``Generator_Adain_Upsample`` of SimSwap's ``models/fs_networks.py``
(``input_nc=3, output_nc=3, latent_size=512, n_blocks=9, deep=False``) module for module, so
the official ``latest_net_G.pth`` state dict loads by name. Inputs follow SimSwap's test
scripts: the target crop goes to the generator as RGB in 0..1, the source crop goes to ArcFace
ImageNet-normalised and nearest-resized to 112, and the identity latent is L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.weights import CheckpointError, load_matching_state
from pipeline.swap.arcface_checkpoint import ARCFACE_INPUT_SIZE, ArcFaceResNet, load_arcface

CROP_SIZE = 224
LATENT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# SimSwap's 'None' alignment mode (insightface_func/utils/face_align_ffhqandnewarc.py): five
# pose-specific templates in 112 px (left profile, left, frontal, right, right profile); the
# one that fits the landmarks best is used, scaled to the crop size.
SIMSWAP_TEMPLATES_112 = np.array([
    [[51.642, 50.115], [57.617, 49.990], [35.740, 69.007], [51.157, 89.050], [57.025, 89.702]],
    [[45.031, 50.118], [65.568, 50.872], [39.677, 68.111], [45.177, 86.190], [64.246, 86.758]],
    [[39.730, 51.138], [72.270, 51.138], [56.000, 68.493], [42.463, 87.010], [69.537, 87.010]],
    [[46.845, 50.872], [67.382, 50.118], [72.737, 68.111], [48.167, 86.758], [67.236, 86.190]],
    [[54.796, 49.990], [60.771, 50.115], [76.673, 69.007], [55.388, 89.702], [61.257, 89.050]],
], dtype=np.float64)


class InstanceNorm(nn.Module):
    """SimSwap's own instance norm: no affine part and eps 1e-8 inside the square root."""

    def __init__(self, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean((2, 3), keepdim=True)
        return x * torch.rsqrt((x * x).mean((2, 3), keepdim=True) + self.epsilon)


class ApplyStyle(nn.Module):
    def __init__(self, latent_size: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(latent_size, channels * 2)

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        style = self.linear(latent).view(-1, 2, x.size(1), 1, 1)
        return x * (style[:, 0] + 1.0) + style[:, 1]


class ResnetBlockAdain(nn.Module):
    def __init__(self, dim: int, latent_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, kernel_size=3), InstanceNorm())
        self.style1 = ApplyStyle(latent_size, dim)
        self.act1 = nn.ReLU(True)
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, kernel_size=3), InstanceNorm())
        self.style2 = ApplyStyle(latent_size, dim)

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.style1(self.conv1(x), latent))
        return x + self.style2(self.conv2(y), latent)


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(True))


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"),
                         nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(True))


class SimSwapGenerator(nn.Module):
    """``Generator_Adain_Upsample`` with deep=False: target 1x3x224x224 in 0..1 -> swapped face in 0..1."""

    def __init__(self, latent_size: int = LATENT_SIZE, n_blocks: int = 9) -> None:
        super().__init__()
        self.first_layer = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 64, kernel_size=7),
                                         nn.BatchNorm2d(64), nn.ReLU(True))
        self.down1 = _down(64, 128)
        self.down2 = _down(128, 256)
        self.down3 = _down(256, 512)
        self.BottleNeck = nn.Sequential(*(ResnetBlockAdain(512, latent_size) for _ in range(n_blocks)))
        self.up3 = _up(512, 256)
        self.up2 = _up(256, 128)
        self.up1 = _up(128, 64)
        self.last_layer = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 3, kernel_size=7), nn.Tanh())

    def forward(self, target: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x = self.down3(self.down2(self.down1(self.first_layer(target))))
        for block in self.BottleNeck:
            x = block(x, latent)
        x = self.last_layer(self.up1(self.up2(self.up3(x))))
        return (x + 1) / 2


def load_simswap_generator(path: str | Path) -> SimSwapGenerator:
    """The generator with the weights of an official ``*_net_G.pth`` (a plain state dict)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    blocks = len({key.split(".")[1] for key in state if key.startswith("BottleNeck.")})
    return load_matching_state(SimSwapGenerator(n_blocks=blocks), state, path, "not a SimSwap 224 generator")


def to_tensor(image_rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 1x3xHxW float in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1)[None].float().div(255)


def to_uint8(output: torch.Tensor) -> np.ndarray:
    """1x3xHxW float in 0..1 -> HxWx3 uint8 RGB."""
    return np.clip(np.rint(output[0].permute(1, 2, 0).cpu().numpy() * 255), 0, 255).astype(np.uint8)


@torch.inference_mode()
def identity_latent(arcface: ArcFaceResNet, source_aligned_rgb: np.ndarray) -> torch.Tensor:
    """1x512 unit-length identity of an aligned source crop, computed as SimSwap's test scripts do."""
    device = next(arcface.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    normalised = (to_tensor(source_aligned_rgb).to(device) - mean) / std
    # Nearest, not area: SimSwap calls F.interpolate with its default mode, and ArcFace saw that.
    small = F.interpolate(normalised, size=(ARCFACE_INPUT_SIZE, ARCFACE_INPUT_SIZE))
    return F.normalize(arcface(small), p=2, dim=1)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform src -> dst (Umeyama), as a 2x3 matrix."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(s) @ sign) / src_c.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def estimate_alignment(kps: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """The 2x3 affine that maps an image onto SimSwap's crop, from 5 landmarks (eyes, nose, mouth)."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    best, best_error = np.zeros((2, 3)), np.inf
    for template in SIMSWAP_TEMPLATES_112 * crop_size / 112:
        matrix = _similarity(kps, template)
        error = np.linalg.norm(kps @ matrix[:, :2].T + matrix[:, 2] - template, axis=1).sum()
        if error < best_error:
            best, best_error = matrix, error
    return best


def align_face(image_rgb: np.ndarray, kps: np.ndarray, crop_size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(aligned crop, 2x3 affine image -> crop)."""
    matrix = estimate_alignment(kps, crop_size)
    return cv2.warpAffine(image_rgb, matrix, (crop_size, crop_size), borderValue=0.0), matrix


def paste_back(image_rgb: np.ndarray, face_rgb_aligned: np.ndarray, affine_2x3: np.ndarray,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Blend an aligned face back into the image through a soft mask; pixels outside it stay as they were.

    ``mask`` (crop-sized, 0..1, e.g. a face-parsing mask) narrows the blend further. SimSwap erodes
    the warped crop's footprint by 40 px and feathers it with a 41 px Gaussian for a 224 crop at its
    native scale; both scale here with the face so that a small face in a large photo keeps a mask.
    """
    height, width = image_rgb.shape[:2]
    crop = face_rgb_aligned.shape[0]
    inverse = cv2.invertAffineTransform(np.asarray(affine_2x3, dtype=np.float64))
    footprint = np.ones((crop, crop), np.float32) if mask is None else np.asarray(mask, np.float32)
    warped_mask = cv2.warpAffine(footprint, inverse, (width, height), flags=cv2.INTER_LINEAR, borderValue=0.0)
    warped_face = cv2.warpAffine(face_rgb_aligned, inverse, (width, height), borderValue=0.0)
    face_scale = np.sqrt(abs(np.linalg.det(inverse[:, :2])))  # image pixels per crop pixel
    erode = max(int(round(40 * face_scale * crop / CROP_SIZE)), 1)
    blur = max(int(round(20 * face_scale * crop / CROP_SIZE)), 1)
    soft = cv2.erode(warped_mask, np.ones((erode, erode), np.uint8))
    soft = cv2.GaussianBlur(soft, (2 * blur + 1, 2 * blur + 1), 0)
    soft = np.where(warped_mask > 0, soft, 0.0)[..., None]
    blended = soft * warped_face.astype(np.float32) + (1 - soft) * image_rgb.astype(np.float32)
    return np.where(soft > 0, np.clip(np.rint(blended), 0, 255), image_rgb).astype(np.uint8)


class SimSwapSwapper:
    """Puts a source identity onto aligned target crops with SimSwap's 224 generator."""

    def __init__(self, generator: SimSwapGenerator, arcface: ArcFaceResNet,
                 device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.generator = generator.to(device).eval()
        self.arcface = arcface.to(device).eval()

    @classmethod
    def from_files(cls, generator_path: str | Path, arcface_path: str | Path,
                   device: torch.device = torch.device("cpu")) -> SimSwapSwapper:
        return cls(load_simswap_generator(generator_path), load_arcface(arcface_path), device)

    def latent(self, source_aligned_rgb: np.ndarray) -> torch.Tensor:
        return identity_latent(self.arcface, source_aligned_rgb)

    @torch.inference_mode()
    def generate(self, target_aligned_rgb: np.ndarray, latent: torch.Tensor) -> torch.Tensor:
        """The generator's raw 1x3x224x224 output in 0..1."""
        if target_aligned_rgb.shape != (CROP_SIZE, CROP_SIZE, 3):
            raise ValueError(f"the target must be an aligned {CROP_SIZE}x{CROP_SIZE} RGB crop, "
                             f"got shape {target_aligned_rgb.shape}")
        return self.generator(to_tensor(target_aligned_rgb).to(self.device), latent.to(self.device)).cpu()

    def swap(self, target_aligned_rgb: np.ndarray, source_aligned_rgb: np.ndarray) -> np.ndarray:
        """224x224 RGB uint8: the target crop wearing the source's identity."""
        return to_uint8(self.generate(target_aligned_rgb, self.latent(source_aligned_rgb)))
