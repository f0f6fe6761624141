"""Synthetic faces that match a target face's gender, age group and pose.

Conditional generators take the label directly. Unconditional ones (official FFHQ StyleGAN, the
default DCGAN) are steered with the TL-GAN method: label many random samples with our own
detector heads, fit linear attribute axes in latent space, decorrelate them, move a latent along
the axes to the target, then verify the result with the same heads and resample when it misses.
Every generator declares, from measurement, which gender x age-group targets it can meet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.types import AGE_GROUPS, GENDERS, Face

# Ages used to place an age group on a fitted age axis when too few samples fall in the group.
AGE_GROUP_CENTERS = {"0-9": 5.0, "10-29": 22.0, "30-59": 42.0, "60+": 70.0}
# A target is declared reachable when at least this share of latents steered to it are clearly
# met by our heads (Target.clearly_met_by): where hits are rarer, those few are more likely the
# heads' mistakes than the target. With the UTKFace heads the default DCGAN's adult targets sit
# at 0.09-0.34 (women 10-29 and 30-59 alike, 0.09 and 0.11) and children / over-60s at 0-0.02.
REACHABLE_HIT_RATE = 0.08

# What a pool accepts (see Target.clearly_met_by), and how far in pose a chosen face may be from
# the face it replaces (yaw + pitch / 2, see _pose_distance): beyond it the face is blurred. With
# the eigenface model (whose faces turn little: measured pool yaw within +-0.07) 0.35 replaced 180
# of 218 measured faces instead of 127 at 0.15, and every figure improved: re-identified 0.161 vs
# 0.184, still detected 0.872 vs 0.706, gender kept 0.958 vs 0.942, age group 0.763 vs 0.695.
# Warping the face so its 5 landmarks land exactly on the target's (a thin-plate spline, to turn
# it) was tried and dropped: re-identified 0.216 (the original's feature geometry is identity).
POOL_MIN_GENDER_PROB = 0.8
POOL_MIN_AGE_GROUP_PROB = 0.5
POOL_MAX_YAW = 0.5
POSE_TOLERANCE = 0.35
# Poses a pose-conditioned generator's pool is drawn at, in turn (yaw, pitch as Face.pose): yaw
# up to the anonymizer's limit for synthetic faces (mirrors give the negative yaws), pitch around
# UTKFace's median (0.08) and its 10th / 90th percentiles.
POOL_POSES = tuple((yaw, pitch) for yaw in (0.0, 0.1, 0.2, 0.3, 0.4) for pitch in (0.08, -0.04, 0.19))

# Labels generated faces with the detector and its heads: one Face (or None) per image.
FaceAnalyzer = Callable[[list[np.ndarray]], list[Face | None]]


@dataclass(frozen=True)
class Target:
    gender: str | None = None
    age_group: str | None = None
    yaw: float | None = None
    pitch: float | None = None

    @property
    def key(self) -> str:
        return f"{self.gender}/{self.age_group}"

    def met_by(self, face: Face) -> bool:
        return (self.gender is None or face.gender == self.gender) and (
            self.age_group is None or face.age_group == self.age_group
        )

    def clearly_met_by(self, face: Face) -> bool:
        """Met with confidence, by a face that can be aligned: what a pool accepts.

        Borderline calls of our heads on generated faces are where they are most often wrong
        (a face judged 55% male often does not look male), and extreme landmark configurations
        are broken faces rather than profiles.
        """
        if not self.met_by(face) or abs(face.pose[0]) > POOL_MAX_YAW:
            return False
        if self.gender is not None and face.gender_prob is not None and face.gender_prob < POOL_MIN_GENDER_PROB:
            return False
        return self.age_group is None or face.age_group_probs is None or \
            face.age_group_probs[AGE_GROUPS.index(self.age_group)] >= POOL_MIN_AGE_GROUP_PROB


@dataclass
class SyntheticFace:
    image: np.ndarray  # R x R x 3 RGB uint8
    landmarks: np.ndarray  # (5, 2) in the image's pixels, image-left first
    latent: np.ndarray  # the generator input it came from (before any flip)
    index: int  # its place in its target's pool
    face: Face  # what our detector and heads see in it
    flipped: bool = False
    pose_condition: tuple[float, float] | None = None  # the pose a pose-conditioned generator drew it at


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Generator output (N, 3, R, R) in about [-1, 1] -> RGB uint8 arrays."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [np.ascontiguousarray(img) for img in scaled.permute(0, 2, 3, 1).cpu().numpy()]


def mirror(face: SyntheticFace) -> SyntheticFace:
    """The same synthetic person seen in a mirror: the yaw changes sign."""
    width = face.image.shape[1]
    landmarks = face.landmarks.copy()
    landmarks[:, 0] = width - 1 - landmarks[:, 0]
    landmarks = landmarks[[1, 0, 2, 4, 3]]  # image-left comes first again
    mirrored = Face(box=face.face.box.copy(), landmarks=landmarks, score=face.face.score,
                    gender=face.face.gender, gender_prob=face.face.gender_prob, age_group=face.face.age_group,
                    age_group_probs=face.face.age_group_probs, age=face.face.age)
    mirrored.box[[0, 2]] = width - 1 - face.face.box[[2, 0]]
    return SyntheticFace(np.ascontiguousarray(face.image[:, ::-1]), landmarks, face.latent, face.index, mirrored,
                         not face.flipped, face.pose_condition)


@dataclass
class LatentAxes:
    """TL-GAN attribute axes of an unconditional generator, fitted on labelled samples."""

    gender: np.ndarray  # unit vector, + towards female
    age: np.ndarray  # unit vector orthogonal to gender, + towards older
    gender_positions: dict[str, float]  # where on the gender axis each gender sits
    age_positions: dict[str, float]  # where on the age axis each age group sits
    capability: dict[str, float] = field(default_factory=dict)  # target key -> measured hit rate
    fitted_on: int = 0
    capability_judge: str = "our own heads"  # who graded the capability figures

    @classmethod
    def fit(cls, latents: np.ndarray, faces: list[Face | None]) -> LatentAxes:
        labelled = [(z, f) for z, f in zip(latents, faces) if f is not None and f.gender is not None]
        if len(labelled) < 50:
            raise ValueError(f"only {len(labelled)} labelled samples: too few to fit latent axes")
        z = np.stack([item[0] for item in labelled]).astype(np.float64)
        female = np.array([f.gender_prob if f.gender == "female" else 1 - f.gender_prob for _, f in labelled])
        ages = np.array([f.age for _, f in labelled], dtype=np.float64)
        groups = np.array([f.age_group for _, f in labelled])
        gender_axis = _unit(_regression_direction(z, female))
        # Decorrelate: age moves only in the orthogonal complement of gender, so steering age
        # does not flip gender (in TL-GAN's words, "disentangle correlated feature axes").
        age_axis = _unit(_project_out(_regression_direction(z, ages), [gender_axis]))
        gender_proj, age_proj = z @ gender_axis, z @ age_axis
        is_female = female > 0.5
        gender_positions = {
            "female": float(np.percentile(gender_proj[is_female], 75)) if is_female.sum() >= 10 else 2.0,
            "male": float(np.percentile(gender_proj[~is_female], 25)) if (~is_female).sum() >= 10 else -2.0,
        }
        slope, intercept = np.polyfit(age_proj, ages, 1)
        age_positions = {}
        for group in AGE_GROUPS:
            members = age_proj[groups == group]
            if members.size >= 20:
                age_positions[group] = float(np.median(members))
            else:  # extrapolate along the fitted line, clipped to a plausible latent range
                age_positions[group] = float(np.clip((AGE_GROUP_CENTERS[group] - intercept) / slope, -3.5, 3.5))
        return cls(gender_axis, age_axis, gender_positions, age_positions, fitted_on=len(labelled))

    def steer(self, z: np.ndarray, target: Target) -> np.ndarray:
        """Move latents (N, z_dim) to the target's place on each axis, leaving the rest as is."""
        z = z.copy()
        if target.gender is not None:
            z += np.outer(self.gender_positions[target.gender] - z @ self.gender, self.gender)
        if target.age_group is not None:
            z += np.outer(self.age_positions[target.age_group] - z @ self.age, self.age)
        return z

    def save(self, path: Path) -> None:
        record = {"gender": self.gender.tolist(), "age": self.age.tolist(),
                  "gender_positions": self.gender_positions, "age_positions": self.age_positions,
                  "capability": self.capability, "capability_judge": self.capability_judge,
                  "fitted_on": self.fitted_on}
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> LatentAxes:
        record = json.loads(path.read_text(encoding="utf-8"))
        return cls(np.array(record["gender"]), np.array(record["age"]), record["gender_positions"],
                   record["age_positions"], record.get("capability", {}), record.get("fitted_on", 0),
                   record.get("capability_judge", "our own heads"))


