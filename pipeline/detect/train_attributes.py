"""Training and evaluation of the gender/age heads on UTKFace with the detector frozen.

Two variants: the aligned-face branch (``run_aligned_training``, shipped; see the end of this
file) and the RoI head on cached detector features (``run_training``), described below.

Each UTKFace crop is pasted into a padded canvas (so the detector sees a face with context, as
in a photo), degraded, and run through the frozen detector once; the features pooled at the
detected box are cached, and the heads are trained on the cache. The detector never changes, so
its boxes, scores and landmarks are the same with or without the heads.
"""

from __future__ import annotations

import hashlib
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from pipeline.detect.attributes import (
    ALIGN_SIZE,
    ALIGN_WIDTHS,
    ALIGN_WINDOW,
    DETECTOR_MEAN_BGR,
    MAX_AGE,
    UTKFACE_MEAN_LANDMARKS,
    AlignedAttributeHead,
    AttributeHead,
    CascadeAttributeHead,
    IdentityProbe,
    age_group_index,
    expected_age,
    load_head,
    pool_boxes,
    save_head,
    save_identity_probe,
    similarity_to,
)
from pipeline.detect.detector import RetinaFaceDetector
from pipeline.types import AGE_GROUPS, Face

_LABEL = re.compile(r"^(\d+)_([01])_")


@dataclass(frozen=True)
class Sample:
    member: str  # path inside the zip
    age: int
    gender: int  # 0 male, 1 female (UTKFace's coding, same order as GENDERS)


@dataclass(frozen=True)
class ViewSpec:
    """How a crop is shown to the detector: canvas side, range of crop sides, whether degraded."""

    canvas: int
    crop_min: int
    crop_max: int
    augment: bool


# The detector's box is about 0.84 of a UTKFace crop's width (median over held-out crops pasted
# at 200 px): a face "N px wide" is a crop of N / 0.84 px.
FACE_WIDTH_IN_CROP = 0.84
NATIVE_CROP = 200
# Training alternates a large view (face 80-135 px) and a bystander-sized view (face 20-64 px)
# so the heads also work on small faces in crowd photos. Fixed canvas sides let the frozen
# detector run in batches and keep oneDNN from re-planning for every new input shape; the large
# canvas is smaller than a native 200 px crop would need because on the shared 2-core CPU its
# cost decides how many faces fit in the training budget.
TRAIN_VIEWS = (ViewSpec(224, 96, 160, True), ViewSpec(128, 24, 76, True))


