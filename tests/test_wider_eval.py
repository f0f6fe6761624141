"""Tests of the WIDER FACE evaluation protocol (pipeline.eval.wider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.eval.wider import SETTINGS, WiderSample, evaluate, load_wider, recall_and_false_boxes

WIDER_VAL_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "wider_val_dev"


def sample(relpath: str, boxes_xywh: list[list[float]], **keep: list[int]) -> WiderSample:
    """A sample whose settings default to keeping every box."""
    every = list(range(len(boxes_xywh)))
    return WiderSample(
        relpath=relpath,
        boxes_xywh=np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4),
        keep={s: np.asarray(keep.get(s, every), dtype=np.int64) for s in SETTINGS},
    )


def as_pred(box_xywh: list[float], score: float, shift: float = 0.0) -> list[float]:
    x, y, w, h = box_xywh
    return [x + shift, y + shift, x + w + shift, y + h + shift, score]


# --- a plain transcription of the official evaluation.py, to check the vectorised one ---


def ref_bbox_overlaps(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    overlaps = np.zeros((boxes.shape[0], query_boxes.shape[0]))
    for k in range(query_boxes.shape[0]):
        box_area = (query_boxes[k, 2] - query_boxes[k, 0] + 1) * (query_boxes[k, 3] - query_boxes[k, 1] + 1)
        for n in range(boxes.shape[0]):
            iw = min(boxes[n, 2], query_boxes[k, 2]) - max(boxes[n, 0], query_boxes[k, 0]) + 1
            if iw > 0:
                ih = min(boxes[n, 3], query_boxes[k, 3]) - max(boxes[n, 1], query_boxes[k, 1]) + 1
                if ih > 0:
                    ua = (boxes[n, 2] - boxes[n, 0] + 1) * (boxes[n, 3] - boxes[n, 1] + 1) + box_area - iw * ih
                    overlaps[n, k] = iw * ih / ua
    return overlaps


def ref_image_eval(pred: np.ndarray, gt_xywh: np.ndarray, ignore: np.ndarray, iou_thresh: float):
    gt = gt_xywh.copy()
    gt[:, 2] = gt[:, 2] + gt[:, 0]
    gt[:, 3] = gt[:, 3] + gt[:, 1]
    overlaps = ref_bbox_overlaps(pred[:, :4], gt)
    pred_recall = np.zeros(pred.shape[0])
    recall_list = np.zeros(gt.shape[0])
    proposal_list = np.ones(pred.shape[0])
    for h in range(pred.shape[0]):
        max_overlap, max_idx = overlaps[h].max(), overlaps[h].argmax()
        if max_overlap >= iou_thresh:
            if ignore[max_idx] == 0:
                recall_list[max_idx] = -1
                proposal_list[h] = -1
            elif recall_list[max_idx] == 0:
                recall_list[max_idx] = 1
        pred_recall[h] = len(np.where(recall_list == 1)[0])
    return pred_recall, proposal_list


def ref_img_pr_info(thresh_num: int, pred: np.ndarray, proposal_list: np.ndarray, pred_recall: np.ndarray):
    pr_info = np.zeros((thresh_num, 2))
    for t in range(thresh_num):
        thresh = 1 - (t + 1) / thresh_num
        r_index = np.where(pred[:, 4] >= thresh)[0]
        if len(r_index) == 0:
            pr_info[t, 0] = 0
            pr_info[t, 1] = 0
        else:
            r_index = r_index[-1]
            pr_info[t, 0] = len(np.where(proposal_list[: r_index + 1] == 1)[0])
            pr_info[t, 1] = pred_recall[r_index]
    return pr_info


def ref_voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def ref_evaluate(predictions, samples, iou_thresh=0.5, thresh_num=1000) -> dict[str, float]:
    preds = {s.relpath: np.array(predictions[s.relpath], dtype=np.float64) for s in samples if s.relpath in predictions}
    max_score, min_score = -np.inf, np.inf
    for p in preds.values():
        if len(p):
            max_score = max(max_score, p[:, 4].max())
            min_score = min(min_score, p[:, 4].min())
    for relpath, p in preds.items():
        p[:, 4] = (p[:, 4] - min_score) / (max_score - min_score)
        preds[relpath] = p[np.argsort(-p[:, 4], kind="stable")]

    aps = {}
    for setting in SETTINGS:
        count_face = 0
        pr_curve = np.zeros((thresh_num, 2))
        for s in samples:
            pred = preds.get(s.relpath, np.zeros((0, 5)))
            keep_index = s.keep[setting]
            count_face += len(keep_index)
            if len(s.boxes_xywh) == 0 or len(pred) == 0:
                continue
            ignore = np.zeros(s.boxes_xywh.shape[0])
            ignore[keep_index] = 1
            pred_recall, proposal_list = ref_image_eval(pred, s.boxes_xywh, ignore, iou_thresh)
            pr_curve += ref_img_pr_info(thresh_num, pred, proposal_list, pred_recall)
        precision = np.zeros(thresh_num)
        recall = np.zeros(thresh_num)
        for i in range(thresh_num):
            precision[i] = pr_curve[i, 1] / pr_curve[i, 0] if pr_curve[i, 0] else 0.0
            recall[i] = pr_curve[i, 1] / count_face
        aps[setting] = ref_voc_ap(recall, precision)
    return aps


# --- evaluate ---

FACE_A = [10.0, 10.0, 40.0, 50.0]
FACE_B = [100.0, 20.0, 30.0, 30.0]
FACE_C = [200.0, 200.0, 25.0, 25.0]
FAR_AWAY = [400.0, 400.0, 20.0, 20.0]


def test_perfect_predictions_give_ap_one():
    samples = [
        sample("e/a.jpg", [FACE_A, FACE_B, FACE_C], easy=[0], medium=[0, 2]),
        sample("e/b.jpg", [FACE_B, FACE_C], easy=[1]),
        sample("e/c.jpg", []),
    ]
    scores = iter(np.linspace(0.95, 0.3, 5))
    predictions = {
        s.relpath: np.array([as_pred(list(box), next(scores)) for box in s.boxes_xywh]).reshape(-1, 5)
        for s in samples
    }
    assert evaluate(predictions, samples) == {"easy": 1.0, "medium": 1.0, "hard": 1.0}


def test_hand_computed_ap():
    # Normalised scores: TP on A 1.0, FP 0.5, TP on B 0.0.
    #   thresh in (0.5, 0.999]: 1 proposal, 1 TP -> precision 1,   recall 1/2
    #   thresh in (0, 0.5]:     2 proposals, 1 TP -> precision 1/2, recall 1/2
    #   thresh = 0:             3 proposals, 2 TP -> precision 2/3, recall 1
    # The envelope is 1 up to recall 1/2 and 2/3 from there to 1: AP = 1/2 + 1/3.
    samples = [sample("e/a.jpg", [FACE_A, FACE_B])]
    predictions = {"e/a.jpg": np.array([as_pred(FACE_A, 0.9), as_pred(FAR_AWAY, 0.8), as_pred(FACE_B, 0.7)])}
    for ap in evaluate(predictions, samples).values():
        assert ap == pytest.approx(5 / 6, abs=1e-6)


def test_prediction_on_ignored_face_is_neither_tp_nor_fp():
    samples = [sample("e/a.jpg", [FACE_A, FACE_B, FACE_C], easy=[0, 1], medium=[0, 1], hard=[0, 1])]
    base = [as_pred(FACE_A, 0.9), as_pred(FAR_AWAY, 0.8), as_pred(FACE_B, 0.7)]
    # The score lies inside [0.7, 0.9] so the normalisation of the others does not move.
    with_ignored = base + [as_pred(FACE_C, 0.85)]
    without = evaluate({"e/a.jpg": np.array(base)}, samples)
    with_it = evaluate({"e/a.jpg": np.array(with_ignored)}, samples)
    assert with_it == without
    assert with_it["hard"] == pytest.approx(5 / 6, abs=1e-6)


def test_duplicate_detection_is_a_false_positive():
    # The same curve as test_hand_computed_ap, with a shifted copy of A in place of the far FP.
    samples = [sample("e/a.jpg", [FACE_A, FACE_B])]
    duplicate = as_pred(FACE_A, 0.8, shift=2.0)
    predictions = {"e/a.jpg": np.array([as_pred(FACE_A, 0.9), duplicate, as_pred(FACE_B, 0.7)])}
    assert evaluate(predictions, samples)["hard"] == pytest.approx(5 / 6, abs=1e-6)


def random_split(rng: np.random.Generator, n_images: int, round_scores: bool):
    samples, predictions = [], {}
    for i in range(n_images):
        n_gt = int(rng.integers(0, 8))
        xy = rng.uniform(0, 300, size=(n_gt, 2))
        wh = rng.uniform(4, 60, size=(n_gt, 2))
        boxes = np.round(np.concatenate([xy, wh], axis=1))
        hard = np.flatnonzero(rng.random(n_gt) < 0.8)
        medium = hard[rng.random(len(hard)) < 0.7]
        easy = medium[rng.random(len(medium)) < 0.6]
        relpath = f"ev/{i:03d}.jpg"
        samples.append(
            WiderSample(relpath=relpath, boxes_xywh=boxes, keep={"easy": easy, "medium": medium, "hard": hard})
        )
        if rng.random() < 0.15:
            continue
        preds = []
        for box in boxes:
            for _ in range(int(rng.integers(0, 3))):
                x, y, w, h = box + rng.normal(0, 0.15, 4) * box[[2, 3, 2, 3]]
                preds.append([x, y, x + w, y + h])
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(4, 60, 2)
            preds.append([x, y, x + w, y + h])
        scores = rng.random(len(preds))
        if round_scores:
            scores = np.round(scores, 1)
        predictions[relpath] = np.column_stack([np.asarray(preds).reshape(-1, 4), scores])
    return samples, predictions


@pytest.mark.parametrize(("seed", "round_scores"), [(0, False), (1, False), (2, True)])
def test_evaluate_matches_plain_official_loops(seed: int, round_scores: bool):
    # Rounded scores produce ties and normalised scores that land exactly on thresholds.
    samples, predictions = random_split(np.random.default_rng(seed), 40, round_scores)
    expected = ref_evaluate(predictions, samples)
    actual = evaluate(predictions, samples)
    assert 0 < expected["hard"] < 1
    for setting in SETTINGS:
        assert actual[setting] == pytest.approx(expected[setting], abs=1e-9)


# --- load_wider ---


def test_load_wider_real_split():
    if not (WIDER_VAL_DEV / "annotations.json").is_file():
        pytest.skip(f"../shared/data/wider_val_dev not present: {WIDER_VAL_DEV}")
    samples = load_wider(WIDER_VAL_DEV)
    assert len(samples) == 494
    assert sum(len(s.boxes_xywh) for s in samples) == 5993
    assert [s.relpath for s in samples] == sorted(s.relpath for s in samples)
    for s in samples:
        assert s.boxes_xywh.shape[1] == 4
        assert set(s.keep) == set(SETTINGS)
        for keep in s.keep.values():
            assert np.all((keep >= 0) & (keep < len(s.boxes_xywh)))
        # The official settings are nested.
        assert set(s.keep["easy"]) <= set(s.keep["medium"]) <= set(s.keep["hard"])


def test_load_wider_missing_annotations(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        load_wider(tmp_path)


# --- recall_and_false_boxes ---


def test_recall_and_false_boxes():
    small, mid, large, ignored = [10, 10, 10, 12], [50, 50, 20, 24], [150, 50, 100, 110], [300, 300, 40, 40]
    samples = [
        sample("e/a.jpg", [mid, large, ignored], hard=[0, 1]),
        sample("e/b.jpg", [small]),
    ]
    predictions = {
        "e/a.jpg": np.array(
            [
                as_pred(mid, 0.9),
                as_pred(mid, 0.85, shift=1.0),  # duplicate: not a second hit, not a false box
                as_pred(ignored, 0.8),  # on a face outside the keep-list: neither
                as_pred(FAR_AWAY, 0.7),  # the one false box
                as_pred(large, 0.3),  # below the threshold: the large face is missed
                as_pred([600, 600, 30, 30], 0.2),  # below the threshold: not a false box
            ]
        ),
    }
    result = recall_and_false_boxes(predictions, samples, score_threshold=0.5)
    assert result["faces"] == 3
    assert result["images"] == 2
    assert result["recall"] == pytest.approx(1 / 3)
    assert result["false_boxes_per_image"] == pytest.approx(0.5)
    assert result["recall_by_size"] == {
        "<16": {"recall": 0.0, "faces": 1},
        "16-32": {"recall": 1.0, "faces": 1},
        "32-64": {"recall": None, "faces": 0},
        ">=64": {"recall": 0.0, "faces": 1},
    }
    lower = recall_and_false_boxes(predictions, samples, score_threshold=0.1)
    assert lower["recall"] == pytest.approx(2 / 3)
    assert lower["false_boxes_per_image"] == pytest.approx(1.0)


# --- low_scores_by_size ---


def test_low_scores_by_size_counts_faces_and_false_boxes_per_size_and_score():
    from pipeline.eval.wider import low_scores_by_size

    face_40, face_120 = [10, 10, 40, 50], [200, 10, 120, 130]
    samples = [sample("e/a.jpg", [face_40, face_120]), sample("e/b.jpg", [])]
    predictions = {
        "e/a.jpg": np.array([
            as_pred(face_40, 0.95),
            as_pred(face_120, 0.6),  # a real face with a low score
            as_pred([500, 500, 110, 150], 0.65),  # a large false box
            as_pred([700, 700, 50, 50], 0.1),  # under the floor: not counted
        ]),
        "e/b.jpg": np.array([as_pred([10, 10, 36, 36], 0.75)]),  # a false box on a photo with no faces
    }
    report = low_scores_by_size(predictions, samples, floor=0.3)
    assert report["32-48 px"]["faces"] == 1 and report["32-48 px"]["false_boxes"] == 1
    assert report["32-48 px"]["scoring_under"]["0.8"] == {"faces": 0, "false_boxes": 1}
    assert report["32-48 px"]["scoring_under"]["0.7"] == {"faces": 0, "false_boxes": 0}
    large = report["100 px and over"]
    assert (large["faces"], large["false_boxes"]) == (1, 1)
    assert large["scoring_under"]["0.7"] == {"faces": 1, "false_boxes": 1}
    assert large["scoring_under"]["0.5"] == {"faces": 0, "false_boxes": 0}
    assert report["48-64 px"]["faces"] == 0 and report["64-100 px"]["false_boxes"] == 0