def _regression_direction(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(z - z.mean(axis=0), y - y.mean(), rcond=None)
    return coef


def _project_out(v: np.ndarray, axes: list[np.ndarray]) -> np.ndarray:
    for axis in axes:
        v = v - (v @ axis) * axis
    return v


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


class SyntheticFaceSource:
    """Makes verified synthetic faces for targets, from a generator and our face analyzer.

    Each target gets a pool of verified faces, drawn once (steered, labelled by our heads, misses
    dropped) from a seed fixed per target, then reused: a face in a photo is a choice among the
    pool by its own seed. Drawing is what costs (one detector pass per batch), so a photo with
    ten bystanders costs ten choices, not ten rounds of generation; the pool's hit rate is the
    target's measured steered hit rate.
    """

    def __init__(self, generator: torch.nn.Module, analyzer: FaceAnalyzer, axes: LatentAxes | None,
                 device: torch.device, pool_size: int = 32, max_draws: int = 256, batch: int = 16,
                 choices: int = 6, sampling_kwargs: dict | None = None) -> None:
        self.generator = generator.to(device).eval()
        self.sampling_kwargs = sampling_kwargs or {}
        self.analyzer = analyzer
        self.device = device
        self._pools: dict[str, Pool] = {}
        self.axes = axes
        self.pool_size = pool_size
        self.max_draws = max_draws
        self.batch = batch
        self.choices = choices

    @property
    def axes(self) -> LatentAxes | None:
        return self._axes

    @axes.setter
    def axes(self, axes: LatentAxes | None) -> None:
        self._axes = axes
        self._pools.clear()  # pools were steered with the previous axes

    @property
    def conditional(self) -> bool:
        return getattr(self.generator, "c_dim", 0) > 0

    def can_make(self, target: Target) -> bool:
        """Whether measurement showed this generator meets the target's gender and age group."""
        if target.gender is None and target.age_group is None:
            return not self.conditional
        if self.axes is None or not self.axes.capability:
            return False  # never measured: an unverified generator must not replace a child's face
        return self.axes.capability.get(target.key, 0.0) >= REACHABLE_HIT_RATE

    @property
    def resolution(self) -> int:
        """Side of the generated images, in pixels."""
        target = Target(GENDERS[0], AGE_GROUPS[0]) if self.conditional else Target()
        return self.sample(np.zeros((1, self.generator.z_dim)), target)[0].shape[0]

    def label(self, target: Target, count: int) -> torch.Tensor | None:
        """A conditional generator's one-hot class (gender x age group, as it was trained)."""
        if not self.conditional:
            return None
        if target.gender is None or target.age_group is None:
            raise ValueError("a conditional generator needs both a gender and an age group")
        c = torch.zeros(count, self.generator.c_dim, device=self.device)
        c[:, GENDERS.index(target.gender) * len(AGE_GROUPS) + AGE_GROUPS.index(target.age_group)] = 1
        return c

    @torch.inference_mode()
    def sample(self, latents: np.ndarray, target: Target = Target(), poses: np.ndarray | None = None
               ) -> list[np.ndarray]:
        """Generated images for latents (N, z_dim); ``poses`` (N, 2) only for pose-conditioned generators."""
        z = torch.from_numpy(latents.astype(np.float32)).to(self.device)
        kwargs = dict(self.sampling_kwargs)
        if poses is not None:
            kwargs["pose"] = torch.from_numpy(poses.astype(np.float32)).to(self.device)
        return to_uint8(self.generator(z, self.label(target, len(latents)), **kwargs))

    def pool(self, target: Target) -> Pool:
        """The target's verified faces, drawn at first use (steered when the generator is unconditional)."""
        key = target.key
        if key not in self._pools:
            rng = np.random.RandomState(_target_seed(key))
            hits: list[SyntheticFace] = []
            draws = detected = met = gender_met = age_met = 0
            while draws < self.max_draws and len(hits) < self.pool_size:
                z = rng.randn(self.batch, self.generator.z_dim)
                if self.axes is not None and not self.conditional:
                    z = self.axes.steer(z, target)
                poses = None
                if getattr(self.generator, "takes_pose", False):  # spread the pool over poses
                    poses = np.array([POOL_POSES[(draws + i) % len(POOL_POSES)] for i in range(len(z))])
                images = self.sample(z, target, poses)
                conditions = [None] * len(z) if poses is None else [tuple(map(float, pose)) for pose in poses]
                for latent, image, face, condition in zip(z, images, self.analyzer(images), conditions):
                    detected += face is not None
                    if face is None:
                        continue
                    gender_met += face.gender == target.gender
                    age_met += face.age_group == target.age_group
                    if not target.clearly_met_by(face):
                        continue
                    met += 1
                    if len(hits) < self.pool_size:
                        hits.append(SyntheticFace(image, face.landmarks, latent, len(hits), face,
                                                  pose_condition=condition))
                draws += len(z)
            self._pools[key] = Pool(hits, draws, detected, met, gender_met, age_met)
        return self._pools[key]

    def draw_pools(self) -> list[str]:
        """Draws the pool of every gender x age-group target this generator can make; their keys.

        A pool costs a second or two of generation and analysis at first use; a long-running
        process (the bot) draws them all at start so that no user's photo pays for them.
        """
        targets = [Target(gender, group) for gender in GENDERS for group in AGE_GROUPS]
        drawn = [target for target in targets if self.can_make(target)]
        for target in drawn:
            self.pool(target)
        return [target.key for target in drawn]

    def choose(self, target: Target, seed: int, taken: set[int] = frozenset()) -> SyntheticFace | None:
        """A pool face for this seed: among a few seeded picks not ``taken``, the closest in pose.

        The picks depend only on the seed (and on ``taken``), so a face can be re-rolled alone.
        Every pool face is also offered mirrored, which flips its yaw. When no pick is within
        POSE_TOLERANCE of the target's pose, the whole pool is searched; None when nothing in it
        is (or the pool is empty).
        """
        members = self.pool(target).faces
        if not members:
            return None
        order = np.random.RandomState(seed).permutation(len(members))
        free = [i for i in order if i not in taken] or list(order)  # a pool used up is reused
        if target.yaw is None:
            return members[free[0]]
        pose = (target.yaw, target.pitch or 0.0)

        def closest(indices: list[int]) -> tuple[float, SyntheticFace]:
            offered = [members[i] for i in indices] + [mirror(members[i]) for i in indices]
            best = min(offered, key=lambda c: _pose_distance(c.face.pose, pose))
            return _pose_distance(best.face.pose, pose), best

        distance, best = closest(free[:self.choices])
        if distance > POSE_TOLERANCE:
            distance, best = closest(free)
        return best if distance <= POSE_TOLERANCE else None


@dataclass
class Pool:
    faces: list[SyntheticFace]  # verified hits, in drawing order
    draws: int  # generated samples it took
    detected: int  # of those, how many our detector found a face in
    met: int  # of those, how many met the target by our heads (the last batch may overfill the pool)
    gender_met: int = 0  # of the detected, how many our heads judged of the target's gender
    age_met: int = 0  # ... and of its age group (each on its own, before any confidence threshold)

    @property
    def hit_rate(self) -> float:
        return self.met / self.draws if self.draws else 0.0


def _target_seed(key: str) -> int:
    """A fixed seed per target, so pools (and every output made from them) are reproducible."""
    return int.from_bytes(key.encode(), "little") % (2**31 - 1)


def _pose_distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return abs(a[0] - b[0]) + 0.5 * abs(a[1] - b[1])


def fit_latent_axes(source: SyntheticFaceSource, samples: int, seed: int = 0, batch: int = 16) -> LatentAxes:
    """TL-GAN step one: label random samples with our heads and fit the attribute axes."""
    rng = np.random.RandomState(seed)
    latents = rng.randn(samples, source.generator.z_dim)
    faces: list[Face | None] = []
    for start in range(0, samples, batch):
        faces += source.analyzer(source.sample(latents[start:start + batch]))
    return LatentAxes.fit(latents, faces)


def measure_capability(source: SyntheticFaceSource) -> dict[str, float]:
    """Steered hit rate by our heads for every gender x age-group target (the pools' own)."""
    return {Target(g, a).key: round(source.pool(Target(g, a)).hit_rate, 4) for g in GENDERS for a in AGE_GROUPS}
