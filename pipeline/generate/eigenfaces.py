"""Eigenfaces: a linear-Gaussian face model of people who do not exist, one Gaussian per class.

Why a linear model beside the GANs: the default DCGAN cannot make children or people over 60
(measured: its steered hit rate there is 0-2%), so until a StyleGAN is trained on a GPU those
faces could only be blurred. A principal-component model of aligned UTKFace faces, with the
coefficients of each gender x age group modelled as their own Gaussian, makes a face for every
class, trains in about two minutes on a CPU, and is a true generative model: z ~ N(0, I) is
mapped through the class's mean and Cholesky factor to coefficients, and the coefficients
through the shared basis to pixels. A sample is a new mixture of a few hundred components, not
any training face (``eval-generator`` measures how close samples come to real people).

Its look is soft (a linear model cannot make sharp hair or skin texture); the swap pastes only
the inner face, where that matters least, and bystanders are small.

The file is a ``torch.save`` dict of tensors and plain values (loads with ``weights_only=True``):
the basis is stored as int8 with one scale per component (a quarter of float32, error ~0.4% of
each component's range), the rest in float16/float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.types import AGE_GROUPS, GENDERS

FORMAT = "facechange-eigenfaces-v1"
NUM_CLASSES = len(GENDERS) * len(AGE_GROUPS)
WEIGHTS_FILE = Path(__file__).resolve().parents[2] / "weights" / "eigenfaces_utkface.pt"
# Shrinks every class covariance towards its diagonal by this share: a class of ~1,500 faces
# (women over 60) estimates a 192 x 192 covariance poorly, and the raw estimate makes odd faces.
COVARIANCE_SHRINKAGE = 0.1


class EigenfaceGenerator(nn.Module):
    """(z (N, K), one-hot c (N, 8)[, pose (N, 2)]) -> RGB (N, 3, R, R) in about [-1, 1].

    c is gender * 4 + age group. Each class models its coefficients and its faces' pose (yaw,
    pitch from the landmarks, as ``Face.pose``) as one joint Gaussian, stored already conditioned
    on the pose: coefficients = class mean + pose_axes @ (pose - class pose mean) + factor @ z.
    Without a pose the class's mean pose is used (a typical, nearly frontal face).
    """

    c_dim = NUM_CLASSES
    takes_pose = True

    def __init__(self, resolution: int, components: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.z_dim = components
        pixels = 3 * resolution * resolution
        self.register_buffer("mean", torch.zeros(pixels))
        self.register_buffer("basis", torch.zeros(components, pixels))
        self.register_buffer("class_mean", torch.zeros(NUM_CLASSES, components))
        self.register_buffer("class_factor", torch.zeros(NUM_CLASSES, components, components))
        self.register_buffer("class_pose_mean", torch.zeros(NUM_CLASSES, 2))
        self.register_buffer("class_pose_axes", torch.zeros(NUM_CLASSES, components, 2))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                pose: torch.Tensor | None = None) -> torch.Tensor:
        if c is None:
            raise ValueError("the eigenface model is conditional: pass a one-hot gender x age-group label")
        classes = c.argmax(dim=1)
        # Truncation as in StyleGAN: samples pulled towards their class mean look more typical.
        coefficients = self.class_mean[classes] + truncation_psi * torch.einsum(
            "nij,nj->ni", self.class_factor[classes], z.to(self.basis.dtype))
        if pose is not None:
            offset = pose.to(self.basis.dtype) - self.class_pose_mean[classes]
            coefficients = coefficients + torch.einsum("nij,nj->ni", self.class_pose_axes[classes], offset)
        flat = self.mean + coefficients @ self.basis
        return flat.view(-1, 3, self.resolution, self.resolution)


def fit_eigenfaces(images: np.ndarray, classes: np.ndarray, poses: np.ndarray, components: int,
                   seed: int = 0) -> EigenfaceGenerator:
    """Fit the model on aligned faces (N, R, R, 3) uint8 RGB, classes (N,) in 0..7, poses (N, 2).

    Every face is also used mirrored (the alignment template is left-right symmetric, and the
    mirror's yaw is the negative), which doubles the data and keeps the model from leaning to
    one side.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise ValueError(f"expected N x R x R x 3 images, got {images.shape}")
    missing = sorted(set(range(NUM_CLASSES)) - set(np.unique(classes).tolist()))
    if missing:
        raise ValueError(f"no training faces for classes {missing}: every gender x age group needs some")
    resolution = images.shape[1]
    both = np.concatenate([images, images[:, :, ::-1]])
    classes = np.concatenate([classes, classes])
    poses = np.concatenate([poses, poses * np.array([-1.0, 1.0])]).astype(np.float64)
    x = torch.from_numpy(np.ascontiguousarray(both.transpose(0, 3, 1, 2))).reshape(len(both), -1)
    x = x.float().div_(127.5).sub_(1.0)
    mean = x.mean(dim=0)
    x -= mean
    generator = torch.Generator().manual_seed(seed)
    # svd_lowrank draws its random projection from the global generator: seeded for reproducibility.
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        _, _, v = torch.svd_lowrank(x, q=min(components + 16, *x.shape), niter=3)
    basis = v[:, :components].T.contiguous()
    coefficients = (x @ basis.T).double().numpy()
    model = EigenfaceGenerator(resolution, components)
    model.mean.copy_(mean)
    model.basis.copy_(basis)
    for index in range(NUM_CLASSES):
        joint = np.concatenate([coefficients[classes == index], poses[classes == index]], axis=1)
        covariance = np.cov(joint.T)
        covariance = (1 - COVARIANCE_SHRINKAGE) * covariance + COVARIANCE_SHRINKAGE * np.diag(np.diag(covariance))
        # Condition the coefficients on the pose (Schur complement of the pose block).
        cc, cp, pp = covariance[:components, :components], covariance[:components, components:], \
            covariance[components:, components:]
        axes = cp @ np.linalg.inv(pp)
        conditional = cc - axes @ cp.T
        factor = np.linalg.cholesky(conditional + 1e-6 * np.eye(components))
        centre = joint.mean(axis=0)
        model.class_mean[index] = torch.from_numpy(centre[:components])
        model.class_pose_mean[index] = torch.from_numpy(centre[components:])
        model.class_pose_axes[index] = torch.from_numpy(axes)
        model.class_factor[index] = torch.from_numpy(factor)
    return model.eval()


def save_eigenfaces(model: EigenfaceGenerator, path: Path, provenance: dict) -> None:
    scale = model.basis.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    quantized = torch.round(model.basis / scale[:, None]).to(torch.int8)
    torch.save({"format": FORMAT, "resolution": model.resolution, "components": model.z_dim,
                "mean": model.mean.half(), "basis_int8": quantized, "basis_scale": scale.float(),
                "class_mean": model.class_mean.float(), "class_factor": model.class_factor.half(),
                "class_pose_mean": model.class_pose_mean.float(), "class_pose_axes": model.class_pose_axes.float(),
                "provenance": provenance}, path)


def load_eigenfaces(path: Path | None = None) -> EigenfaceGenerator:
    path = Path(path or WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no eigenface model (train one with `facechange train-eigenfaces`)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a facechange eigenface model ({FORMAT})")
    model = EigenfaceGenerator(int(data["resolution"]), int(data["components"]))
    model.mean.copy_(data["mean"].float())
    model.basis.copy_(data["basis_int8"].float() * data["basis_scale"][:, None])
    model.class_mean.copy_(data["class_mean"].float())
    model.class_factor.copy_(data["class_factor"].float())
    model.class_pose_mean.copy_(data["class_pose_mean"])
    model.class_pose_axes.copy_(data["class_pose_axes"])
    return model.eval()
