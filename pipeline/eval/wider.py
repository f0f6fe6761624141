"""The official WIDER FACE evaluation protocol, in numpy, independent of any detector.

``evaluate`` reproduces the Python port of the official MATLAB eval_tools (the widely used
``evaluation.py`` of WiderFace-Evaluation) so that its numbers can be compared with the
published easy / medium / hard AP of other detectors. ``recall_and_false_boxes`` answers the
question that matters for a fixed operating point: how many faces are found at a given score
threshold, and how many boxes land where there is no face at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS: tuple[str, ...] = ("easy", "medium", "hard")

# Face size buckets by the shorter side of the GT box, in pixels: [low, high).
SIZE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<16", 0.0, 16.0),
    ("16-32", 16.0, 32.0),
    ("32-64", 32.0, 64.0),
    (">=64", 64.0, float("inf")),
)


@dataclass
class WiderSample:
    """One image of the split: its GT boxes and, per setting, the official keep-list."""

    relpath: str  # "EVENT/NAME.jpg", relative to the split's images/ folder
    boxes_xywh: np.ndarray  # (N, 4) float64: x, y, w, h in pixels
    keep: dict[str, np.ndarray]  # setting -> 0-based int64 indices into boxes_xywh


def load_wider(root: str | Path) -> list[WiderSample]:
    """Read ``root/annotations.json``; samples come sorted by relpath."""
    path = Path(root) / "annotations.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"WIDER FACE annotations not found: {path} (expected a split folder holding "
            "images/EVENT/NAME.jpg and annotations.json)"
        )
    with path.open(encoding="utf-8") as f:
        records = json.load(f)
    samples = []
    for relpath in sorted(records):
        record = records[relpath]
        samples.append(
            WiderSample(
                relpath=relpath,
                boxes_xywh=np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4),
                keep={s: np.asarray(record[s], dtype=np.int64).reshape(-1) for s in SETTINGS},
            )
        )
    return samples


def bbox_overlaps(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """IoU (M, N) of x1y1x2y2 boxes with the official +1 pixel convention.

    The operation order follows the official Cython ``bbox_overlaps`` so that IoUs sitting
    right at the threshold round the same way.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    query_boxes = np.asarray(query_boxes, dtype=np.float64).reshape(-1, 4)
    box_area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    query_area = (query_boxes[:, 2] - query_boxes[:, 0] + 1) * (query_boxes[:, 3] - query_boxes[:, 1] + 1)
    iw = np.minimum(boxes[:, None, 2], query_boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], query_boxes[None, :, 0]) + 1
    ih = np.minimum(boxes[:, None, 3], query_boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], query_boxes[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = box_area[:, None] + query_area[None, :] - inter
    # A positive intersection implies both boxes have positive area, so the union is > 0;
    # degenerate prediction boxes would otherwise divide 0 by a non-positive union.
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    """The official conversion: x2 = x + w (no -1), matching how the protocol scores boxes."""
    boxes = np.array(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _predictions_of(predictions: dict[str, np.ndarray], relpath: str) -> np.ndarray:
    pred = predictions.get(relpath)
    if pred is None:
        return np.zeros((0, 5), dtype=np.float64)
    return np.asarray(pred, dtype=np.float64).reshape(-1, 5)


def _image_eval(
    pred_xyxy: np.ndarray, gt_xyxy: np.ndarray, ignore: np.ndarray, iou_thresh: float
) -> tuple[np.ndarray, np.ndarray]:
    """Official ``image_eval`` for predictions sorted by score, without its per-prediction loop.

    In the loop, a prediction whose best GT is outside the keep-list (ignore == 0) is marked -1
    whatever the order, and a keep-list GT turns to 1 the first time a prediction picks it and
    never changes again; so pred_recall is a running count of first hits on keep-list GTs.
    """
    overlaps = bbox_overlaps(pred_xyxy, gt_xyxy)
    best_gt = overlaps.argmax(axis=1)
    matched = overlaps[np.arange(len(best_gt)), best_gt] >= iou_thresh
    counts_for_keep = ignore[best_gt] == 1

    proposal_list = np.ones(len(pred_xyxy))
    proposal_list[matched & ~counts_for_keep] = -1

    hits = np.flatnonzero(matched & counts_for_keep)
    _, first = np.unique(best_gt[hits], return_index=True)
    first_hit = np.zeros(len(pred_xyxy))
    first_hit[hits[first]] = 1
    return np.cumsum(first_hit), proposal_list


def _img_pr_info(
    thresholds: np.ndarray, scores_desc: np.ndarray, proposal_list: np.ndarray, pred_recall: np.ndarray
) -> np.ndarray:
    """Official ``img_pr_info``: with scores sorted, "last index with score >= thresh" is a count."""
    n_above = np.searchsorted(-scores_desc, -thresholds, side="right")
    proposals = np.concatenate(([0.0], np.cumsum(proposal_list == 1)))
    recalls = np.concatenate(([0.0], pred_recall))
    return np.stack([proposals[n_above], recalls[n_above]], axis=1)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, as in the official ``voc_ap``."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate(
    predictions: dict[str, np.ndarray],
    samples: list[WiderSample],
    iou_thresh: float = 0.5,
    thresh_num: int = 1000,
) -> dict[str, float]:
    """Official WIDER FACE AP per setting.

    ``predictions[relpath]`` is an (M, 5) array of x1, y1, x2, y2, score in pixels; a missing
    key means no detections. Keys that name no sample are not used, not even for the score
    normalisation, so that a split is scored the same whatever else the dict holds.
    """
    preds = [_predictions_of(predictions, s.relpath) for s in samples]
    all_scores = np.concatenate([p[:, 4] for p in preds]) if preds else np.zeros(0)
    low = all_scores.min() if all_scores.size else 0.0
    diff = all_scores.max() - low if all_scores.size else 0.0

    thresholds = 1 - (np.arange(thresh_num) + 1) / thresh_num
    per_image = []
    for sample, pred in zip(samples, preds):
        # The official code divides by zero when all scores are equal; count them all instead.
        scores = (pred[:, 4] - low) / diff if diff > 0 else np.ones(len(pred))
        order = np.argsort(-scores, kind="stable")
        per_image.append((xywh_to_xyxy(sample.boxes_xywh), pred[order, :4], scores[order]))

    aps = {}
    for setting in SETTINGS:
        count_face = 0
        pr_curve = np.zeros((thresh_num, 2))
        for sample, (gt_xyxy, pred_xyxy, scores) in zip(samples, per_image):
            keep = sample.keep[setting]
            count_face += len(keep)
            if len(gt_xyxy) == 0 or len(pred_xyxy) == 0:
                continue
            ignore = np.zeros(len(gt_xyxy))
            ignore[keep] = 1
            pred_recall, proposal_list = _image_eval(pred_xyxy, gt_xyxy, ignore, iou_thresh)
            pr_curve += _img_pr_info(thresholds, scores, proposal_list, pred_recall)
        if count_face == 0:
            raise ValueError(f"no faces in the {setting!r} keep-lists of these samples")
        precision = np.divide(
            pr_curve[:, 1], pr_curve[:, 0], out=np.zeros(thresh_num), where=pr_curve[:, 0] > 0
        )
        aps[setting] = voc_ap(pr_curve[:, 1] / count_face, precision)
    return aps


def _size_bucket(size: float) -> str:
    return next(name for name, low, high in SIZE_BUCKETS if low <= size < high)


def recall_and_false_boxes(
    predictions: dict[str, np.ndarray],
    samples: list[WiderSample],
    score_threshold: float,
    iou_thresh: float = 0.5,
) -> dict[str, Any]:
    """Recall and false boxes at a fixed raw score threshold (no normalisation).

    Recall is over the "hard" keep-lists. Predictions, highest score first, each take the
    not-yet-taken GT box (keep-list or not) with the highest IoU if it reaches ``iou_thresh``;
    letting boxes outside the keep-list take part keeps a detection of an ignored face from
    being credited to a neighbouring kept one. A false box is a prediction whose IoU with every
    GT box is below ``iou_thresh``; a duplicate of a found face is therefore not a false box.
    A recall over no faces is None.
    """
    faces = 0
    found = 0
    false_boxes = 0
    bucket_faces = dict.fromkeys((name for name, _, _ in SIZE_BUCKETS), 0)
    bucket_found = dict.fromkeys(bucket_faces, 0)
    for sample in samples:
        pred = _predictions_of(predictions, sample.relpath)
        pred = pred[pred[:, 4] >= score_threshold]
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        gt_xyxy = xywh_to_xyxy(sample.boxes_xywh)
        overlaps = bbox_overlaps(pred[:, :4], gt_xyxy)

        taken = np.zeros(len(gt_xyxy), dtype=bool)
        if len(gt_xyxy):
            false_boxes += int(np.sum(overlaps.max(axis=1) < iou_thresh))
            for row in overlaps:
                candidates = np.where(taken, -1.0, row)
                best = int(candidates.argmax())
                if candidates[best] >= iou_thresh:
                    taken[best] = True
        else:
            false_boxes += len(pred)

        for index in sample.keep["hard"]:
            bucket = _size_bucket(float(sample.boxes_xywh[index, 2:].min()))
            faces += 1
            bucket_faces[bucket] += 1
            if taken[index]:
                found += 1
                bucket_found[bucket] += 1

    return {
        "recall": found / faces if faces else None,
        "false_boxes_per_image": false_boxes / len(samples) if samples else 0.0,
        "faces": faces,
        "images": len(samples),
        "recall_by_size": {
            name: {
                "recall": bucket_found[name] / bucket_faces[name] if bucket_faces[name] else None,
                "faces": bucket_faces[name],
            }
            for name in bucket_faces
        },
    }


# Box sizes (shorter side, px) and scores at which low_scores_by_size counts detections.
SCORE_SIZE_BUCKETS = ((32.0, 48.0), (48.0, 64.0), (64.0, 100.0), (100.0, float("inf")))
LOW_SCORES = (0.5, 0.7, 0.8, 0.9)
# A detection overlapping an annotated face at least this much (IoU) is that face. WIDER's boxes
# are drawn differently from the detector's (tighter at the chin, looser at the brow), hence < 0.5.
TRUE_FACE_IOU = 0.4


def low_scores_by_size(predictions: dict[str, np.ndarray], samples: list[WiderSample], floor: float,
                       iou_thresh: float = TRUE_FACE_IOU) -> dict[str, Any]:
    """For detections scoring at least ``floor``, by box size: how many are faces (IoU >= iou_thresh
    with any annotated box) and how many false boxes, and how many of each score under each of
    LOW_SCORES: what a rule "a box this big scoring under t is doubtful" would cost and catch."""
    sizes, scores, is_face = [], [], []
    for sample in samples:
        pred = _predictions_of(predictions, sample.relpath)
        pred = pred[pred[:, 4] >= floor]
        gt_xyxy = xywh_to_xyxy(sample.boxes_xywh)
        best = bbox_overlaps(pred[:, :4], gt_xyxy).max(axis=1) if len(gt_xyxy) else np.zeros(len(pred))
        sizes.append(np.minimum(pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]))
        scores.append(pred[:, 4])
        is_face.append(best >= iou_thresh)
    size, score, face = np.concatenate(sizes), np.concatenate(scores), np.concatenate(is_face)
    report = {}
    for low, high in SCORE_SIZE_BUCKETS:
        inside = (size >= low) & (size < high)
        name = f"{low:g}-{high:g} px" if np.isfinite(high) else f"{low:g} px and over"
        report[name] = {"faces": int(np.sum(inside & face)), "false_boxes": int(np.sum(inside & ~face)),
                        "scoring_under": {f"{t:g}": {"faces": int(np.sum(inside & face & (score < t))),
                                                     "false_boxes": int(np.sum(inside & ~face & (score < t)))}
                                          for t in LOW_SCORES}}
    return report
