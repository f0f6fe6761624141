"""Generation stage: synthesize the faces of people who do not exist.

``build_generator(spec)`` gives a module called as ``generator(z, c, **sampling_kwargs)`` that
returns N x 3 x R x R images in about [-1, 1]:
- ``"dcgan"``: the embedded default (gan-face-generate's 64 px DCGAN, unconditional);
- ``*.pkl``: an official StyleGAN2-ADA network pickle (loaded without running its code);
- ``*.pt``: a StyleGAN2-ADA generator we trained (`facechange train-generator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_GENERATOR = "dcgan"


@dataclass
class LoadedGenerator:
    module: torch.nn.Module
    sampling_kwargs: dict = field(default_factory=dict)


def build_generator(spec: str, device: torch.device) -> LoadedGenerator:
    if spec == DEFAULT_GENERATOR:
        from pipeline.generate.dcgan import load_dcgan

        return LoadedGenerator(load_dcgan().to(device))
    path = Path(spec)
    if path.suffix == ".pkl":
        from pipeline.generate.official_pickle import load_generator

        module = load_generator(path, device=device)
    elif path.suffix == ".pt":
        from pipeline.generate.checkpoint import load_trained_generator

        module = load_trained_generator(path, device=device)
    else:
        raise ValueError(f"{spec}: expected 'dcgan', an official StyleGAN2-ADA .pkl or a trained .pt")
    # Truncation 0.7 trades a little diversity for clearly better faces, as in NVIDIA's examples;
    # constant noise makes a seed give the same face every time.
    return LoadedGenerator(module, {"truncation_psi": 0.7, "noise_mode": "const"})
