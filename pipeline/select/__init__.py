"""Selection stage: number faces as the user sees them and mark the ones to keep."""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.types import Face


def number_in_reading_order(faces: list[Face]) -> list[Face]:
    """Sort faces top-to-bottom, left-to-right and number them 1..N.

    Faces whose centres lie within half a face height of a row's first face form one row, so
    a row of people standing side by side reads left to right even if their heads are at
    slightly different heights.
    """
    if not faces:
        return []
    by_height = sorted(faces, key=lambda f: (f.box[1] + f.box[3]) / 2)
    rows: list[list[Face]] = []
    row_center = row_band = 0.0
    for face in by_height:
        center = float(face.box[1] + face.box[3]) / 2
        if not rows or center > row_center + row_band:
            rows.append([])
            row_center, row_band = center, max(face.height, 1.0) / 2
        rows[-1].append(face)
    ordered = [face for row in rows for face in sorted(row, key=lambda f: float(f.box[0] + f.box[2]))]
    for number, face in enumerate(ordered, start=1):
        face.number = number
    return ordered


def parse_numbers(text: str) -> set[int]:
    """Parse a keep list like "1,3,5-7" into {1, 3, 5, 6, 7}."""
    numbers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"not a face number or range: {part!r}")
        low, high = int(first), int(last) if dash else int(first)
        if low < 1 or high < low:
            raise ValueError(f"not a valid face range: {part!r}")
        numbers.update(range(low, high + 1))
    return numbers


def mark_kept(faces: Iterable[Face], keep_numbers: set[int]) -> None:
    for face in faces:
        face.keep = face.number in keep_numbers

