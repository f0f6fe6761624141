"""The one API the front ends use: load every model once, then detect -> select -> generate -> swap."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.detect import DetectorConfig, RetinaFaceDetector, build_detector
from pipeline.generate import BUILTIN_GENERATORS, DEFAULT_GENERATOR, build_generator
from pipeline.generate.matching import LatentAxes, SyntheticFace, SyntheticFaceSource, Target
from pipeline.runtime import cache_dir, resolve_device, set_threads
from pipeline.select import mark_kept, number_in_reading_order
from pipeline.swap import SwapConfig, build_swapper
from pipeline.swap.masks import face_mask
from pipeline.swap.obscure import blur_face, pixelate_face
from pipeline.types import TREATMENTS, Face, Fallback, Replacement

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class AnonymizerConfig:
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    # "dcgan", "eigenfaces" (built in), an official StyleGAN2-ADA .pkl, or our trained .pt.
    generator: str = DEFAULT_GENERATOR
    # TL-GAN axes and measured capability of that generator (see `facechange fit-latent-axes`);
    # None: weights/NAME_latent_axes.json for a built-in one, FILE.axes.json beside any other.
    latent_axes: Path | None = None

    def axes_path(self) -> Path:
        if self.latent_axes is not None:
            return self.latent_axes
        if self.generator in BUILTIN_GENERATORS:
            return WEIGHTS_DIR / f"{self.generator}_latent_axes.json"
        return Path(self.generator).with_suffix(".axes.json")
    device: str = "auto"
    threads: int | None = None
    # Beyond this yaw (nose offset over eye distance) a frontal synthetic face cannot be aligned
    # convincingly onto a profile: such faces get the blur instead of a broken face.
    max_yaw: float = 0.45
    # Below this size a face is a few blurry pixels: a blur hides it as well as a new face would.
    min_synthetic_size: float = 12.0
    # The detector's threshold is low so that no face is missed, and a box of some size with a low
    # score is rarely a face (`eval-detect`'s low_scores_by_size, all 494 WIDER dev photos: of boxes
    # >= 48 px scoring under 0.7, 30 are faces (4% of 761) and 111 false boxes (74% of 149) on
    # shirts, patterns, hands): such a box gets the blur, a soft smudge, not a generated face. From
    # 100 px only (the earlier rule) it caught 51 false boxes for 6 faces. Under 48 px boxes are too
    # often real (26 of the 74 scoring under 0.5 at 32-48 px).
    doubtful_size: float = 48.0
    doubtful_score: float = 0.7


@dataclass
class StageTimes:
    """Seconds spent per stage in the last call, for benchmarks."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, stage: str, start: float) -> None:
        self.seconds[stage] += time.perf_counter() - start


def face_seed(seed: int, number: int) -> int:
    """Each face's own seed, so one face can be re-rolled without changing the others."""
    return (seed * 1_000_003 + number * 7_919) % (2**31 - 1)


