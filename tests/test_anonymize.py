"""Anonymization end to end on real photos with the embedded default models."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

import pipeline.cli as cli
from pipeline.swap.masks import face_region


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=2)


def _outside(face, shape) -> np.ndarray:
    rows, cols = face_region(face, shape, grow=1.3)
    outside = np.ones(shape, bool)
    outside[rows, cols] = False
    return outside


@pytest.mark.parametrize("mode", ["synthetic", "blur", "pixelate"])
def test_each_mode_changes_the_face_and_nothing_else(anonymizer, two_people, mode):
    faces = anonymizer.detect(two_people)
    assert len(faces) == 2
    result = anonymizer.anonymize(two_people, faces, keep={1}, mode=mode, seed=3)
    kept, replaced = faces
    assert kept.keep and not replaced.keep and kept.replacement is None
    assert replaced.replacement.treatment == mode
    changed = _changed(result, two_people)
    x1, y1, x2, y2 = replaced.box.astype(int)
    assert changed[y1:y2, x1:x2].mean() > 0.3  # the replaced face really changed
    assert not changed[_outside(replaced, two_people.shape[:2])].any()  # nothing else did
    kx1, ky1, kx2, ky2 = kept.box.astype(int)
    assert not changed[ky1:ky2, kx1:kx2].any()  # the kept face is pixel-identical
    assert result.shape == two_people.shape and result.dtype == np.uint8


def test_same_seed_same_output_and_a_reroll_changes_one_face(anonymizer, two_people):
    faces = anonymizer.detect(two_people)
    first = anonymizer.anonymize(two_people, faces, keep=set(), seed=11)
    seeds = {face.number: face.replacement.seed for face in faces}
    again = anonymizer.anonymize(two_people, anonymizer.detect(two_people), keep=set(), seed=11)
    assert np.array_equal(first, again)
    rerolled = anonymizer.anonymize(two_people, faces, keep=set(), seed=11, face_seeds={2: seeds[2] + 1})
    diff = _changed(first, rerolled)
    assert not diff[_outside(faces[1], two_people.shape[:2])].any()  # only face 2 changed
    x1, y1, x2, y2 = faces[1].box.astype(int)
    assert diff[y1:y2, x1:x2].mean() > 0.2
    assert faces[0].replacement.seed == seeds[1]


def test_no_synthetic_person_twice_and_a_reroll_moves_only_its_face(anonymizer, two_people):
    """Six bystanders of one target get six different people; re-rolls leave the others alone."""
    from pipeline.generate.matching import Target
    from pipeline.types import AGE_GROUPS, GENDERS

    reachable = [(g, a) for g in GENDERS for a in AGE_GROUPS if anonymizer.faces_source.can_make(Target(g, a))]
    assert reachable, "the default generator declares no reachable target"
    gender, age_group = reachable[0]
    template = anonymizer.detect(two_people)[0]
    crowd = []
    for number in range(1, 7):
        face = copy.deepcopy(template)
        face.number, face.gender, face.age_group = number, gender, age_group
        crowd.append(face)

    def people(face_seeds):
        faces = copy.deepcopy(crowd)
        anonymizer.anonymize(two_people, faces, keep=set(), seed=3, face_seeds=face_seeds)
        assert all(f.replacement.treatment == "synthetic" for f in faces)
        return [tuple(f.replacement.latent) for f in faces]

    first = people({})
    assert len(set(first)) == 6
    once = people({2: 99})
    assert once[1] != first[1] and once[:1] + once[2:] == first[:1] + first[2:]
    twice = people({2: 99, 5: 7})
    assert twice[1] == once[1] and twice[4] != first[4]
    assert [twice[i] for i in (0, 2, 3, 5)] == [first[i] for i in (0, 2, 3, 5)]
    assert len(set(twice)) == 6


def test_cli_contract_metadata_and_orientation(tmp_path, astronaut, monkeypatch, model_cache):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    photo = tmp_path / "in" / "trip.jpg"
    photo.parent.mkdir()
    exif = Image.Exif()
    exif[274] = 6  # stored sideways, shown upright
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(0x8825)[2] = (37.0, 33.0, 0.0)  # GPS latitude
    wide = np.ascontiguousarray(np.rot90(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1), 1))
    Image.fromarray(wide).save(photo, exif=exif, quality=95)
    out_dir, report = tmp_path / "out", tmp_path / "faces.jsonl"

    code = cli.main(["anonymize", str(photo), "-o", str(out_dir), "--keep", "2", "--seed", "5",
                     "--json-out", str(report)])

    assert code == 0
    record = json.loads(report.read_text())
    assert (record["width"], record["height"]) == (1024, 512)  # upright, as a viewer shows it
    assert [f["number"] for f in record["faces"]] == [1, 2]
    first, second = record["faces"]
    assert second["kept"] is True and "treatment" not in second
    assert first["kept"] is False and first["treatment"] == "synthetic"
    assert isinstance(first["seed"], int)
    assert len(first["latent"]) == 192  # the default eigenface model's z
    output = out_dir / "trip.jpg"
    data = output.read_bytes()
    assert b"Exif" not in data and b"PhoneMaker" not in data
    with Image.open(output) as img:
        assert img.size == (1024, 512) and not img.getexif()


def test_cli_refuses_to_overwrite_its_input(tmp_path, astronaut, model_cache, monkeypatch):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    photo = tmp_path / "a.png"
    Image.fromarray(astronaut).save(photo)
    assert cli.main(["anonymize", str(photo), "-o", str(tmp_path), "--mode", "blur"]) == 1
    assert np.array_equal(np.asarray(Image.open(photo)), astronaut)


def test_simswap_backend_through_the_cli(tmp_path, two_people, model_cache, monkeypatch):
    """Official-layout SimSwap files (random weights) plug in as the swap backend of `anonymize`."""
    import torch
    from test_simswap import _random_official_generator, save_official_arcface

    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    generator = tmp_path / "latest_net_G.pth"
    torch.save(_random_official_generator(), generator)
    arcface = tmp_path / "arcface_checkpoint.tar"
    save_official_arcface(tmp_path / "src", arcface, [1, 1, 1, 1], use_se=False)
    photo = tmp_path / "two.png"
    Image.fromarray(two_people).save(photo)
    report = tmp_path / "r.jsonl"

    code = cli.main(["anonymize", str(photo), "-o", str(tmp_path / "out"), "--keep", "1", "--json-out", str(report),
                     "--swap-backend", "simswap", "--simswap-checkpoint", str(generator),
                     "--simswap-arcface", str(arcface)])

    assert code == 0
    faces = json.loads(report.read_text())["faces"]
    result = np.asarray(Image.open(tmp_path / "out" / "two.png"))
    changed = _changed(result, two_people)
    kept = [f for f in faces if f["kept"]][0]
    kx1, ky1, kx2, ky2 = (int(v) for v in kept["box"])
    assert not changed[ky1:ky2, kx1:kx2].any()
    replaced = [f for f in faces if not f["kept"]][0]
    if replaced["treatment"] == "synthetic":
        x1, y1, x2, y2 = (int(v) for v in replaced["box"])
        assert changed[y1:y2, x1:x2].mean() > 0.3


def test_backend_without_its_files_is_a_clear_error(tmp_path, astronaut, model_cache, monkeypatch):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    photo = tmp_path / "a.png"
    Image.fromarray(astronaut).save(photo)
    with pytest.raises(SystemExit, match="needs --simswap-checkpoint"):
        cli.main(["anonymize", str(photo), "-o", str(tmp_path / "o"), "--swap-backend", "simswap"])


def test_a_trained_conditional_generator_plugs_in_and_is_not_trusted_unmeasured(tmp_path, two_people):
    """A StyleGAN2-ADA ship file becomes the generator; without a measured capability file the
    anonymizer refuses to paste its faces (it might put an adult on a child) and blurs instead."""
    import torch

    from pipeline.anonymizer import Anonymizer, AnonymizerConfig
    from pipeline.generate.checkpoint import save_ship_file
    from pipeline.generate.matching import Target
    from pipeline.generate.stylegan2 import Generator

    kwargs = {"z_dim": 32, "c_dim": 8, "w_dim": 32, "img_resolution": 32, "img_channels": 3,
              "mapping_kwargs": {"num_layers": 2}, "synthesis_kwargs": {"channel_base": 512, "channel_max": 32}}
    torch.manual_seed(0)
    path = tmp_path / "G_ema-000010.fp16.pt"
    save_ship_file(Generator(**kwargs), {"G": kwargs}, path, {"kimg": 10})

    anonymizer = Anonymizer(AnonymizerConfig(generator=str(path), device="cpu"))
    source = anonymizer.faces_source
    assert source.conditional
    label = source.label(Target("female", "60+"), 2)
    assert label.shape == (2, 8) and label[0].argmax().item() == 1 * 4 + 3
    z = np.random.RandomState(0).randn(1, 32)
    older, younger = source.sample(z, Target("female", "60+")), source.sample(z, Target("female", "0-9"))
    assert older[0].shape == (32, 32, 3) and not np.array_equal(older[0], younger[0])

    faces = anonymizer.detect(two_people)
    anonymizer.anonymize(two_people, faces, keep=set(), mode="synthetic")
    assert all(f.replacement.treatment == "blur" for f in faces)
    assert all(f.replacement.fallback.code == "unreachable" for f in faces)
    assert all("cannot make" in f.replacement.to_json()["fallback_reason"] for f in faces)


def test_the_dcgan_stays_selectable_and_keeps_its_own_capability(two_people):
    from pipeline.anonymizer import Anonymizer, AnonymizerConfig
    from pipeline.generate.matching import Target

    anonymizer = Anonymizer(AnonymizerConfig(generator="dcgan", device="cpu"))
    source = anonymizer.faces_source
    assert not source.conditional and source.axes is not None  # TL-GAN axes from weights/dcgan_latent_axes.json
    assert source.can_make(Target("male", "30-59")) and not source.can_make(Target("female", "0-9"))
    faces = anonymizer.detect(two_people)
    result = anonymizer.anonymize(two_people, faces, keep=set(), mode="synthetic", seed=1)
    assert [f.replacement.treatment for f in faces] == ["synthetic", "synthetic"]
    assert len(faces[0].replacement.latent) == 100 and not np.array_equal(result, two_people)


def test_a_large_box_with_a_low_score_gets_the_blur_not_a_generated_face(anonymizer, astronaut):
    astronaut = np.repeat(np.repeat(astronaut, 2, axis=0), 2, axis=1)  # a 190 px face
    face = anonymizer.detect(astronaut)[0]
    assert face.size >= anonymizer.cfg.doubtful_size and face.score >= anonymizer.cfg.doubtful_score
    confident, doubtful = copy.deepcopy(face), copy.deepcopy(face)
    doubtful.score = anonymizer.cfg.doubtful_score - 0.2
    anonymizer.anonymize(astronaut, [confident], keep=set(), mode="synthetic")
    anonymizer.anonymize(astronaut, [doubtful], keep=set(), mode="synthetic")
    assert confident.replacement.treatment == "synthetic"
    assert doubtful.replacement.treatment == "blur" and doubtful.replacement.fallback.code == "doubtful"
    assert "maybe not a face" in doubtful.replacement.to_json()["fallback_reason"]


def test_a_small_face_gets_a_wider_inner_mask_in_proportion(anonymizer, astronaut):
    from pipeline.swap.masks import INNER_MASK_GROW, INNER_MASK_GROW_SMALL, SMALL_FACE, inner_face_mask

    face = anonymizer.detect(astronaut)[0]
    assert face.size >= SMALL_FACE

    def mask_area_over_face_area(scale: float) -> float:
        scaled = copy.deepcopy(face)
        scaled.box, scaled.landmarks = face.box * scale, face.landmarks * scale
        shape = (int(astronaut.shape[0] * scale) + 1, int(astronaut.shape[1] * scale) + 1)
        return float(inner_face_mask(scaled, shape).sum()) / scaled.size**2

    large = mask_area_over_face_area(1.0)
    small = mask_area_over_face_area(0.9 * SMALL_FACE / face.size)  # the same face under SMALL_FACE px
    assert small / large == pytest.approx((INNER_MASK_GROW_SMALL / INNER_MASK_GROW) ** 2, rel=0.12)


def test_bench_anonymize_reports_every_mode(capsys, model_cache, monkeypatch):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))
    assert cli.main(["bench-anonymize", "--faces", "4", "--long-side", "768", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faces"] == 4 and (report["width"], report["height"]) == (768, 768)
    assert set(report["modes"]) == {"synthetic", "blur", "pixelate"}
    assert all(mode["seconds"] > 0 for mode in report["modes"].values())
    assert report["modes"]["blur"]["treatments"] == ["blur"]
    assert "detect" in report["modes"]["synthetic"]["last_run_stage_seconds"]
    assert report["draw_pools_seconds"] > 0 and report["first_call_after_draw_pools_seconds"] > 0


def test_draw_pools_draws_exactly_the_targets_the_generator_can_make(anonymizer):
    import dataclasses

    from pipeline.generate.matching import SyntheticFaceSource, Target
    from pipeline.types import AGE_GROUPS, GENDERS

    shipped = anonymizer.faces_source
    everything = [Target(g, a) for g in GENDERS for a in AGE_GROUPS]
    assert all(shipped.can_make(t) for t in everything)  # the eigenface model's measured capability
    # The same generator declared unable to make one target: that pool is never drawn.
    axes = dataclasses.replace(shipped.axes, capability={**shipped.axes.capability, "female/60+": 0.0})
    source = SyntheticFaceSource(shipped.generator, shipped.analyzer, axes, shipped.device,
                                 sampling_kwargs=shipped.sampling_kwargs)
    keys = source.draw_pools()
    assert keys == [t.key for t in everything if t.key != "female/60+"]
    pools = {key: source.pool(Target(*key.split("/"))) for key in keys}
    assert all(pool.faces for pool in pools.values())
    assert source.draw_pools() == keys
    assert all(source.pool(Target(*key.split("/"))) is pools[key] for key in keys)  # drawn once, kept


def test_eval_anonymize_measures_treatments_sizes_and_the_erased_floor(anonymizer, tmp_path):
    from conftest import shared_path

    from pipeline.eval.anonymization import evaluate_anonymization
    from pipeline.eval.identity import IdentityEmbedder
    from pipeline.image_io import load_image

    photo = shared_path("data/photos/insightface_t1.jpg")
    embedder = IdentityEmbedder(shared_path("models/arcface_mobilefacenet.onnx"))
    report = evaluate_anonymization(anonymizer, embedder, 0.3369, [photo], tmp_path / "sheets",
                                    modes=("synthetic", "pixelate"))
    assert (tmp_path / "sheets" / "insightface_t1.sheet.jpg").is_file()
    control = report["erased_face_control"]
    assert control["faces_measured"] == 6
    for mode in report["modes"].values():
        assert mode["faces_measured"] == 6
        assert sum(v["faces_measured"] for v in mode["by_treatment"].values()) == 6
        assert sum(v["faces_measured"] for v in mode["by_size"].values()) == 6
        assert 0.0 <= mode["reidentification"] <= 1.0
    # a face left untouched would match itself: every treatment must do far better than that
    assert report["modes"]["pixelate"]["mean_identity_similarity"] < 0.5
    assert control["mean_identity_similarity"] < 0.5
    assert report["false_boxes_on_annotated_photos"] == {"boxes": 0, "given_a_generated_face": 0}
    assert report["different_people_control"]["pairs"] == 0  # only annotated people are known to differ
    # With annotated faces, a detection that overlaps none is a false box, not a measured face.
    faces = sorted(anonymizer.detect(load_image(photo)), key=lambda f: f.box[0])
    annotated = {photo: np.array([f.box + np.array([2, -3, 2, 4]) for f in faces[:4]])}
    report = evaluate_anonymization(anonymizer, embedder, 0.3369, [photo], modes=("synthetic",),
                                    true_boxes=annotated)
    assert report["modes"]["synthetic"]["faces_measured"] == 4
    assert report["false_boxes_on_annotated_photos"] == {"boxes": 2, "given_a_generated_face": 2}
    # The 4 annotated people, compared with each other: 6 pairs, and six different people do not match.
    people = report["different_people_control"]
    assert people["pairs"] == 6 and people["false_match_rate"] == 0.0
    assert sum(v["pairs"] for v in people["by_size_of_the_smaller_face"].values()) == 6


def test_threshold_calibration_reports_how_it_holds_on_smaller_faces(anonymizer, tmp_path):
    from conftest import shared_path

    from pipeline.eval.identity import IdentityEmbedder, calibrate_threshold

    celeba = shared_path("data/celeba_identities")
    identities = json.loads((celeba / "identities.json").read_text())
    chosen = {}
    for name, person in sorted(identities.items()):  # 4 photos each of the first 6 people
        if sum(p == person for p in chosen.values()) < 4 and len(set(chosen.values()) | {person}) <= 6:
            chosen[name] = person
    (tmp_path / "images").mkdir()
    for name in chosen:
        (tmp_path / "images" / name).write_bytes((celeba / "images" / name).read_bytes())
    (tmp_path / "identities.json").write_text(json.dumps(chosen))
    embedder = IdentityEmbedder(shared_path("models/arcface_mobilefacenet.onnx"))

    def main_face(image):
        faces = anonymizer.detect(image)
        return max(faces, key=lambda f: f.score) if faces else None

    report = calibrate_threshold(embedder, main_face, tmp_path, far=0.05, sizes=(10_000, 24))
    assert report["faces"] >= 20 and report["identities"] == 6
    unchanged, small = report["by_face_size"]["10000px"], report["by_face_size"]["24px"]
    # no face is that large: nothing is downscaled and the figures are the threshold's own
    assert unchanged["threshold_at_far"] == report["threshold"] and unchanged["tar_at_threshold"] == report["tar"]
    # at 24 px ArcFace sees less of who someone is: fewer genuine pairs pass
    assert small["tar_at_threshold"] < report["tar"]


@pytest.mark.parametrize("mode", ["synthetic", "blur", "pixelate"])
def test_a_face_cut_by_the_border_is_treated_and_nothing_else_moves(anonymizer, astronaut, mode):
    from conftest import ASTRONAUT_FACE_BOX

    x1, y1, x2, y2 = (int(v) for v in ASTRONAUT_FACE_BOX)
    cut = np.ascontiguousarray(astronaut[max(0, y1 - 60):, x1 + (x2 - x1) // 3:])  # a third of the face off-frame
    faces = anonymizer.detect(cut)
    assert faces, "the cut face is still detected"
    result = anonymizer.anonymize(cut, faces, keep=set(), mode=mode, seed=1)
    assert result.shape == cut.shape
    face = max(faces, key=lambda f: f.size)
    assert face.box[0] < 5  # it really touches the border
    changed = _changed(result, cut)
    fx1, fy1, fx2, fy2 = face.box.astype(int)
    assert changed[max(fy1, 0):fy2, max(fx1, 0):fx2].mean() > 0.2
    outside = np.ones(cut.shape[:2], bool)
    for f in faces:
        outside &= _outside(f, cut.shape[:2])
    assert not changed[outside].any()


def test_a_generated_face_gets_the_jpeg_blocking_of_the_photo_around_it(anonymizer, astronaut, monkeypatch):
    import cv2

    import pipeline.swap.blend as blend

    encoded = cv2.imencode(".jpg", astronaut[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])[1]
    photo = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])
    faces = anonymizer.detect(photo)
    x1, y1, x2, y2 = faces[0].box.astype(int)

    def face_blocking(image):
        return blend.blockiness(cv2.cvtColor(image[y1:y2, x1:x2], cv2.COLOR_RGB2GRAY), x1, y1)

    matched = anonymizer.anonymize(photo, copy.deepcopy(faces), keep=set(), seed=1)
    monkeypatch.setattr(blend, "JPEG_VISIBLE", float("inf"))
    clean = anonymizer.anonymize(photo, copy.deepcopy(faces), keep=set(), seed=1)
    assert face_blocking(photo) > 1.4  # quality 30 blocks show
    assert abs(face_blocking(matched) - face_blocking(photo)) < 0.08
    assert face_blocking(clean) < face_blocking(photo) - 0.1  # a smooth face would be the one clean patch


def test_a_replaced_face_can_be_made_again_from_its_json(anonymizer, two_people):
    """latent + the face's gender / age group + pose_condition + mirrored give the same synthetic face."""
    import torch

    from pipeline.generate.matching import Target, to_uint8

    faces = anonymizer.detect(two_people)
    anonymizer.anonymize(two_people, faces, keep=set(), mode="synthetic", seed=4)
    source = anonymizer.faces_source
    for face in faces:
        record = face.replacement.to_json()
        assert record["treatment"] == "synthetic" and isinstance(record["mirrored"], bool)
        target = Target(face.gender, face.age_group)
        z = torch.tensor([record["latent"]], dtype=torch.float32)
        pose = torch.tensor([record["pose_condition"]], dtype=torch.float32)
        with torch.inference_mode():
            image = to_uint8(source.generator(z, source.label(target, 1), pose=pose, **source.sampling_kwargs))[0]
        pool_images = [member.image for member in source.pool(target).faces]  # pasted as is or mirrored
        # the JSON rounds the latent to 5 decimals: the same face up to a grey level
        assert min(np.abs(image.astype(int) - member.astype(int)).max() for member in pool_images) <= 2
