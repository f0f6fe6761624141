"""Adaptive discriminator augmentation (ADA, Karras et al. 2020), differentiable, in plain PyTorch.

Every image D sees, real or generated, goes through the same pipe, and each transform is
applied independently with probability ``p``. Because the augmentations are differentiable
and applied to fakes as well, G learns the un-augmented distribution as long as ``p`` stays
below the point where the augmentations leak (about 0.8 for this 'bgc' set).

Geometric transforms are composed into one inverse affine matrix per image and applied with a
single ``grid_sample`` (bilinear, reflection padding); the official pipe upsamples with a
wavelet filter first to limit aliasing, which is dropped here for speed. Colour transforms
are composed into one 4x4 matrix per image, in the official order and with its strengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AugmentPipe", "ada_adjust"]

# The official 'bgc' strengths (stylegan2-ada-pytorch, training/augment.py).
XINT_MAX = 0.125
SCALE_STD = 0.2
ROTATE_MAX = 1.0
ANISO_STD = 0.2
XFRAC_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5
HUE_MAX = 1.0
SATURATION_STD = 1.0
# Component of the unit grey axis (1, 1, 1) / sqrt(3): brightness/contrast act along it, hue
# rotates about it.
LUMA = 1 / math.sqrt(3)


def ada_adjust(p: Tensor, real_sign_mean: Tensor, target: float, batch_size: int, interval: int,
               ada_kimg: float) -> Tensor:
    """The paper's update: move p by a fixed step towards keeping E[sign(D(real))] at ``target``.

    r_t above the target means D is sure about the reals (it overfits): raise p. The step lets p
    go from 0 to 1 in ``ada_kimg`` thousand images. Stays a tensor so the update needs no sync.
    """
    step = batch_size * interval / (ada_kimg * 1000)
    return (p + torch.sign(real_sign_mean - target) * step).clamp(0.0, 1.0)


def _eye(n: int, size: int, device: torch.device) -> Tensor:
    return torch.eye(size, device=device).repeat(n, 1, 1)


def _matrix(rows: list[list[Tensor | float]], n: int, device: torch.device) -> Tensor:
    """A batch of matrices from per-sample tensors (shape [n]) and constants."""
    return torch.stack([torch.stack([v if isinstance(v, Tensor) else torch.full([n], float(v), device=device)
                                     for v in row], dim=-1) for row in rows], dim=-2)


def _translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    n, d = tx.shape[0], tx.device
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, d)


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    n, d = sx.shape[0], sx.device
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, d)


def _rotate2d(theta: Tensor) -> Tensor:
    n, d = theta.shape[0], theta.device
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], n, d)


def _translate3d(t: Tensor) -> Tensor:
    n, d = t.shape[0], t.device
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, d)


def _scale3d(s: Tensor) -> Tensor:
    n, d = s.shape[0], s.device
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, d)


def _rotate_about_luma(theta: Tensor) -> Tensor:
    """Rodrigues' rotation about the grey axis (a hue rotation), one angle per sample."""
    n, d = theta.shape[0], theta.device
    x = y = z = LUMA
    c, s = theta.cos(), theta.sin()
    cc = 1 - c
    return _matrix([[x * x * cc + c, x * y * cc - z * s, x * z * cc + y * s, 0],
                    [y * x * cc + z * s, y * y * cc + c, y * z * cc - x * s, 0],
                    [z * x * cc - y * s, z * y * cc + x * s, z * z * cc + c, 0],
                    [0, 0, 0, 1]], n, d)


class AugmentPipe(nn.Module):
    """The 'bgc' augmentations: xflip, rot90, integer translation, scale, rotation, anisotropy,
    fractional translation, brightness, contrast, luma flip, hue, saturation.

    ``p`` is a buffer (so it checkpoints with the module and lives on the training device);
    images are N x C x H x W in [-1, 1] with C = 3.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)))

    def _gate(self, n: int, device: torch.device) -> Tensor:
        """1 where this sample gets the transform (probability p), else 0."""
        return (torch.rand([n], device=device) < self.p).float()

    def _geometric_inverse(self, n: int, size: int, device: torch.device) -> Tensor:
        """Output-to-input affine maps in grid_sample's [-1, 1] coordinates, composed in official order."""
        g_inv = _eye(n, 3, device)
        flip = torch.randint(0, 2, [n], device=device) * self._gate(n, device)
        g_inv = g_inv @ _scale2d(1 - 2 * flip, torch.ones_like(flip))
        quarter = torch.randint(0, 4, [n], device=device) * self._gate(n, device)
        g_inv = g_inv @ _rotate2d(-math.pi / 2 * quarter)
        # Whole pixels: 2/size is one pixel in [-1, 1] units, so sampling stays on pixel centres.
        shift = (torch.rand([2, n], device=device) * 2 - 1) * XINT_MAX * self._gate(n, device)
        shift = torch.round(shift * size) * (2.0 / size)
        g_inv = g_inv @ _translate2d(-shift[0], -shift[1])
        scale = torch.exp2(torch.randn([n], device=device) * SCALE_STD * self._gate(n, device))
        g_inv = g_inv @ _scale2d(1 / scale, 1 / scale)
        # Rotation is drawn twice (around the anisotropic scaling) at the rate that makes
        # "rotated at all" have probability p, as in the official pipe.
        p_rot = 1 - torch.sqrt((1 - self.p).clamp(min=0))
        for is_pre in (True, False):
            theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * ROTATE_MAX
            theta = theta * (torch.rand([n], device=device) < p_rot).float()
            g_inv = g_inv @ _rotate2d(-theta)
            if is_pre:
                aniso = torch.exp2(torch.randn([n], device=device) * ANISO_STD * self._gate(n, device))
                g_inv = g_inv @ _scale2d(1 / aniso, aniso)
        frac = torch.randn([2, n], device=device) * XFRAC_STD * self._gate(n, device)
        return g_inv @ _translate2d(-2 * frac[0], -2 * frac[1])

    def _color_matrix(self, n: int, device: torch.device) -> Tensor:
        v = torch.tensor([LUMA, LUMA, LUMA, 0.0], device=device)
        vv = torch.outer(v, v)
        c = _eye(n, 4, device)
        c = _translate3d(torch.randn([n], device=device) * BRIGHTNESS_STD * self._gate(n, device)) @ c
        c = _scale3d(torch.exp2(torch.randn([n], device=device) * CONTRAST_STD * self._gate(n, device))) @ c
        luma_flip = (torch.randint(0, 2, [n], device=device) * self._gate(n, device))[:, None, None]
        c = (torch.eye(4, device=device) - 2 * vv * luma_flip) @ c
        theta = (torch.rand([n], device=device) * 2 - 1) * math.pi * HUE_MAX * self._gate(n, device)
        c = _rotate_about_luma(theta) @ c
        sat = torch.exp2(torch.randn([n], device=device) * SATURATION_STD * self._gate(n, device))[:, None, None]
        return (vv + (torch.eye(4, device=device) - vv) * sat) @ c

    def forward(self, images: Tensor) -> Tensor:
        n, channels, height, width = images.shape
        if channels != 3 or height != width:
            raise ValueError(f"AugmentPipe expects square RGB images, got {list(images.shape)}")
        device = images.device
        g_inv = self._geometric_inverse(n, width, device).to(images.dtype)
        grid = F.affine_grid(g_inv[:, :2, :], list(images.shape), align_corners=False)
        x = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        c = self._color_matrix(n, device).to(images.dtype)
        x = x.reshape(n, channels, height * width)
        x = c[:, :3, :3] @ x + c[:, :3, 3:]
        return x.reshape(n, channels, height, width)
