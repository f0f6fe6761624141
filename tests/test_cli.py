"""The `facechange detect` contract, driven through the real CLI entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import pipeline.cli as cli
from conftest import ASTRONAUT_FACE_BOX, iou
from pipeline.image_io import load_image


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, model_cache):
    monkeypatch.setenv("FACECHANGE_CACHE_DIR", str(model_cache))


def _run(argv: list[str]) -> int:
    return cli.main(argv)


def test_detect_json_lines_previews_and_bad_inputs_in_one_batch(tmp_path, astronaut, monkeypatch, capsys):
    good = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(good)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[274] = 6  # stored sideways; the viewer rotates it 90 degrees clockwise
    Image.fromarray(np.rot90(astronaut, 1)).save(rotated, exif=exif, quality=95)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    out = tmp_path / "faces.jsonl"
    previews = tmp_path / "previews"

    builds = []
    real_build = cli.build_detector
    monkeypatch.setattr(cli, "build_detector", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    code = _run(["detect", str(good), str(empty), str(rotated), str(text), "--json-out", str(out),
                 "--preview-dir", str(previews)])

    assert code == 1  # some inputs failed, the batch still went on
    assert len(builds) == 1  # one model load for the whole batch
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == [str(good), str(empty), str(rotated), str(text)]
    first, zero, upright, garbage = records
    assert (first["width"], first["height"]) == (512, 512)
    assert len(first["faces"]) == 1
    face = first["faces"][0]
    assert set(face) >= {"box", "score", "landmarks", "number"}
    assert face["number"] == 1 and len(face["landmarks"]) == 5
    assert iou(face["box"], ASTRONAUT_FACE_BOX) > 0.7
    # EXIF orientation is applied before detection: the face comes out where a viewer sees it.
    assert iou(upright["faces"][0]["box"], face["box"]) > 0.8
    assert zero["error"] == "The file is empty"
    assert "not an image" in garbage["error"]
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "empty.jpg: The file is empty" in stderr
    preview = load_image(previews / "astronaut.preview.jpg")
    assert preview.shape == astronaut.shape
    assert np.abs(preview.astype(int) - astronaut.astype(int)).max() > 100  # a box was drawn


def test_detect_writes_to_stdout_and_threshold_filters(tmp_path, astronaut, capsys):
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    assert _run(["detect", str(path), "--threshold", "0.02"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert _run(["detect", str(path), "--threshold", "0.9"]) == 0
    high = json.loads(capsys.readouterr().out)
    assert len(low["faces"]) > len(high["faces"]) == 1
    assert all(f["score"] >= 0.02 for f in low["faces"])


def test_unknown_weights_file_is_a_clear_error(tmp_path, astronaut):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(SystemExit) as excinfo:
        _run(["detect", str(tmp_path / "x.png"), "--weights", str(bad)])
    assert "not a readable PyTorch checkpoint" in str(excinfo.value)
