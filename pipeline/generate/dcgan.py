"""The embedded default generator: the 64x64 DCGAN of the ``gan-face-generate`` package.

It was trained on DigiFace-1M, rendered faces of people who do not exist (MIT licence). The
package is installed without its training dependencies; only its weight file is read, with
``weights_only=True``, into our own copy of the (PyTorch-tutorial) DCGAN generator layout.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch import nn

Z_DIM = 100
RESOLUTION = 64


def _up(in_ch: int, out_ch: int, first: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d(in_ch, out_ch, 4, 1, 0, bias=False) if first else \
        nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False)
    return [conv, nn.BatchNorm2d(out_ch), nn.ReLU(True)]


class DCGANGenerator(nn.Module):
    """z (N, 100) -> RGB (N, 3, 64, 64) in [-1, 1]; parameter names as in ``main.*`` of the package."""

    z_dim = Z_DIM
    c_dim = 0
    resolution = RESOLUTION

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.main = nn.Sequential(
            *_up(Z_DIM, width * 8, first=True),
            *_up(width * 8, width * 4),
            *_up(width * 4, width * 2),
            *_up(width * 2, width),
            nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.main(z.view(z.shape[0], Z_DIM, 1, 1))


def packaged_weights() -> Path:
    """The weight file inside the installed gan-face-generate package."""
    try:
        path = Path(str(importlib.resources.files("gan_face_generate") / "weights.tar"))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "the default generator's weights come from the gan-face-generate package: "
            "pip install --no-deps gan-face-generate==1.1.1"
        ) from exc
    if not path.is_file():
        raise FileNotFoundError(f"gan-face-generate is installed but has no weight file at {path}")
    return path


def load_dcgan(path: Path | None = None) -> DCGANGenerator:
    checkpoint = torch.load(path or packaged_weights(), map_location="cpu", weights_only=True)
    net = DCGANGenerator()
    net.load_state_dict(checkpoint["netG_state_dict"], strict=True)
    return net.eval()
