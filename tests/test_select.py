from __future__ import annotations

import numpy as np
import pytest

from pipeline.render import draw_numbered_faces
from pipeline.select import mark_kept, number_in_reading_order, parse_numbers
from pipeline.types import Face


def _face(x: float, y: float, size: float = 40.0) -> Face:
    return Face(box=np.array([x, y, x + size, y + size], np.float32), landmarks=np.zeros((5, 2), np.float32),
                score=0.9)


def test_reading_order_groups_rows_despite_uneven_heads():
    # Back row at y~100 with heads at slightly different heights, front row at y~300.
    back = [_face(300, 112), _face(100, 100), _face(200, 90)]
    front = [_face(250, 300), _face(50, 310)]
    ordered = number_in_reading_order(front + back)
    assert [(int(f.box[0]), int(f.box[1])) for f in ordered] == [(100, 100), (200, 90), (300, 112), (50, 310),
                                                                  (250, 300)]
    assert [f.number for f in ordered] == [1, 2, 3, 4, 5]


def test_parse_and_mark_kept():
    assert parse_numbers("1, 3,5-7") == {1, 3, 5, 6, 7}
    assert parse_numbers("") == set()
    for bad in ["0", "a", "3-1", "1-", "-2"]:
        with pytest.raises(ValueError):
            parse_numbers(bad)
    faces = number_in_reading_order([_face(0, 0), _face(100, 0), _face(200, 0)])
    mark_kept(faces, {2})
    assert [f.keep for f in faces] == [False, True, False]


def test_preview_labels_every_face_even_at_the_top_edge():
    image = np.zeros((200, 300, 3), np.uint8)
    faces = number_in_reading_order([_face(10, 0), _face(150, 100)])
    faces[1].keep = True
    drawn = draw_numbered_faces(image, faces)
    assert image.max() == 0  # the input is not drawn on
    # Label boxes are filled: the first sits inside the top edge, the second above its face.
    assert (drawn[2:12, 12:20] > 0).any(axis=2).all()
    assert np.abs(drawn[96, 152].astype(int) - (40, 200, 80)).max() <= 2  # kept faces are green
