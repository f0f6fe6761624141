"""StyleGAN2-ADA generator in plain PyTorch, state-dict compatible with NVIDIA's pickles.

Parameter and buffer names, shapes and the forward semantics follow ``training/networks.py``
of NVIDIA's stylegan2-ada-pytorch, so the ``G_ema`` of an official ``network-snapshot-*.pkl``
or ``ffhq.pkl`` loads with ``strict=True`` (see ``official_pickle``). The custom CUDA ops of
the original (upfirdn2d, bias_act, fused modulated convolution) are replaced by their
reference formulations in ordinary tensor ops, so the same code runs on CPU and CUDA.

Precision: official configs run the top ``num_fp16_res`` resolutions in float16 on the GPU.
Here every layer runs in float32; ``num_fp16_res`` is recorded but changes nothing but
precision, so outputs match an official float32 run (``force_fp32=True``) to rounding and an
official mixed-precision run to about float16 accuracy. ``conv_clamp`` applies to every
layer, as it does in the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FullyConnectedLayer",
    "Generator",
    "MappingNetwork",
    "SynthesisBlock",
    "SynthesisLayer",
    "SynthesisNetwork",
    "ToRGBLayer",
    "bias_act",
    "generate_images",
    "modulated_conv2d",
    "normalize_2nd_moment",
    "setup_filter",
    "to_uint8_images",
    "upfirdn2d",
    "upsample2d",
]

NOISE_MODES = ("random", "const", "none")
LRELU_SLOPE = 0.2
# bias_act's default gains: lrelu is scaled by sqrt(2) to keep the activations' variance.
_DEFAULT_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0)}


def setup_filter(taps: Sequence[float] | Tensor) -> Tensor:
    """The FIR filter buffer NVIDIA's ``upfirdn2d.setup_filter`` builds: normalized to sum 1.

    Short 1-D tap lists become their outer product (a 2-D filter); 8 taps or more stay 1-D and
    are applied separably, which also decides the buffer's shape in the state dict.
    """
    f = torch.as_tensor(taps, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1 and f.numel() < 8:
        f = torch.outer(f, f)
    return f / f.sum()


def _filter_size(f: Tensor) -> tuple[int, int]:
    """(width, height) of a 1-D (separable) or 2-D filter."""
    return (f.shape[-1], f.shape[-1] if f.ndim == 1 else f.shape[0])


def upfirdn2d(x: Tensor, f: Tensor, up: int = 1, padding: Sequence[int] = (0, 0, 0, 0),
              gain: float = 1.0) -> Tensor:
    """Upsample by zero insertion, pad (negative = crop), then convolve with the FIR filter ``f``.

    ``padding`` is (x0, x1, y0, y1) in upsampled pixels, as in NVIDIA's op. The filter is
    flipped before ``conv2d`` because ``conv2d`` correlates while upfirdn2d convolves (this
    matters only for asymmetric filters). ``gain`` multiplies the whole filter.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]

    f = (f * gain ** (f.ndim / 2)).to(x.dtype).flip(list(range(f.ndim)))
    if f.ndim == 2:
        return F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, f[None, None, None].repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, f[None, None, :, None].repeat(c, 1, 1, 1), groups=c)


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """2x (by default) upsampling that keeps the image centred: NVIDIA's ``upsample2d``."""
    fw, fh = _filter_size(f)
    padding = ((fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2)
    # Zero insertion leaves 1 of up*up pixels non-zero, so the gain restores the mean.
    return upfirdn2d(x, f, up=up, padding=padding, gain=up * up)


def bias_act(x: Tensor, b: Tensor | None, act: str = "linear", gain: float | None = None,
             clamp: float | None = None) -> Tensor:
    """NVIDIA's bias_act order: add bias (along dim 1), activate, scale by gain, then clamp."""
    if act not in _DEFAULT_GAIN:
        raise ValueError(f"unsupported activation {act!r} (lrelu and linear are)")
    if b is not None:
        x = x + b.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    gain = _DEFAULT_GAIN[act] if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def _conv2d_resample(x: Tensor, w: Tensor, f: Tensor | None, up: int, padding: int, groups: int,
                     flip_weight: bool) -> Tensor:
    """NVIDIA's ``conv2d_resample`` for the two cases the generator uses: up=1 and up>1.

    ``flip_weight=True`` is correlation (``conv2d``), False a true convolution. Upsampling
    takes the original's fast path (strided transposed convolution, then the FIR filter) so
    the rounding follows it too.
    """
    if up == 1:
        if not flip_weight:
            w = w.flip([2, 3])
        return F.conv2d(x, w, padding=padding, groups=groups)

    assert f is not None, "upsampling needs a resample filter"
    out_channels, in_per_group, kh, kw = w.shape
    fw, fh = _filter_size(f)
    px0 = padding + (fw + up - 1) // 2 - (kw - 1)
    px1 = padding + (fw - up) // 2 - (kw - up)
    py0 = padding + (fh + up - 1) // 2 - (kh - 1)
    py1 = padding + (fh - up) // 2 - (kh - up)
    # conv_transpose2d wants [in, out/groups, kh, kw]: swap the channel axes within each group.
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    # A transposed convolution already convolves; flipping makes it correlate.
    if flip_weight:
        w = w.flip([2, 3])
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    x = F.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
    # The transposed convolution cropped pxt / pyt on every side: give them back to the FIR pad.
    return upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, noise: Tensor | None = None,
                     up: int = 1, padding: int = 0, resample_filter: Tensor | None = None,
                     demodulate: bool = True, flip_weight: bool = True,
                     fused_modconv: bool = True) -> Tensor:
    """StyleGAN2's style-modulated convolution (NVIDIA's ``modulated_conv2d``, float32 path).

    Each sample scales the input channels of ``weight`` by its ``styles`` and, with
    ``demodulate``, renormalizes every output filter to unit norm. ``fused_modconv`` runs one
    grouped convolution with per-sample weights; otherwise the activations are scaled before
    and after a shared convolution. Both give the same result up to rounding.
    """
    batch_size = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)  # [N, O, I, k, k]
    dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demodulate else None  # [N, O]

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = _conv2d_resample(x, weight.to(x.dtype), resample_filter, up, padding, 1, flip_weight)
        if dcoefs is not None and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1))
        if dcoefs is not None:
            return x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        return x + noise.to(x.dtype) if noise is not None else x

    if dcoefs is not None:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = _conv2d_resample(x, w.to(x.dtype), resample_filter, up, padding, batch_size, flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    return x + noise if noise is not None else x


class FullyConnectedLayer(nn.Module):
    """Dense layer with equalized learning rate: weights are stored unscaled, scaled at runtime."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "linear", lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            # addmm, as the original, so that the rounding is the same.
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):
    """z (and the class label c) to w, broadcast to the ``num_ws`` style inputs, with truncation."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01,
                 w_avg_beta: float | None = 0.995) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", FullyConnectedLayer(features[idx], features[idx + 1],
                                                          activation=activation, lr_multiplier=lr_multiplier))
        # w_avg is the training-time running mean of w (the truncation centre); w_avg_beta only
        # decides whether the buffer exists, since nothing here updates it.
        self.has_w_avg = num_ws is not None and w_avg_beta is not None
        if self.has_w_avg:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Tensor, c: Tensor | None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> Tensor:
        x = None
        if self.z_dim > 0:
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None or c.shape[1] != self.c_dim:
                raise ValueError(f"this generator is conditional: c must have shape [N, {self.c_dim}]")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        assert x is not None, "a mapping network needs z_dim > 0 or c_dim > 0"

        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if not self.has_w_avg:
                raise ValueError("truncation needs w_avg, which this mapping network does not have")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally 2x upsampling), noise, bias, lrelu, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 kernel_size: int = 3, up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None) -> None:
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = _DEFAULT_GAIN[activation]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", fused_modconv: bool = True,
                gain: float = 1.0) -> Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, not {noise_mode!r}")
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) \
                * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter,
                             flip_weight=(self.up == 1),  # the original's choice; up layers convolve
                             fused_modconv=fused_modconv)
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain,
                        clamp=act_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation; linear, clamped."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: Tensor, w: Tensor, fused_modconv: bool = True) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const | conv0 with 2x up), conv1, and torgb for the skip image path."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, is_last: bool, architecture: str = "skip",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 use_fp16: bool = False, use_noise: bool = True, activation: str = "lrelu") -> None:
        if architecture not in ("orig", "skip"):
            raise ValueError(f"generator architecture {architecture!r} is not supported (skip and orig are)")
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16  # informational: everything runs in float32 here
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        layer_kwargs = dict(w_dim=w_dim, resolution=resolution, use_noise=use_noise, activation=activation,
                            resample_filter=resample_filter, conv_clamp=conv_clamp)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str = "random",
                fused_modconv: bool | None = None) -> tuple[Tensor, Tensor | None]:
        w_iter = iter(ws.unbind(dim=1))
        if fused_modconv is None:
            fused_modconv = not self.training
        if self.in_channels == 0:
            x = self.const.to(torch.float32).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
        else:
            assert x is not None
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.num_torgb:
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """The blocks b4 ... b{img_resolution}; block b{R} has min(channel_base // R, channel_max) channels."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, **block_kwargs: object) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, not {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)

        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim,
                                   resolution=res, img_channels=img_channels, is_last=is_last,
                                   use_fp16=res >= fp16_resolution, **block_kwargs)  # type: ignore[arg-type]
            self.num_ws += block.num_conv
            if is_last:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: Tensor, noise_mode: str = "random", fused_modconv: bool | None = None) -> Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must have shape [N, {self.num_ws}, {self.w_dim}], not {list(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            # A block's torgb shares its w with the next block's conv0: the windows overlap by one.
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode, fused_modconv=fused_modconv)
        assert img is not None
        return img


class Generator(nn.Module):
    """mapping (z, c -> ws) followed by synthesis (ws -> image in roughly [-1, 1], N x C x R x R)."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict[str, object] | None = None,
                 synthesis_kwargs: dict[str, object] | None = None) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution,
                                          img_channels=img_channels, **(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))  # type: ignore[arg-type]

    def forward(self, z: Tensor, c: Tensor | None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "random",
                fused_modconv: bool | None = None) -> Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, fused_modconv=fused_modconv)


