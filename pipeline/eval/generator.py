"""Generator measurements (`facechange eval-generator`).

Per gender x age-group target: how often a verified face is made (attribute hit rate), how our
detector sees the generated faces (detection rate, mean score), how varied they are (mean
pairwise identity similarity: lower is more diverse), the Fréchet distance between the
identity embeddings of generated faces and of held-out real UTKFace faces, and whether generated
faces resemble real training people (a model fitted on real faces could reproduce one): how
often a generated face's nearest training face is above the identity threshold, beside the same
rate for held-out real people, who are strangers to the training set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import linalg

from pipeline.detect.train_attributes import split_utkface
from pipeline.eval.identity import IdentityEmbedder, detected_utkface_faces
from pipeline.generate.matching import SyntheticFaceSource, Target
from pipeline.types import AGE_GROUPS, GENDERS


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def mean_pairwise_similarity(embeddings: np.ndarray) -> float | None:
    if len(embeddings) < 2:
        return None
    sim = embeddings @ embeddings.T
    upper = np.triu_indices(len(embeddings), k=1)
    return float(sim[upper].mean())


def utkface_embeddings(zip_path: Path, embedder: IdentityEmbedder, detect_landmarks, limit: int = 400,
                       held_out: bool = True) -> np.ndarray:
    """Identity embeddings of ``limit`` UTKFace faces (padded, then detected): the first held-out
    ones in hash order, or a seeded random draw of training faces."""
    train, held = split_utkface(zip_path, limit if not held_out else None, limit if held_out else 0, 0)
    samples = held if held_out else train
    return np.stack([embedder.embed(padded, [landmarks])[0]
                     for _, padded, landmarks in detected_utkface_faces(zip_path, samples, detect_landmarks)])


def nearest_similarity(embeddings: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Each embedding's highest cosine similarity to any gallery embedding (all L2-normalized)."""
    return (embeddings @ gallery.T).max(axis=1)


def resemblance_to_training(generated: np.ndarray, held_out: np.ndarray, training: np.ndarray,
                            threshold: float) -> dict:
    """Nearest-training-face similarity of generated faces and, as the baseline, of held-out real
    people. The threshold is a 1:1 one (FAR 1e-3 per pair): against a gallery of thousands most
    strangers pass it somewhere, so the comparison with the baseline is what tells."""
    report: dict = {"training_faces": int(len(training)), "identity_threshold": threshold}
    for name, embeddings in (("generated", generated), ("held_out", held_out)):
        nearest = nearest_similarity(embeddings, training)
        report[f"{name}_nearest_similarity"] = {"mean": round(float(nearest.mean()), 4),
                                                "p95": round(float(np.percentile(nearest, 95)), 4),
                                                "max": round(float(nearest.max()), 4)}
        report[f"{name}_matching_a_training_person"] = round(float((nearest > threshold).mean()), 4)
    return report


def _mean_of(targets: dict, key: str) -> float | None:
    values = [t[key] for t in targets.values() if t[key] is not None]
    return round(float(np.mean(values)), 4) if values else None


def evaluate_generator(source: SyntheticFaceSource, embedder: IdentityEmbedder, reference: np.ndarray,
                       per_target: int = 16, raw_samples: int = 64, seed: int = 0,
                       training: np.ndarray | None = None, threshold: float = 0.3369) -> dict:
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
    if training is not None:
        report["resemblance_to_training_people"] = resemblance_to_training(generated, reference, training, threshold)
    return report
