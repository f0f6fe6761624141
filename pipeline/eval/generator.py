"""Generator measurements (`facechange eval-generator`).

Per gender x age-group target: how often a verified face is made (attribute hit rate), how our
detector sees the generated faces (detection rate, mean score), how varied they are (mean
pairwise identity similarity: lower is more diverse), and the Fréchet distance between the
identity embeddings of generated faces and of held-out real UTKFace faces.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg

from pipeline.detect.train_attributes import split_utkface
from pipeline.eval.identity import IdentityEmbedder
from pipeline.generate.matching import SyntheticFaceSource, Target
from pipeline.types import AGE_GROUPS, GENDERS


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def mean_pairwise_similarity(embeddings: np.ndarray) -> float | None:
    if len(embeddings) < 2:
        return None
    sim = embeddings @ embeddings.T
    upper = np.triu_indices(len(embeddings), k=1)
    return float(sim[upper].mean())


def utkface_reference_embeddings(zip_path: Path, embedder: IdentityEmbedder, detect_landmarks,
                                 limit: int = 400) -> np.ndarray:
    """Identity embeddings of the first ``limit`` held-out UTKFace faces (padded, then detected)."""
    samples = split_utkface(zip_path, None, limit, 0)[1]  # hash order: names start with the age
    embeddings = []
    with zipfile.ZipFile(zip_path) as archive:
        for sample in samples:
            crop = np.asarray(Image.open(io.BytesIO(archive.read(sample.member))).convert("RGB"))
            padded = np.pad(crop, ((50, 50), (50, 50), (0, 0)), mode="constant", constant_values=127)
            landmarks = detect_landmarks(padded)
            if landmarks is not None:
                embeddings.append(embedder.embed(padded, [landmarks])[0])
    return np.stack(embeddings)


def _mean_of(targets: dict, key: str) -> float | None:
    values = [t[key] for t in targets.values() if t[key] is not None]
    return round(float(np.mean(values)), 4) if values else None


def evaluate_generator(source: SyntheticFaceSource, embedder: IdentityEmbedder, reference: np.ndarray,
                       per_target: int = 16, raw_samples: int = 64, seed: int = 0) -> dict:
    # Raw quality, before any steering or verification: what the generator gives by itself
    # (a conditional one gets every class in turn).
    latents = np.random.RandomState(seed).randn(raw_samples, source.generator.z_dim)
    if source.conditional:
        classes = [Target(gender, group) for gender in GENDERS for group in AGE_GROUPS]
        images = [image for i, target in enumerate(classes)
                  for image in source.sample(latents[i::len(classes)], target)]
    else:
        images = source.sample(latents)
    raw = source.analyzer(images)
    detected = [f for f in raw if f is not None]
    report: dict = {"raw": {"samples": raw_samples, "detection_rate": round(len(detected) / raw_samples, 4),
                            "mean_score": round(float(np.mean([f.score for f in detected])), 4) if detected else None},
                    "targets": {}}
    all_embeddings = []
    for gender in GENDERS:
        for group in AGE_GROUPS:
            target = Target(gender, group)
            pool = source.pool(target)
            faces = pool.faces[:per_target]
            emb = embedder.embed_aligned([]) if not faces else np.concatenate(
                [embedder.embed(m.image, [m.landmarks]) for m in faces])
            all_embeddings.append(emb)
            report["targets"][target.key] = {
                # latents steered to the target that our heads then judged on target
                "hit_rate": round(pool.hit_rate, 4),
                # each attribute on its own, among the detected draws (the hit-rate targets)
                "gender_hit_rate": round(pool.gender_met / pool.detected, 4) if pool.detected else None,
                "age_group_hit_rate": round(pool.age_met / pool.detected, 4) if pool.detected else None,
                "steered_samples": pool.draws,
                "steered_detection_rate": round(pool.detected / pool.draws, 4) if pool.draws else None,
                "declared_reachable": source.can_make(target),
                "faces_measured": len(faces),
                "mean_detection_score": round(float(np.mean([m.face.score for m in faces])), 4) if faces else None,
                "mean_pairwise_identity_similarity": mean_pairwise_similarity(emb),
            }
    generated = np.concatenate(all_embeddings)
    hits = [t["hit_rate"] for t in report["targets"].values()]
    report["overall"] = {
        "hit_rate": round(float(np.mean(hits)), 4),
        "gender_hit_rate": _mean_of(report["targets"], "gender_hit_rate"),
        "age_group_hit_rate": _mean_of(report["targets"], "age_group_hit_rate"),
        "faces": int(len(generated)),
        "mean_pairwise_identity_similarity": mean_pairwise_similarity(generated),
        "reference_pairwise_identity_similarity": mean_pairwise_similarity(reference),
        "identity_frechet_distance": round(frechet_distance(generated, reference), 4) if len(generated) > 2 else None,
        "reference_faces": int(len(reference)),
    }
    return report