class Anonymizer:
    def __init__(self, cfg: AnonymizerConfig | None = None) -> None:
        cfg = cfg or AnonymizerConfig()
        self.cfg = cfg
        set_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.detector: RetinaFaceDetector = build_detector(cfg.detector, self.device, cache_dir())
        axes_path = cfg.axes_path()
        axes = LatentAxes.load(axes_path) if axes_path.is_file() else None
        generator = build_generator(cfg.generator, self.device)
        self.faces_source = SyntheticFaceSource(generator.module, self.analyze_synthetic, axes, self.device,
                                                sampling_kwargs=generator.sampling_kwargs)
        self.swapper = build_swapper(cfg.swap, self.device)
        self.times = StageTimes()

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        start = time.perf_counter()
        faces = number_in_reading_order(self.detector.detect(image_rgb))
        self.times.add("detect", start)
        return faces

    def analyze_synthetic(self, images: list[np.ndarray]) -> list[Face | None]:
        """Our detector's view of generated faces: all of them in one mosaic, one forward pass.

        Each face is upscaled to detector-friendly size and framed with a grey margin (a
        generated face fills its image; the detector needs context around it).
        """
        if not images:
            return []
        side, margin = 128, 32  # any generator resolution is shown to the detector at 128 px
        scale = side / images[0].shape[0]
        cell = side + 2 * margin
        columns = min(4, len(images))
        rows = -(-len(images) // columns)
        mosaic = np.full((rows * cell, columns * cell, 3), 127, np.uint8)
        for i, image in enumerate(images):
            r, c = divmod(i, columns)
            top, left = r * cell + margin, c * cell + margin
            interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            mosaic[top:top + side, left:left + side] = cv2.resize(image, (side, side), interpolation=interpolation)
        best: list[Face | None] = [None] * len(images)
        for face in self.detector.detect(mosaic, threshold=0.5):
            cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
            r, c = int(cy // cell), int(cx // cell)
            index = r * columns + c
            if index >= len(images) or (best[index] is not None and best[index].score >= face.score):
                continue
            origin = np.array([c * cell + margin, r * cell + margin], np.float32)
            face.landmarks = (face.landmarks - origin) / scale
            face.box = (face.box - np.tile(origin, 2)) / scale
            best[index] = face
        return best

    def anonymize(self, image_rgb: np.ndarray, faces: list[Face], keep: set[int] | None = None,
                  mode: str = "synthetic", seed: int = 0, face_seeds: dict[int, int] | None = None) -> np.ndarray:
        """A new image where every face not kept is replaced; ``faces`` get their Replacement records.

        ``keep`` holds face numbers (as in the preview) and overrides the faces' own keep flags
        when given; ``face_seeds`` overrides single faces' seeds (a re-roll).
        """
        if mode not in TREATMENTS:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(TREATMENTS)}")
        if keep is not None:
            mark_kept(faces, keep)
        face_seeds = face_seeds or {}
        out = image_rgb.copy()
        shape = image_rgb.shape[:2]
        protected = np.zeros(shape, np.float32)
        for face in faces:
            if face.keep:
                face.replacement = None
                protected = np.maximum(protected, (face_mask(face, shape, feather=0.0) > 0).astype(np.float32))
        default_seeds = {id(face): face_seed(seed, face.number or 0) for face in faces}
        chosen = self._choose_synthetic([f for f in faces if not f.keep], default_seeds, face_seeds) \
            if mode == "synthetic" else {}
        # Smaller faces first: they are usually behind, and a larger face in front is pasted last.
        for face in sorted((f for f in faces if not f.keep), key=lambda f: f.size):
            this_seed = face_seeds.get(face.number, default_seeds[id(face)])
            face.replacement = self._replace(out, face, 1.0 - protected, mode, this_seed,
                                             np.random.default_rng(this_seed), chosen.get(id(face)))
        return out

    def _choose_synthetic(self, faces: list[Face], default_seeds: dict[int, int], face_seeds: dict[int, int]
                          ) -> dict[int, SyntheticFace | Fallback]:
        """Each replaced face's synthetic face (by ``id(face)``), or why it gets none.

        No synthetic person appears twice in a photo, and a re-roll changes only its own face:
        every face first takes its pick for its default seed, in number order, avoiding the
        picks before it; then each re-rolled face (``face_seeds``), in number order, takes a pick
        for its new seed avoiding every default pick (its own included, so it does change) and
        the re-rolls before it. A new re-roll thus never moves a face that was not re-rolled.
        """
        start = time.perf_counter()
        targets, chosen = {}, {}
        for face in sorted(faces, key=lambda f: f.number or 0):
            target = Target(face.gender, face.age_group, *face.pose)
            reason = self._why_not_synthetic(face, target)
            if reason is None:
                targets[id(face)] = (face, target)
            else:
                chosen[id(face)] = reason
        taken: dict[str, set[int]] = defaultdict(set)
        for key, (face, target) in targets.items():
            pick = self.faces_source.choose(target, default_seeds[key], taken[target.key])
            if pick is not None:
                taken[target.key].add(pick.index)
            chosen[key] = pick
        for key, (face, target) in targets.items():
            if face.number in face_seeds:
                pick = self.faces_source.choose(target, face_seeds[face.number], taken[target.key])
                if pick is not None:
                    taken[target.key].add(pick.index)
                chosen[key] = pick
        for key, pick in chosen.items():
            if pick is None:
                target = targets[key][1]
                chosen[key] = Fallback("pose") if self.faces_source.pool(target).faces else Fallback("no_match")
        self.times.add("generate", start)
        return chosen

    def _replace(self, image: np.ndarray, face: Face, allowed: np.ndarray, mode: str, seed: int,
                 rng: np.random.Generator, synthetic: SyntheticFace | Fallback | None) -> Replacement:
        """Treat one face in place; ``allowed`` is 0 over kept faces, which must stay untouched.

        ``synthetic`` is the face's chosen synthetic face, or why it has none (synthetic mode).
        """
        start = time.perf_counter()
        shape = image.shape[:2]
        mask = face_mask(face, shape) * allowed
        if mode == "pixelate":
            pixelate_face(image, face, mask)
            self.times.add("swap", start)
            return Replacement("pixelate", seed=seed)
        if isinstance(synthetic, SyntheticFace):
            self.swapper.swap(image, face, synthetic.image, synthetic.landmarks, allowed, rng)
            self.times.add("swap", start)
            return Replacement("synthetic", seed=seed, latent=synthetic.latent.tolist(),
                               pose_condition=synthetic.pose_condition, mirrored=synthetic.flipped)
        blur_face(image, face, mask, rng)
        self.times.add("swap", start)
        return Replacement("blur", fallback=synthetic, seed=seed)

    def _why_not_synthetic(self, face: Face, target: Target) -> Fallback | None:
        if face.size >= self.cfg.doubtful_size and face.score < self.cfg.doubtful_score:
            return Fallback("doubtful", (("score", round(face.score, 2)),))
        if face.size < self.cfg.min_synthetic_size:
            return Fallback("too_small", (("size", self.cfg.min_synthetic_size),))
        if abs(target.yaw or 0.0) > self.cfg.max_yaw:
            return Fallback("profile")
        if not self.faces_source.can_make(target):
            return Fallback("unreachable", (("gender", target.gender), ("age_group", target.age_group)))
        return None
