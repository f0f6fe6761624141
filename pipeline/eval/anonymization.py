"""Anonymization benchmark: re-identification, detection and attribute retention, time by stage.

Every mode runs on the same photos in the same run, so synthetic faces are compared with blur and
pixelate directly. Faces of at least ``min_face`` px are measured (smaller ones cannot be
recognized by people or by the identity model in the first place). On photos with annotated
faces (WIDER), a detection that overlaps none of them is a false box: it is not measured as a
face (a generated face pasted on a shirt would count as "still detected"), and how many false
boxes got a generated face is reported on its own.

Two controls say what the re-identification figure can mean: the same faces painted flat (the
floor of replacing only the face), and different annotated people of the same photo compared
with each other (how often the identity model "matches" two people who are not the same at this
threshold, on these photos' faces: a replaced face cannot be told from a stranger below that).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.anonymizer import Anonymizer
from pipeline.eval.identity import Embedder
from pipeline.eval.wider import TRUE_FACE_IOU, load_wider, xywh_to_xyxy
from pipeline.image_io import load_image, save_image
from pipeline.swap.masks import face_mask, face_region
from pipeline.swap.obscure import composite
from pipeline.types import TREATMENTS, Face


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match(face: Face, found: list[Face]) -> Face | None:
    best = max(found, key=lambda f: _iou(face.box, f.box), default=None)
    return best if best is not None and _iou(face.box, best.box) >= 0.5 else None


def _sheet(original: np.ndarray, results: dict[str, np.ndarray], width: int = 1800) -> np.ndarray:
    """Original and each mode side by side, labelled, scaled to a viewable width."""
    panels = [("original", original)] + list(results.items())
    row = np.concatenate([img for _, img in panels], axis=1)
    scale = min(1.0, width / row.shape[1])
    row = cv2.resize(row, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    panel_width = row.shape[1] / len(panels)
    for i, (name, _) in enumerate(panels):
        cv2.putText(row, name, (int(i * panel_width) + 8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 0), 2,
                    cv2.LINE_AA)
    return row


def evaluate_anonymization(anonymizer: Anonymizer, embedder: Embedder, threshold: float,
                           photos: list[Path], sheets_dir: Path | None = None, min_face: float = 32.0,
                           modes: tuple[str, ...] = TREATMENTS, seed: int = 0,
                           true_boxes: dict[Path, np.ndarray] | None = None) -> dict:
    """``true_boxes``: annotated faces (N, 4 x1 y1 x2 y2) of the photos that have them."""
    totals = {mode: {"faces": 0, "reidentified": 0, "detected": 0, "gender_kept": 0, "gender_known": 0,
                     "age_group_kept": 0, "age_known": 0, "similarity": 0.0, "seconds": 0.0,
                     "replaced_faces": 0, "treatments": {}, "stage_seconds": {}, "by_treatment": {}, "by_size": {},
                     "by_synthetic_mode_treatment": {}} for mode in modes}
    # The measurement's floor: the same faces with the whole face ellipse painted flat. Some still
    # "match" with no face left at all: the crop keeps hair, ears, outline and background.
    erased = {"faces": 0, "reidentified": 0, "similarity": 0.0, "by_size": {}}
    false_boxes = {"boxes": 0, "given_a_generated_face": 0}
    other_people: dict = {"pairs": 0, "matched": 0, "by_size": {}}
    per_photo = []
    if sheets_dir:
        sheets_dir.mkdir(parents=True, exist_ok=True)
    for path in photos:
        image = load_image(path)
        start = time.perf_counter()
        faces = anonymizer.detect(image)
        detect_seconds = time.perf_counter() - start
        large = [i for i, f in enumerate(faces) if f.size >= min_face]
        annotated = (true_boxes or {}).get(path)
        person = {} if annotated is None else {i: _annotated_person(faces[i], annotated) for i in large}
        false_at = [i for i in large if person.get(i, 0) < 0]
        measured_at = [i for i in large if i not in false_at]
        measured = [faces[i] for i in measured_at]
        original_embeddings = embedder.embed(image, [f.landmarks for f in measured])
        if annotated is not None:
            _compare_people(other_people, measured, [person[i] for i in measured_at], original_embeddings,
                            threshold)
        results = {}
        photo_record = {"image": str(path), "faces": len(faces), "measured_faces": len(measured)}
        if measured:
            similarity = np.sum(original_embeddings * embedder.embed(erase_faces(image, measured),
                                                                     [f.landmarks for f in measured]), axis=1)
            erased["faces"] += len(measured)
            erased["reidentified"] += int((similarity > threshold).sum())
            erased["similarity"] += float(similarity.sum())
            for face, sim in zip(measured, similarity):
                _tally(erased["by_size"], _size_bucket(face.size), sim > threshold, None)
        # What synthetic mode did to each face, so every mode is also compared on the same faces
        # (the faces that got a generated person are not a random sample of the measured ones).
        synthetic_treatment: dict[int, str] = {}
        for mode in sorted(modes, key=lambda name: name != "synthetic"):
            mode_faces = copy.deepcopy(faces)
            anonymizer.times.seconds.clear()
            start = time.perf_counter()
            result = anonymizer.anonymize(image, mode_faces, keep=set(), mode=mode, seed=seed)
            seconds = time.perf_counter() - start + detect_seconds
            results[mode] = result
            total = totals[mode]
            total["seconds"] += seconds
            total["replaced_faces"] += len(mode_faces)
            for stage, value in anonymizer.times.seconds.items():
                total["stage_seconds"][stage] = total["stage_seconds"].get(stage, 0.0) + value
            total["stage_seconds"]["detect"] = total["stage_seconds"].get("detect", 0.0) + detect_seconds
            for face in mode_faces:
                kind = face.replacement.treatment
                total["treatments"][kind] = total["treatments"].get(kind, 0) + 1
            if mode == "synthetic":
                synthetic_treatment = {i: face.replacement.treatment for i, face in enumerate(mode_faces)}
                false_boxes["boxes"] += len(false_at)
                false_boxes["given_a_generated_face"] += sum(synthetic_treatment[i] == "synthetic" for i in false_at)
            photo_record[f"{mode}_seconds"] = round(seconds, 3)
            if not measured:
                continue
            redetected = anonymizer.detector.detect(result)
            after = embedder.embed(result, [f.landmarks for f in measured])
            similarity = np.sum(original_embeddings * after, axis=1)
            total["faces"] += len(measured)
            total["reidentified"] += int((similarity > threshold).sum())
            total["similarity"] += float(similarity.sum())
            for face, index, sim in zip(measured, measured_at, similarity):
                found = _match(face, redetected)
                # synthetic mode mixes synthetic faces and blur fallbacks: report each on its own
                _tally(total["by_treatment"], mode_faces[index].replacement.treatment, sim > threshold, found)
                _tally(total["by_size"], _size_bucket(face.size), sim > threshold, found)
                if synthetic_treatment:
                    _tally(total["by_synthetic_mode_treatment"], f"faces synthetic mode gave: "
                           f"{synthetic_treatment[index]}", sim > threshold, found)
                if found is None:
                    continue
                total["detected"] += 1
                if face.gender is not None and found.gender is not None:
                    total["gender_known"] += 1
                    total["gender_kept"] += int(found.gender == face.gender)
                if face.age_group is not None and found.age_group is not None:
                    total["age_known"] += 1
                    total["age_group_kept"] += int(found.age_group == face.age_group)
        per_photo.append(photo_record)
        if sheets_dir:
            save_image(_sheet(image, results), sheets_dir / f"{path.stem}.sheet.jpg")
    return {"photos": len(photos), "min_face": min_face, "threshold": threshold, "modes": {
        mode: _summary(total, len(photos)) for mode, total in totals.items()},
        "erased_face_control": {
            "faces_measured": erased["faces"], "reidentification": _rate(erased["reidentified"], erased["faces"]),
            "mean_identity_similarity": round(erased["similarity"] / erased["faces"], 4) if erased["faces"] else None,
            "by_size": {k: {"faces_measured": v["faces"], "reidentification": _rate(v["reidentified"], v["faces"])}
                        for k, v in sorted(erased["by_size"].items())}},
        "different_people_control": {
            "pairs": other_people["pairs"], "false_match_rate": _rate(other_people["matched"], other_people["pairs"]),
            "by_size_of_the_smaller_face": {
                k: {"pairs": v["pairs"], "false_match_rate": _rate(v["matched"], v["pairs"])}
                for k, v in sorted(other_people["by_size"].items())}},
        "false_boxes_on_annotated_photos": false_boxes if "synthetic" in modes else {"boxes": None},
        "per_photo": per_photo}


def _annotated_person(face: Face, annotated: np.ndarray) -> int:
    """The index of the annotated face this detection is (IoU >= TRUE_FACE_IOU, the largest); -1 for none."""
    overlaps = [_iou(face.box, box) for box in annotated]
    best = int(np.argmax(overlaps)) if overlaps else -1
    return best if best >= 0 and overlaps[best] >= TRUE_FACE_IOU else -1


def _compare_people(tally: dict, faces: list[Face], person: list[int], embeddings: np.ndarray,
                    threshold: float) -> None:
    """Counts pairs of faces matched to different annotated people whose originals match each other."""
    similarity = embeddings @ embeddings.T
    for i, j in zip(*np.triu_indices(len(faces), 1)):
        if person[i] == person[j]:  # two boxes on one annotated face
            continue
        matched = bool(similarity[i, j] > threshold)
        for group in (tally, tally["by_size"].setdefault(_size_bucket(min(faces[i].size, faces[j].size)),
                                                         {"pairs": 0, "matched": 0})):
            group["pairs"] += 1
            group["matched"] += int(matched)


SIZE_BUCKETS = ((64.0, "under 64 px"), (128.0, "64-128 px"), (float("inf"), "128 px and over"))


def _size_bucket(size: float) -> str:
    return next(name for limit, name in SIZE_BUCKETS if size < limit)


def _tally(groups: dict, key: str, reidentified: bool, found: Face | None) -> None:
    group = groups.setdefault(key, {"faces": 0, "reidentified": 0, "detected": 0})
    group["faces"] += 1
    group["reidentified"] += int(reidentified)
    group["detected"] += int(found is not None)


def erase_faces(image: np.ndarray, faces: list[Face]) -> np.ndarray:
    """Each face's mask (the region every treatment replaces) painted with the window's mean colour."""
    out = image.copy()
    for face in faces:
        rows, cols = face_region(face, image.shape[:2], grow=1.3)
        flat = np.broadcast_to(image[rows, cols].reshape(-1, 3).mean(0), image[rows, cols].shape)
        composite(out, flat, face_mask(face, image.shape[:2]), rows, cols)
    return out


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _summary(total: dict, photos: int) -> dict:
    return {
        "faces_measured": total["faces"],
        "reidentification": _rate(total["reidentified"], total["faces"]),
        "mean_identity_similarity": round(total["similarity"] / total["faces"], 4) if total["faces"] else None,
        "detection_retention": _rate(total["detected"], total["faces"]),
        "gender_kept": _rate(total["gender_kept"], total["gender_known"]),
        "age_group_kept": _rate(total["age_group_kept"], total["age_known"]),
        "treatments": total["treatments"],
        **{name: {key: {"faces_measured": v["faces"], "reidentification": _rate(v["reidentified"], v["faces"]),
                        "detection_retention": _rate(v["detected"], v["faces"])}
                  for key, v in sorted(total[name].items())}
           for name in ("by_treatment", "by_size", "by_synthetic_mode_treatment")},
        "seconds_per_photo": round(total["seconds"] / max(photos, 1), 3),
        "seconds_per_face": round(total["seconds"] / max(total["replaced_faces"], 1), 4),
        "stage_seconds_per_photo": {k: round(v / max(photos, 1), 3) for k, v in total["stage_seconds"].items()},
    }


def annotated_faces(wider_root: Path) -> dict[Path, np.ndarray]:
    """Every WIDER dev photo's annotated faces as x1, y1, x2, y2, by the photo's path."""
    return {wider_root / "images" / sample.relpath: xywh_to_xyxy(sample.boxes_xywh)
            for sample in load_wider(wider_root)}


def benchmark_photos(wider_root: Path | None, photos_dir: Path | None, limit: int) -> list[Path]:
    """Group photos first, then WIDER dev photos in a fixed order (every k-th, to span events)."""
    chosen: list[Path] = []
    if photos_dir and photos_dir.is_dir():
        chosen += sorted(p for p in photos_dir.glob("*.jpg"))
    if wider_root and (wider_root / "annotations.json").is_file():
        names = sorted(json.loads((wider_root / "annotations.json").read_text()))
        step = max(1, len(names) // max(limit, 1))
        chosen += [wider_root / "images" / name for name in names[::step]]
    return chosen[:limit]
