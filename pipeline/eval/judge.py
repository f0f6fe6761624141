"""An independent gender / age-group judge for measuring generators.

A generator steered and verified with our own heads must not also be graded by them: their
mistakes would count as hits. This judge is a linear probe on the identity embeddings of the
research-only ArcFace model, fitted on UTKFace training faces and checked on the held-out split;
it is used for measurement only, never in the product path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.detect.train_attributes import is_held_out, read_utkface, split_utkface
from pipeline.eval.identity import UTKFACE_PAD, IdentityEmbedder, detected_utkface_faces
from pipeline.types import AGE_GROUPS, GENDERS

AGE_EDGES = (10, 30, 60)  # upper bounds of 0-9, 10-29, 30-59


def age_group_index(age: float) -> int:
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def _softmax_probe(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 400) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(xt), yt) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


@dataclass
class EmbeddingJudge:
    gender: torch.nn.Linear
    age_group: torch.nn.Linear
    held_out: dict

    @torch.inference_mode()
    def judge(self, embeddings: np.ndarray) -> tuple[list[str], list[str]]:
        x = torch.from_numpy(embeddings).float()
        genders = [GENDERS[i] for i in self.gender(x).argmax(1).tolist()]
        groups = [AGE_GROUPS[i] for i in self.age_group(x).argmax(1).tolist()]
        return genders, groups


def fit_judge(zip_path: Path, embedder: IdentityEmbedder, detect_landmarks, train_faces: int = 1500,
              test_faces: int = 400) -> EmbeddingJudge:
    samples = read_utkface(zip_path)
    rng = np.random.default_rng(0)
    train = [samples[i] for i in rng.permutation(len(samples)) if not is_held_out(samples[i])][:train_faces]
    test = split_utkface(zip_path, None, test_faces, 0)[1]  # hash order: names start with the age

    def embed_all(chosen):
        embeddings, genders, groups = [], [], []
        for sample, padded, landmarks in detected_utkface_faces(zip_path, chosen, detect_landmarks):
            embeddings.append(embedder.embed(padded, [landmarks])[0])
            genders.append(sample.gender)
            groups.append(age_group_index(sample.age))
        return np.stack(embeddings), np.array(genders), np.array(groups)

    x, g, a = embed_all(train)
    judge = EmbeddingJudge(_softmax_probe(x, g, 2), _softmax_probe(x, a, 4), {})
    xt, gt, at = embed_all(test)
    genders, groups = judge.judge(xt)
    judge.held_out = {
        "faces": int(len(xt)),
        "gender_accuracy": round(float(np.mean(np.array([GENDERS.index(s) for s in genders]) == gt)), 4),
        "age_group_accuracy": round(float(np.mean(np.array([AGE_GROUPS.index(s) for s in groups]) == at)), 4),
    }
    return judge


def real_face_agreement(zip_path: Path, embedder: IdentityEmbedder, judge: EmbeddingJudge, detect_landmarks,
                        resolution: int, faces: int = 800) -> dict[str, float | None]:
    """How often the judge gets gender and age group both right on real held-out faces shown to it
    as a generator shows its faces: aligned to the generator template at ``resolution`` px.

    This is the judge's ceiling for a generator of that resolution: at 96 px it gets only 12% / 8%
    of real men / women over 60 right (against 64% age-group accuracy overall on padded 200 px
    crops), so "the judge confirmed none of 12 faces over 60" says nothing about the generator there.
    """
    from pipeline.generate.dataset import align, face_template
    from pipeline.generate.matching import Target

    template = face_template(resolution)
    held_out = split_utkface(zip_path, None, faces, 0)[1]
    embeddings, keys = [], []
    inner = slice(UTKFACE_PAD, -UTKFACE_PAD)
    for sample, padded, landmarks in detected_utkface_faces(zip_path, held_out, detect_landmarks):
        aligned = align(padded[inner, inner], landmarks - UTKFACE_PAD, template, resolution)
        embeddings.append(embedder.embed(aligned, [template])[0])
        keys.append(Target(GENDERS[sample.gender], AGE_GROUPS[age_group_index(sample.age)]).key)
    genders, groups = judge.judge(np.stack(embeddings))
    agreement = {}
    for gender in GENDERS:
        for group in AGE_GROUPS:
            key = Target(gender, group).key
            hits = [g == gender and a == group for g, a, k in zip(genders, groups, keys) if k == key]
            agreement[key] = round(float(np.mean(hits)), 4) if hits else None
    return agreement


def judged_capability(source, embedder: IdentityEmbedder, judge: EmbeddingJudge, per_target: int = 16
                      ) -> dict[str, float]:
    """Share of the first ``per_target`` pool faces of each target that the independent judge agrees
    with (a pool with fewer faces counts the missing ones as misses)."""
    from pipeline.generate.matching import Target

    rates = {}
    for gender in GENDERS:
        for group in AGE_GROUPS:
            target = Target(gender, group)
            faces = source.pool(target).faces[:per_target]
            if not faces:
                rates[target.key] = 0.0
                continue
            embeddings = np.concatenate([embedder.embed(m.image, [m.landmarks]) for m in faces])
            genders, groups = judge.judge(embeddings)
            hits = sum(g == gender and a == group for g, a in zip(genders, groups))
            rates[target.key] = round(hits / per_target, 4)
    return rates
