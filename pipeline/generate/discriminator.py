"""StyleGAN2-ADA discriminator (resnet architecture) with NVIDIA's parameter names.

Names, shapes and forward semantics follow ``training/networks.py`` of stylegan2-ada-pytorch:
blocks ``b{R}`` (``fromrgb`` on the first block only, ``conv0``, ``conv1`` with 2x down,
``skip``), the epilogue ``b4`` (``mbstd``, ``conv``, ``fc``, ``out``) and, when conditional, a
``mapping`` network that turns the label into ``cmap`` for the projection head. The custom
CUDA ops are replaced by their reference formulations, as in ``stylegan2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.generate.stylegan2 import FullyConnectedLayer, MappingNetwork, bias_act, setup_filter, upfirdn2d

__all__ = ["Conv2dLayer", "Discriminator", "DiscriminatorBlock", "DiscriminatorEpilogue", "MinibatchStdLayer"]

_ACT_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0)}


def _downsample_pad(f: Tensor, padding: int) -> tuple[int, int, int, int]:
    """conv2d_resample's FIR padding for 2x down: keeps the output centred on the input."""
    fw = f.shape[-1]
    fh = f.shape[-1] if f.ndim == 1 else f.shape[0]
    return (padding + (fw - 1) // 2, padding + (fw - 2) // 2, padding + (fh - 1) // 2, padding + (fh - 2) // 2)


class Conv2dLayer(nn.Module):
    """Equalized-learning-rate convolution, optionally with FIR-filtered 2x downsampling."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", down: int = 1, resample_filter: Sequence[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None) -> None:
        if down not in (1, 2):
            raise ValueError("Conv2dLayer supports down=1 or 2")
        super().__init__()
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.act_gain = _ACT_GAIN[activation]
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        w = self.weight * self.weight_gain
        if self.down == 1:
            x = F.conv2d(x, w.to(x.dtype), padding=self.padding)
        elif w.shape[-1] == 1:
            # 1x1: filter and subsample first, then the (cheaper) convolution at low resolution.
            x = upfirdn2d(x, self.resample_filter, padding=_downsample_pad(self.resample_filter, 0))[:, :, ::2, ::2]
            x = F.conv2d(x, w.to(x.dtype))
        else:
            x = upfirdn2d(x, self.resample_filter, padding=_downsample_pad(self.resample_filter, self.padding))
            x = F.conv2d(x, w.to(x.dtype), stride=2)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    """One resolution of the resnet discriminator: two convolutions plus a downsampling skip."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int,
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2,
                                 resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter)

    def forward(self, x: Tensor | None, img: Tensor) -> Tensor:
        if self.in_channels == 0:
            x = self.fromrgb(img)
        assert x is not None
        # sqrt(0.5) on both branches keeps the sum's variance that of one branch.
        y = self.skip(x, gain=np.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=np.sqrt(0.5))
        return y + x


class MinibatchStdLayer(nn.Module):
    """Appends the per-group standard deviation of the features: lets D see a lack of variety."""

    def __init__(self, group_size: int, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g:
            raise ValueError(f"the batch ({n}) must be a multiple of the mbstd group size ({g})")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head: mbstd, conv, fc and the output (a projection onto cmap when conditional)."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int = 4, mbstd_group_size: int = 4,
                 mbstd_num_channels: int = 1, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels)
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3, activation="lrelu",
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: Tensor, cmap: Tensor | None) -> Tensor:
        x = self.conv(self.mbstd(x))
        x = self.out(self.fc(x.flatten(1)))
        if cmap is not None:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """Image (and label) to one logit per sample; block b{R} has min(channel_base // R, channel_max) channels."""

    def __init__(self, c_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, conv_clamp: float | None = None, cmap_dim: int | None = None,
                 mapping_kwargs: dict[str, object] | None = None,
                 epilogue_kwargs: dict[str, object] | None = None) -> None:
        if img_resolution < 8 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 8, not {img_resolution}")
        super().__init__()
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(int(np.log2(img_resolution)), 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        if cmap_dim is None:
            cmap_dim = channels[4]
        if c_dim == 0:
            cmap_dim = 0
        for res in self.block_resolutions:
            in_channels = channels[res] if res < img_resolution else 0
            setattr(self, f"b{res}", DiscriminatorBlock(in_channels, channels[res], channels[res // 2],
                                                        img_channels, conv_clamp=conv_clamp))
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **(mapping_kwargs or {}))  # type: ignore[arg-type]
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, conv_clamp=conv_clamp,
                                        **(epilogue_kwargs or {}))  # type: ignore[arg-type]

    def forward(self, img: Tensor, c: Tensor | None) -> Tensor:
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        assert x is not None
        return self.b4(x, cmap)