def eval_view(face_px: int | None) -> ViewSpec:
    """Held-out view: the crop at native size (None) or with its face ``face_px`` wide, centred, padded."""
    crop = NATIVE_CROP if face_px is None else int(round(face_px / FACE_WIDTH_IN_CROP))
    return ViewSpec(max(128, -(-int(crop * 1.44) // 32) * 32), crop, crop, False)


def read_utkface(zip_path: Path) -> list[Sample]:
    """Every labelled face in the zip; names without a parseable age/gender prefix are skipped."""
    with zipfile.ZipFile(zip_path) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith(".jpg")]
    samples = []
    for member in sorted(names):
        match = _LABEL.match(Path(member).name)
        if match:
            samples.append(Sample(member, int(match.group(1)), int(match.group(2))))
    return samples


def _name_hash(sample: Sample) -> int:
    return int(hashlib.sha1(Path(sample.member).name.encode()).hexdigest(), 16)


def is_held_out(sample: Sample) -> bool:
    """Fixed split: a tenth of the faces, chosen by the SHA-1 of the file name."""
    return _name_hash(sample) % 10 == 0


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter, blur, downscale-upscale and JPEG: what a face in a real photo goes through."""
    out = image.astype(np.float32)
    out = out * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.6, 1.4)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.3:
        factor = rng.uniform(0.3, 0.7)
        small = cv2.resize(out, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.6:
        ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 96))])
        out = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    return out


def make_canvas(crop: np.ndarray, view: ViewSpec, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """The crop resized and pasted into a padded canvas; returns the canvas and the crop's box there."""
    if view.augment:
        size = int(round(np.exp(rng.uniform(np.log(view.crop_min), np.log(view.crop_max)))))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
    else:
        size = view.crop_min
    face = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
    room = view.canvas - size
    left, top = (int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1))) if view.augment else (room // 2,) * 2
    border, value = cv2.BORDER_REPLICATE, None
    if view.augment:
        border = (cv2.BORDER_REPLICATE, cv2.BORDER_REFLECT_101, cv2.BORDER_CONSTANT)[int(rng.integers(0, 3))]
        value = [int(v) for v in rng.integers(0, 256, 3)]
    canvas = cv2.copyMakeBorder(face, top, room - top, left, room - left, border, value=value)
    if view.augment:
        canvas = _degrade(canvas, rng)
    return canvas, np.array([left, top, left + size, top + size], dtype=np.float32)


def _match(rows: np.ndarray, crop_box: np.ndarray) -> np.ndarray | None:
    """The detected box that is the pasted face (IoU >= 0.3 with the crop), or None when missed."""
    if rows.shape[0] == 0:
        return None
    ious = torchvision.ops.box_iou(torch.from_numpy(rows[:, :4]), torch.from_numpy(crop_box[None]))[:, 0]
    best = int(torch.argmax(ious))
    return rows[best, :4] if float(ious[best]) >= 0.3 else None


def detected_face(detector: RetinaFaceDetector, canvas: np.ndarray, crop_box: np.ndarray) -> Face | None:
    """What ``detector.detect`` finds at the pasted crop (IoU >= 0.3), or None when it misses it."""
    faces = detector.detect(canvas)
    rows = np.array([face.box for face in faces], dtype=np.float32).reshape(-1, 4)
    box = _match(rows, crop_box)
    return None if box is None else faces[int(np.flatnonzero((rows == box).all(1))[0])]


@dataclass
class FeatureSet:
    pooled: np.ndarray  # (N, C, P, P) float16: backbone maps RoIAligned over the detected box
    anchor: np.ndarray  # (N, 192) float16: SSH maps at the box centre (what per-anchor heads see)
    age: np.ndarray  # (N,) int
    gender: np.ndarray  # (N,) int
    shown: int  # faces shown to the detector; len(age) of them were detected


@torch.inference_mode()
def extract_features(detector: RetinaFaceDetector, zip_path: Path, samples: list[Sample], views: list[ViewSpec],
                     seed: int, pool: int, batch: int = 16, log=print) -> FeatureSet:
    """Run the frozen detector once per (sample, view) and pool features at the matched detection."""
    rng = np.random.default_rng(seed)
    jobs = [(s, v) for v in views for s in samples]
    pooled, anchor, ages, genders = [], [], [], []
    start = time.perf_counter()
    with zipfile.ZipFile(zip_path) as archive:
        for first in range(0, len(jobs), batch):
            chunk = jobs[first : first + batch]
            by_canvas: dict[int, list] = {}
            for sample, view in chunk:
                crop = cv2.imdecode(np.frombuffer(archive.read(sample.member), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                canvas, box = make_canvas(crop, view, rng)
                by_canvas.setdefault(view.canvas, []).append((sample, canvas, box))
            for items in by_canvas.values():
                tensor = torch.cat([detector._to_tensor(canvas) for _, canvas, _ in items])
                loc, conf, landmarks, body, ssh = detector.net.forward_with_maps(tensor)
                conf = torch.softmax(conf, dim=-1)
                for i, (sample, canvas, crop_box) in enumerate(items):
                    rows = detector.rows_from_outputs(loc[i], conf[i], landmarks[i], canvas.shape[:2],
                                                      detector.settings.threshold)
                    box = _match(rows, crop_box)
                    if box is None:
                        continue
                    boxes = torch.from_numpy(box[None]).to(detector.device)
                    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
                    pooled.append(pool_boxes([m[i : i + 1] for m in body], boxes, pool).half().cpu().numpy())
                    anchor.append(pool_boxes([m[i : i + 1] for m in ssh], torch.cat([centre, centre + 1], 1), 1)
                                  .flatten(1).half().cpu().numpy())
                    ages.append(sample.age)
                    genders.append(sample.gender)
            done = first + len(chunk)
            if done % (batch * 100) == 0 or done == len(jobs):
                log(f"features: {done}/{len(jobs)} views, {len(ages)} detected, {time.perf_counter() - start:.0f} s")
    if not ages:
        raise ValueError(f"the detector found none of the {len(jobs)} faces shown")
    return FeatureSet(pooled=np.concatenate(pooled), anchor=np.concatenate(anchor), age=np.asarray(ages),
                      gender=np.asarray(genders), shown=len(jobs))


def _cached(path: Path, load, save, compute):
    """``load(path)`` when the file exists; otherwise ``compute()``, saved whole or not at all."""
    if path.is_file():
        return load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.tmp{path.suffix}")
    save(partial, value)
    partial.replace(path)
    return value


def cached_features(cache: Path, key: str, compute) -> FeatureSet:
    """Features from ``cache/key.npz``, computing and saving them on a miss."""
    def load(path: Path) -> FeatureSet:
        data = np.load(path)
        return FeatureSet(data["pooled"], data["anchor"], data["age"], data["gender"], int(data["shown"]))

    def save(path: Path, features: FeatureSet) -> None:
        np.savez(path, pooled=features.pooled, anchor=features.anchor, age=features.age, gender=features.gender,
                 shown=features.shown)

    return _cached(cache / f"{key}.npz", load, save, compute)


class AnchorBaseline(nn.Module):
    """The literal reading of the issue: linear (1x1) heads on the SSH features at the face's anchor cell."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(in_features), nn.Linear(in_features, 2 + len(AGE_GROUPS) + MAX_AGE + 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits[:, :2], logits[:, 2:6], logits[:, 6:]


def attribute_loss(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], age: torch.Tensor,
                   gender: torch.Tensor, sigma: float = 2.5, gender_weight: float = 1.0,
                   gender_smoothing: float = 0.0) -> torch.Tensor:
    """CE on gender (times ``gender_weight``, labels smoothed by ``gender_smoothing``: UTKFace's
    gender labels have errors) and age group, plus a Gaussian label distribution (DLDL) and L1 on
    the age expectation."""
    gender_logits, group_logits, bin_logits = outputs
    clipped = age.clamp(max=MAX_AGE).float()
    group = torch.bucketize(clipped, torch.tensor([10.0, 30.0, 60.0], device=age.device), right=True)
    bins = torch.arange(MAX_AGE + 1, device=age.device, dtype=torch.float32)
    target = torch.softmax(-((bins[None] - clipped[:, None]) ** 2) / (2 * sigma**2), dim=1)
    bin_loss = -(target * F.log_softmax(bin_logits, 1)).sum(1).mean()
    l1 = (expected_age(bin_logits) - clipped).abs().mean()
    gender_term = F.cross_entropy(gender_logits, gender, label_smoothing=gender_smoothing)
    return gender_weight * gender_term + F.cross_entropy(group_logits, group) \
        + bin_loss + 0.1 * l1


def train_head(model: nn.Module, x: np.ndarray, age: np.ndarray, gender: np.ndarray, epochs: int,
               device: torch.device, seed: int, batch: int = 256, lr: float = 2e-3) -> list[float]:
    """Adam with a cosine schedule on cached features; returns the mean loss of each epoch."""
    torch.manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * -(-len(age) // batch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    ages, genders = torch.from_numpy(age), torch.from_numpy(gender)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(age))
        total = 0.0
        for first in range(0, len(age), batch):
            idx = order[first : first + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            inputs = torch.from_numpy(x[idx.numpy()]).to(device).float()
            loss = attribute_loss(model(inputs), ages[idx].to(device), genders[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(age))
    return losses


@torch.inference_mode()
def predict(model: nn.Module, x: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(female), age-group probabilities and expected age for cached features."""
    model.to(device).eval()
    female, groups, years = [], [], []
    for first in range(0, len(x), 1024):
        gender, group, bins = model(torch.from_numpy(x[first : first + 1024]).to(device).float())
        female.append(torch.softmax(gender, 1)[:, 1].cpu().numpy())
        groups.append(torch.softmax(group, 1).cpu().numpy())
        years.append(expected_age(bins).cpu().numpy())
    return np.concatenate(female), np.concatenate(groups), np.concatenate(years)


def attribute_metrics(female: np.ndarray, group_probs: np.ndarray, age_pred: np.ndarray, age: np.ndarray,
                      gender: np.ndarray, shown: int) -> dict:
    """Gender accuracy, age-group accuracy, age MAE and the group confusion matrix (rows: true)."""
    true_group = age_group_index(age)
    pred_group = group_probs.argmax(1)
    confusion = np.zeros((len(AGE_GROUPS), len(AGE_GROUPS)), dtype=int)
    np.add.at(confusion, (true_group, pred_group), 1)
    n = len(age)
    gender_right = (female >= 0.5) == gender
    # Children's gender is the hard part (UTKFace 0-9 faces): report it per true age group.
    gender_by_group = {name: round(float(gender_right[true_group == k].mean()), 4)
                       for k, name in enumerate(AGE_GROUPS) if (true_group == k).any()}
    return {
        "faces": shown,
        "detected": n,
        "detection_rate": round(n / shown, 4) if shown else 0.0,
        "gender_accuracy": round(float(gender_right.mean()), 4) if n else None,
        "gender_accuracy_by_true_age_group": gender_by_group,
        "age_group_accuracy": round(float((pred_group == true_group).mean()), 4) if n else None,
        "age_mae": round(float(np.abs(age_pred - np.minimum(age, MAX_AGE)).mean()), 2) if n else None,
        "age_group_confusion": {"rows_true_cols_predicted": list(AGE_GROUPS), "matrix": confusion.tolist()},
    }


EVAL_SIZES: dict[str, int | None] = {"native": None, "32px": 32}


def split_utkface(zip_path: Path, limit: int | None, eval_limit: int | None,
                  seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training faces, held-out faces); ``limit`` draws a seeded random subset of the training faces."""
    samples = read_utkface(zip_path)
    train = [s for s in samples if not is_held_out(s)]
    # Hash order, not name order (names start with the age): the first N are a fair sample.
    held_out = sorted((s for s in samples if is_held_out(s)), key=_name_hash)[:eval_limit]
    if limit is not None and limit < len(train):
        picked = np.sort(np.random.default_rng(seed).choice(len(train), limit, replace=False))
        train = [train[i] for i in picked]
    return train, held_out


def run_training(detector: RetinaFaceDetector, zip_path: Path, out: Path, cache: Path, views: int = 2,
                 limit: int | None = None, eval_limit: int | None = None, epochs: int = 30, seed: int = 0,
                 pool: int = 4, command: str = "", log=print) -> dict:
    """Cache features, train the pooled head and the per-anchor baseline, save the head, report both."""
    train, held_out = split_utkface(zip_path, limit, eval_limit, seed)
    specs = [TRAIN_VIEWS[k % len(TRAIN_VIEWS)] for k in range(views)]
    start = time.perf_counter()
    train_set = cached_features(cache, f"train-{len(train)}-{views}v-s{seed}-p{pool}",
                                lambda: extract_features(detector, zip_path, train, specs, seed, pool, log=log))
    held_sets = {name: cached_features(cache, f"heldout-{len(held_out)}-{name}-p{pool}",
                                       lambda size=size: extract_features(detector, zip_path, held_out,
                                                                          [eval_view(size)], seed, pool, log=log))
                 for name, size in EVAL_SIZES.items()}
    feature_seconds = time.perf_counter() - start
    start = time.perf_counter()
    torch.manual_seed(seed)  # initial weights too, so the same command gives the same file
    head = AttributeHead(in_channels=train_set.pooled.shape[1], pool=pool)
    losses = train_head(head, train_set.pooled, train_set.age, train_set.gender, epochs, detector.device, seed)
    torch.manual_seed(seed)
    baseline = AnchorBaseline(train_set.anchor.shape[1])
    baseline_losses = train_head(baseline, train_set.anchor, train_set.age, train_set.gender, epochs,
                                 detector.device, seed)
    train_seconds = time.perf_counter() - start
    report = {"train_faces": len(train), "train_views": train_set.shown, "train_views_detected": len(train_set.age),
              "held_out_faces": len(held_out), "epochs": epochs, "feature_seconds": round(feature_seconds, 1),
              "train_seconds": round(train_seconds, 1), "device": str(detector.device),
              "threads": torch.get_num_threads(), "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}
    for name, model, column in (("pooled_head", head, "pooled"), ("anchor_baseline", baseline, "anchor")):
        report[name] = {
            name: attribute_metrics(*predict(model, getattr(held, column), detector.device), held.age,
                                    held.gender, held.shown)
            for name, held in held_sets.items()
        }
    head.cpu()
    save_head(head, out, {"data": "UTKFace (aligned & cropped), non-commercial research licence",
                          "command": command, "held_out": {"split": "sha1(file name) % 10 == 0",
                                                           **report["pooled_head"]}})
    report["weights"] = str(out)
    return report


@torch.inference_mode()
def evaluate_attributes(detector: RetinaFaceDetector, zip_path: Path, face_px: int | None,
                      limit: int | None = None) -> dict:
    """Held-out metrics through ``detector.detect`` itself: the one-call path the product uses."""
    held_out = split_utkface(zip_path, None, limit, 0)[1]
    view = eval_view(face_px)
    female, groups, years, ages, genders = [], [], [], [], []
    with zipfile.ZipFile(zip_path) as archive:
        for sample in held_out:
            canvas, crop_box = make_canvas(_read_crop(archive, sample), view, None)
            face = detected_face(detector, canvas, crop_box)
            if face is None:
                continue
            female.append(face.gender_prob if face.gender == "female" else 1.0 - face.gender_prob)
            groups.append(face.age_group_probs)
            years.append(face.age)
            ages.append(sample.age)
            genders.append(sample.gender)
    return attribute_metrics(np.asarray(female), np.asarray(groups).reshape(-1, len(AGE_GROUPS)), np.asarray(years),
                             np.asarray(ages, dtype=np.int64), np.asarray(genders, dtype=np.int64), len(held_out))


# ---------------------------------------------------------------------------------------------
# Aligned-face branch: a small CNN trained from scratch on landmark-aligned crops (see
# attributes.AlignedAttributeHead). Each crop is aligned once, by the landmarks our detector finds
# on it (or, without a detector, by UTKFace's own alignment), and training reads the centred window
# (the head's ``window``) of every crop; at inference the face's own landmarks are mapped onto the
# mean landmarks of that window.

def store_size(head_size: int, window: float = ALIGN_WINDOW) -> int:
    """Side at which whole 200 px crops are kept so that the window is head_size px (78 for 72 over 184)."""
    return int(round(head_size * NATIVE_CROP / window))


def _read_crop(archive: zipfile.ZipFile, sample: Sample) -> np.ndarray:
    """The sample's crop as RGB uint8 at NATIVE_CROP x NATIVE_CROP."""
    crop = cv2.imdecode(np.frombuffer(archive.read(sample.member), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (NATIVE_CROP, NATIVE_CROP), interpolation=cv2.INTER_AREA)


@torch.inference_mode()
def detect_crop_landmarks(detector: RetinaFaceDetector, zip_path: Path, samples: list[Sample],
                          log=print) -> np.ndarray:
    """(N, 5, 2) landmarks the detector finds on each native crop (padded as in eval_view); NaN when missed."""
    plain = detector.without_attributes()
    view = eval_view(None)
    out = np.full((len(samples), 5, 2), np.nan, np.float32)
    start = time.perf_counter()
    with zipfile.ZipFile(zip_path) as archive:
        for i, sample in enumerate(samples):
            canvas, crop_box = make_canvas(_read_crop(archive, sample), view, None)
            face = detected_face(plain, canvas, crop_box)
            if face is not None:
                out[i] = face.landmarks - crop_box[:2]
            if (i + 1) % 2000 == 0:
                log(f"landmarks: {i + 1}/{len(samples)} crops, {time.perf_counter() - start:.0f} s")
    return out


def cached_landmarks(cache: Path | None, key: str, compute) -> np.ndarray:
    """Landmarks from ``cache/key.npy``, computing and saving them on a miss (no cache: always computed)."""
    return compute() if cache is None else _cached(cache / f"{key}.npy", np.load, np.save, compute)


def align_crop(crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The crop warped so its landmarks land on UTKFACE_MEAN_LANDMARKS: the alignment detect() applies."""
    if np.isnan(landmarks).any():
        return crop
    mean = torch.tensor(UTKFACE_MEAN_LANDMARKS, dtype=torch.float32)
    matrix = similarity_to(torch.from_numpy(landmarks).float(), mean[None])[0].numpy()
    return cv2.warpAffine(crop, matrix, (NATIVE_CROP, NATIVE_CROP), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def load_aligned_crops(zip_path: Path, samples: list[Sample], face_px: int | None = None,
                       store: int = store_size(ALIGN_SIZE), landmarks: np.ndarray | None = None) -> np.ndarray:
    """(N, store, store, 3) uint8 RGB: each crop resized (area) to store x store.

    With ``landmarks`` (from ``detect_crop_landmarks``) each crop is first aligned by them as
    detect() aligns a face, instead of trusting UTKFace's own alignment. With ``face_px`` the crop
    is then shrunk so its face is ``face_px`` wide and scaled back up (bilinear): what a small
    face in a photo looks like once the head samples it.
    """
    out = np.empty((len(samples), store, store, 3), np.uint8)
    with zipfile.ZipFile(zip_path) as archive:
        for i, sample in enumerate(samples):
            crop = _read_crop(archive, sample)
            if landmarks is not None:
                crop = align_crop(crop, landmarks[i])
            if face_px is not None:
                side = int(round(face_px / FACE_WIDTH_IN_CROP))
                small = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
                crop = cv2.resize(small, (NATIVE_CROP, NATIVE_CROP), interpolation=cv2.INTER_LINEAR)
            out[i] = cv2.resize(crop, (store, store), interpolation=cv2.INTER_AREA)
    return out


def _to_input(batch: torch.Tensor, mean_bgr=DETECTOR_MEAN_BGR) -> torch.Tensor:
    """uint8 RGB NHWC -> float BGR NCHW minus the detector's mean: the detector's input tensor."""
    bgr = batch.permute(0, 3, 1, 2).flip(1).float()
    return bgr - torch.tensor(mean_bgr).view(1, 3, 1, 1)


def _window_theta(n: int, size: int, window: float, jitter: bool, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """affine_grid thetas taking the size px window (centre of the stored crop) into the stored crop."""
    half = window / NATIVE_CROP  # the window's half-extent in the stored crop's normalised coordinates
    scale = torch.full((n,), half)
    angle = torch.zeros(n)
    shift = torch.zeros(n, 2)
    if jitter:
        scale = scale * torch.empty(n).uniform_(0.96, 1.04, generator=generator)
        angle = torch.empty(n).uniform_(-5, 5, generator=generator) * (np.pi / 180)
        shift = shift + torch.empty(n, 2).uniform_(-2, 2, generator=generator) * (2 / size) * half
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def aligned_batch(stored: torch.Tensor, size: int, window: float, augment: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The head's input for stored uint8 crops: window (jittered when augmenting), degraded when augmenting."""
    x = _to_input(stored)
    n = len(x)
    grid = F.affine_grid(_window_theta(n, size, window, augment, generator), [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if not augment:
        return x

    def pick(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    flip = pick(0.5)
    x[flip] = x[flip].flip(3)
    # brightness / contrast / saturation on the 0..255 scale
    mean = torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    img = x + mean
    img = img * torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=generator) \
        + torch.empty(n, 1, 1, 1).uniform_(-30, 30, generator=generator)
    grey = img.mean(1, keepdim=True)
    img = grey + (img - grey) * torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=generator)
    avg = img.mean((1, 2, 3), keepdim=True)
    img = avg + (img - avg) * torch.empty(n, 1, 1, 1).uniform_(0.75, 1.25, generator=generator)
    # Gaussian blur (sigma 0.5..1.2) on some
    blur = pick(0.25)
    if blur.any():
        sigma = float(torch.empty(1).uniform_(0.5, 1.2, generator=generator))
        k = torch.exp(-torch.arange(-2, 3, dtype=torch.float32) ** 2 / (2 * sigma**2))
        k = k / k.sum()
        sub = img[blur]
        sub = F.conv2d(F.pad(sub, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        sub = F.conv2d(F.pad(sub, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
        img[blur] = sub
    # bystander: face 16..40 px wide (the window is ~1.3 face widths) and back up
    small = pick(0.4)
    if small.any():
        face = int(torch.randint(16, 41, (1,), generator=generator))
        side = max(8, int(round(face * window / (FACE_WIDTH_IN_CROP * NATIVE_CROP))))
        sub = F.interpolate(img[small], size=(side, side), mode="area")
        img[small] = F.interpolate(sub, size=(size, size), mode="bilinear", align_corners=False)
    # additive noise standing in for JPEG on some
    noisy = pick(0.3)
    if noisy.any():
        img[noisy] = img[noisy] + torch.randn(img[noisy].shape, generator=generator) * \
            float(torch.empty(1).uniform_(2, 8, generator=generator))
    return img.clamp(0, 255) - mean


def predict_aligned(head, stored: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(female), group probabilities, age for stored crops through the fixed window (flip averaged per head)."""
    head.eval()
    device = next(head.parameters()).device
    female, groups, years = [], [], []
    with torch.inference_mode():
        for first in range(0, len(stored), batch):
            x = aligned_batch(torch.from_numpy(stored[first : first + batch]), head.size, head.window, False).to(device)
            if head.flip:
                n = len(x)
                gender, group, bins = [(t[:n] + t[n:]) / 2 for t in head(torch.cat([x, x.flip(3)]))]
            else:
                gender, group, bins = head(x)
            female.append(torch.softmax(gender, 1)[:, 1].cpu().numpy())
            groups.append(torch.softmax(group, 1).cpu().numpy())
            years.append(expected_age(bins).cpu().numpy())
    return np.concatenate(female), np.concatenate(groups), np.concatenate(years)


def run_aligned_training(zip_path: Path, out: Path, limit: int | None = None, eval_limit: int | None = None,
                         epochs: int = 32, seed: int = 0, batch: int = 192, lr: float = 3e-3,
                         head_size: int = ALIGN_SIZE, widths: tuple[int, ...] = ALIGN_WIDTHS,
                         window: float = ALIGN_WINDOW, device: torch.device = torch.device("cpu"),
                         detector: RetinaFaceDetector | None = None, cache: Path | None = None,
                         swa_epochs: int = 0, init: Path | None = None, gender_weight: float = 1.0,
                         gender_smoothing: float = 0.0, command: str = "", log=print) -> dict:
    """Train AlignedAttributeHead from scratch on every training face; evaluate native and 32 px; save.

    With a ``detector`` every crop (training and held-out) is aligned by the landmarks it finds,
    as detect() aligns faces, so the head trains on what it will see; without one, UTKFace's own
    alignment is trusted. Batches are cropped and degraded on the CPU (seeded, so the same command
    gives the same faces on any device) and the CNN runs on ``device``. ``swa_epochs`` more epochs
    average the weights (SWA); ``init`` starts from a saved head of the same shape.
    """
    train, held_out = split_utkface(zip_path, limit, eval_limit, seed)
    start = time.perf_counter()
    store = store_size(head_size, window)
    train_points = held_points = None
    if detector is not None:
        train_points = cached_landmarks(cache, f"landmarks-train-{len(train)}-s{seed}",
                                        lambda: detect_crop_landmarks(detector, zip_path, train, log))
        held_points = cached_landmarks(cache, f"landmarks-heldout-{len(held_out)}",
                                       lambda: detect_crop_landmarks(detector, zip_path, held_out, log))
    crops = load_aligned_crops(zip_path, train, store=store, landmarks=train_points)
    held = {name: load_aligned_crops(zip_path, held_out, size, store, held_points)
            for name, size in EVAL_SIZES.items()}
    read_seconds = time.perf_counter() - start
    log(f"read {len(train)} training and {len(held_out)} held-out faces in {read_seconds:.1f} s")
    ages = torch.from_numpy(np.array([s.age for s in train], dtype=np.int64))
    genders = torch.from_numpy(np.array([s.gender for s in train], dtype=np.int64))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    head = AlignedAttributeHead(size=head_size, widths=widths, window=window)
    if init is not None:
        start_from = load_head(init, None)
        if start_from.config != head.config:
            raise ValueError(f"{init}: head {start_from.config} differs from the requested {head.config}")
        head.load_state_dict(start_from.state_dict())
    head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=5e-4)
    per_epoch = -(-len(train) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * per_epoch),
                                                   pct_start=0.15)
    stored = torch.from_numpy(crops)

    def batches():
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, len(train) - 1, batch):  # BatchNorm needs two samples
            idx = order[first : first + batch]
            yield idx, aligned_batch(stored[idx], head.size, head.window, True, generator).to(device)

    def run_epoch(step_schedule: bool) -> float:
        total = 0.0
        for idx, x in batches():
            loss = attribute_loss(head(x), ages[idx].to(device), genders[idx].to(device), sigma=3.0,
                                  gender_weight=gender_weight, gender_smoothing=gender_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step_schedule:
                schedule.step()
            total += float(loss.detach()) * len(idx)
        return total / len(train)

    losses, start = [], time.perf_counter()
    for epoch in range(epochs):
        losses.append(run_epoch(True))
        log(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}, {time.perf_counter() - start:.0f} s")
    if swa_epochs:
        # Stochastic weight averaging: a constant low learning rate, the weights averaged at the end
        # of each epoch, then BatchNorm statistics recomputed for the averaged weights.
        averaged = torch.optim.swa_utils.AveragedModel(head)
        for group in optimizer.param_groups:
            group["lr"] = lr / 10
        for epoch in range(swa_epochs):
            losses.append(run_epoch(False))
            averaged.update_parameters(head)
            log(f"swa epoch {epoch + 1}/{swa_epochs}: loss {losses[-1]:.4f}, {time.perf_counter() - start:.0f} s")
        head.load_state_dict(averaged.module.state_dict())
        torch.optim.swa_utils.update_bn((x for _, x in batches()), head)
    train_seconds = time.perf_counter() - start
    ages_held = np.array([s.age for s in held_out], dtype=np.int64)
    genders_held = np.array([s.gender for s in held_out], dtype=np.int64)
    report = {"variant": "aligned", "alignment": "detected landmarks" if detector is not None else "UTKFace's",
              "train_faces": len(train), "held_out_faces": len(held_out), "epochs": epochs, "swa_epochs": swa_epochs,
              "init": str(init) if init is not None else None,
              "batch": batch, "head": head.config, "device": str(device), "read_seconds": round(read_seconds, 1),
              "train_seconds": round(train_seconds, 1),
              "threads": torch.get_num_threads(), "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
              "aligned_head": {name: attribute_metrics(*predict_aligned(head, held[name]), ages_held, genders_held,
                                                       len(held_out)) for name in EVAL_SIZES}}
    head.cpu()
    save_head(head, out, {"data": "UTKFace (aligned & cropped), non-commercial research licence",
                          "command": command, "held_out": {"split": "sha1(file name) % 10 == 0",
                                                           "alignment": report["alignment"],
                                                           **report["aligned_head"]}})
    report["weights"] = str(out)
    return report


# ---------------------------------------------------------------------------------------------
# Identity branch: a probe on dlib's face descriptors (attributes.CascadeAttributeHead). The
# descriptors come from the same detector-aligned crops, placed on dlib's chip by our landmarks.

@torch.inference_mode()
def dlib_descriptors(network: nn.Module, zip_path: Path, samples: list[Sample], landmarks: np.ndarray,
                     batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(N, 128) descriptors and which faces have them (those whose landmarks were found)."""
    from pipeline.detect.dlib_resnet import align_chip

    out = np.zeros((len(samples), 128), np.float32)
    found = ~np.isnan(landmarks).any(axis=(1, 2))
    chips, at = [], []

    def flush() -> None:
        if chips:
            out[at] = network(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()).numpy()
            chips.clear(), at.clear()

    with zipfile.ZipFile(zip_path) as archive:
        for i in np.flatnonzero(found):
            chips.append(align_chip(_read_crop(archive, samples[i]), landmarks[i]))
            at.append(i)
            if len(chips) == batch:
                flush()
    flush()
    return out, found


def train_identity_probe(descriptors: np.ndarray, ages: np.ndarray, genders: np.ndarray, epochs: int,
                         seed: int) -> IdentityProbe:
    torch.manual_seed(seed)
    probe = IdentityProbe()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-3)
    x = torch.from_numpy(descriptors)
    gender = torch.from_numpy(genders.astype(np.int64))
    group = torch.from_numpy(age_group_index(ages).astype(np.int64))
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for first in range(0, len(x), 512):
            pick = order[first:first + 512]
            gender_logits, group_logits = probe(x[pick])
            loss = F.cross_entropy(gender_logits, gender[pick]) + F.cross_entropy(group_logits, group[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


def run_identity_probe_training(zip_path: Path, out: Path, network_file: Path, aligned_head: Path,
                                detector: RetinaFaceDetector, cache: Path | None, network_out: Path | None = None,
                                limit: int | None = None, eval_limit: int | None = None, epochs: int = 40,
                                seed: int = 0, gender_margin: float = 0.35, group_confidence: float = 0.7,
                                command: str = "", log=print) -> dict:
    """Train the probe on dlib descriptors of the training faces; report the probe, the aligned head and
    the cascade of the two on the held-out faces (aligned window, as ``predict_aligned``); save."""
    from pipeline.detect.dlib_resnet import DlibResNet, save_network
    from pipeline.weights import sha256_file

    start = time.perf_counter()
    network = DlibResNet.from_file(network_file)
    if network_out is not None:
        save_network(network, network_out, {"source": str(network_file), "source_sha256": sha256_file(network_file)})
    train, held_out = split_utkface(zip_path, limit, eval_limit, seed)
    train_points = cached_landmarks(cache, f"landmarks-train-{len(train)}-s{seed}",
                                    lambda: detect_crop_landmarks(detector, zip_path, train, log))
    held_points = cached_landmarks(cache, f"landmarks-heldout-{len(held_out)}",
                                   lambda: detect_crop_landmarks(detector, zip_path, held_out, log))
    train_x, train_found = dlib_descriptors(network, zip_path, train, train_points)
    held_x, held_found = dlib_descriptors(network, zip_path, held_out, held_points)
    descriptor_seconds = time.perf_counter() - start
    log(f"descriptors of {len(train)} + {len(held_out)} faces in {descriptor_seconds:.0f} s")
    ages = np.array([s.age for s in train])
    genders = np.array([s.gender for s in train])
    probe = train_identity_probe(train_x[train_found], ages[train_found], genders[train_found], epochs, seed)

    head = load_head(aligned_head, None)
    crops = load_aligned_crops(zip_path, held_out, store=store_size(head.size, head.window), landmarks=held_points)
    head_female, head_groups, head_years = predict_aligned(head, crops)
    with torch.inference_mode():
        gender_logits, group_logits = probe(torch.from_numpy(held_x))
    probe_female = torch.softmax(gender_logits, 1)[:, 1].numpy()
    probe_groups = torch.softmax(group_logits, 1).numpy()
    cascade = CascadeAttributeHead(head, network, probe, gender_margin, group_confidence)
    unsure = cascade.unsure(torch.from_numpy(head_female), torch.from_numpy(head_groups)).numpy()
    cascade_female = np.where(unsure, (head_female + probe_female) / 2, head_female)
    cascade_groups = np.where(unsure[:, None], (head_groups + probe_groups) / 2, head_groups)
    held_ages = np.array([s.age for s in held_out])
    held_genders = np.array([s.gender for s in held_out])
    k = held_found

    def metrics(female: np.ndarray, groups: np.ndarray) -> dict:
        return attribute_metrics(female[k], groups[k], head_years[k], held_ages[k], held_genders[k], len(held_out))

    save_identity_probe(probe, out, gender_margin, group_confidence, {"command": command})
    return {"command": command, "train_faces": int(train_found.sum()), "seconds": round(time.perf_counter() - start, 1),
            "descriptor_seconds": round(descriptor_seconds, 1),
            "held_out_aligned_window": {"aligned_head": metrics(head_female, head_groups),
                                        "identity_probe": metrics(probe_female, probe_groups),
                                        "cascade": metrics(cascade_female, cascade_groups),
                                        "cascade_share_consulting_the_probe": round(float(unsure[k].mean()), 4)}}
