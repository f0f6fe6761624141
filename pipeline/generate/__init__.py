"""Generation stage: synthesize the faces of people who do not exist.

``build_generator(spec)`` gives a module called as ``generator(z, c, **sampling_kwargs)`` that
returns N x 3 x R x R images in about [-1, 1]:
- ``"dcgan"``: gan-face-generate's 64 px DCGAN (unconditional), steered by TL-GAN axes;
- ``"eigenfaces"``: our 96 px eigenface model of UTKFace (conditional on gender x age group);
- ``*.pkl``: an official StyleGAN2-ADA network pickle (loaded without running its code);
- ``*.pt``: a StyleGAN2-ADA generator we trained (`facechange train-generator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

# The eigenface model makes every gender x age group and was measured better than the DCGAN on
# every generator and anonymization figure (README, "Generation"); the DCGAN stays selectable.
DEFAULT_GENERATOR = "eigenfaces"
BUILTIN_GENERATORS = ("eigenfaces", "dcgan")
# Of the eigenface pools' faces, an independent judge (a probe on ArcFace embeddings) agreed with
# our heads on 0.27 / 0.33 / 0.31 on average at truncation 0.6 / 0.8 / 1.0.
EIGENFACE_TRUNCATION = 0.8


@dataclass
class LoadedGenerator:
    module: torch.nn.Module
    sampling_kwargs: dict = field(default_factory=dict)


def build_generator(spec: str, device: torch.device) -> LoadedGenerator:
    if spec == "dcgan":
        from pipeline.generate.dcgan import load_dcgan

        return LoadedGenerator(load_dcgan().to(device))
    if spec == "eigenfaces":
        from pipeline.generate.eigenfaces import load_eigenfaces

        return LoadedGenerator(load_eigenfaces().to(device), {"truncation_psi": EIGENFACE_TRUNCATION})
    path = Path(spec)
    if path.suffix == ".pkl":
        from pipeline.generate.official_pickle import load_generator

        module = load_generator(path, device=device)
    elif path.suffix == ".pt":
        from pipeline.generate.checkpoint import load_trained_generator

        module = load_trained_generator(path, device=device)
    else:
        raise ValueError(f"{spec}: expected 'dcgan', 'eigenfaces', an official StyleGAN2-ADA .pkl or a trained .pt")
    # Truncation 0.7 trades a little diversity for clearly better faces, as in NVIDIA's examples;
    # constant noise makes a seed give the same face every time.
    return LoadedGenerator(module, {"truncation_psi": 0.7, "noise_mode": "const"})