def generate_images(G: Generator, seed: int, count: int = 1, truncation_psi: float = 1.0,
                    noise_mode: str = "const", class_idx: int | None = None) -> np.ndarray:
    """``count`` images (float32, N x C x R x R, roughly [-1, 1]) for one seed.

    The latents are ``np.random.RandomState(seed).randn(count, z_dim)``, NVIDIA's generate.py
    convention (for count=1 the same z as its ``--seeds``); a conditional model gets the
    one-hot label of ``class_idx``. ``noise_mode='random'`` draws from torch's global RNG.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    device = next(G.parameters()).device
    z = torch.from_numpy(np.random.RandomState(seed).randn(count, G.z_dim)).to(device)
    c = None
    if G.c_dim > 0:
        if class_idx is None:
            raise ValueError(f"this generator is conditional ({G.c_dim} classes): give a class index")
        if not 0 <= class_idx < G.c_dim:
            raise ValueError(f"class index {class_idx} is out of range 0..{G.c_dim - 1}")
        c = torch.zeros([count, G.c_dim], device=device)
        c[:, class_idx] = 1
    elif class_idx is not None:
        raise ValueError("this generator is unconditional: it takes no class index")
    with torch.no_grad():
        img = G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)
    return img.to(torch.float32).cpu().numpy()


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    """N x C x H x W in [-1, 1] to N x H x W x C uint8, with generate.py's rounding (x*127.5+128)."""
    return np.clip(images.transpose(0, 2, 3, 1) * 127.5 + 128, 0, 255).astype(np.uint8)
