"""Pending selections on disk (so a restart loses nothing) and their images in memory only.

The disk holds what is needed to carry on after a restart: Telegram's file id (the photo
itself is downloaded again on the next tap), the detections, the toggles, mode and seeds,
and where the messages are. The image never touches the disk.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.types import Face

SESSION_ID_BYTES = 6  # 8 url-safe characters: unguessable for a 15-minute window, short for callback data


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def new_seed() -> int:
    return secrets.randbelow(2**31 - 1)


def face_from_json(record: dict[str, Any]) -> Face:
    """A detection back from its Face.to_json record, with everything the anonymizer reads."""
    return Face(
        box=np.asarray(record["box"], np.float32),
        landmarks=np.asarray(record["landmarks"], np.float32),
        score=float(record["score"]),
        gender=record.get("gender"),
        gender_prob=record.get("gender_prob"),
        age_group=record.get("age_group"),
        age=record.get("age"),
        number=record["number"],
    )


@dataclass
class Session:
    """One photo's selection, from the preview until it expires."""

    sid: str
    user_id: int
    chat_id: int
    file_id: str
    lang: str
    faces: list[dict[str, Any]]  # Face.to_json of each detection, numbered 1..N
    mode: str
    seed: int
    expires_at: float
    kept: set[int] = field(default_factory=set)
    face_seeds: dict[int, int] = field(default_factory=dict)  # re-rolled faces only
    synthetic: set[int] = field(default_factory=set)  # faces the last result gave a generated person
    preview_message_id: int | None = None
    result_message_id: int | None = None
    page: int = 0
    done: bool = False  # anonymized at least once: the buttons are under the result now

    @property
    def numbers(self) -> list[int]:
        return [record["number"] for record in self.faces]

    def detections(self) -> list[Face]:
        """Fresh Face objects: the anonymizer writes its decisions onto the ones it is given."""
        return [face_from_json(record) for record in self.faces]

    def to_json(self) -> str:
        record = asdict(self)
        record["kept"] = sorted(self.kept)
        record["face_seeds"] = {str(k): v for k, v in self.face_seeds.items()}
        record["synthetic"] = sorted(self.synthetic)
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> Session:
        record = json.loads(text)
        record["kept"] = set(record["kept"])
        record["face_seeds"] = {int(k): v for k, v in record["face_seeds"].items()}
        record["synthetic"] = set(record.get("synthetic", ()))  # rows saved before this field have none
        return cls(**record)


class SessionStore:
    """Sessions in SQLite (a few small rows, written on each tap), images in memory beside it.

    At most ``max_images`` images stay in memory, least recently used out first: a few users
    sending many large photos must not exhaust memory, and an evicted image is downloaded
    again by its file id on the next tap, as after a restart.
    """

    def __init__(self, path: Path, ttl: float, max_images: int, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self.clock = clock
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write stands alone
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sessions "
                        "(sid TEXT PRIMARY KEY, user_id INTEGER, chat_id INTEGER, expires_at REAL, data TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS users (user_id INTEGER PRIMARY KEY, mode TEXT)")
        self.max_images = max_images
        self.images: OrderedDict[str, np.ndarray] = OrderedDict()

    def close(self) -> None:
        self.db.close()
        self.images.clear()

    def create(self, **fields: Any) -> Session:
        session = Session(sid=new_session_id(), seed=new_seed(), expires_at=self.clock() + self.ttl, **fields)
        self.save(session)
        return session

    def save(self, session: Session) -> None:
        """Stores the session and pushes its expiry back: each tap buys another ttl."""
        session.expires_at = self.clock() + self.ttl
        self.db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)",
                        (session.sid, session.user_id, session.chat_id, session.expires_at, session.to_json()))

    def get(self, sid: str) -> Session | None:
        row = self.db.execute("SELECT data FROM sessions WHERE sid = ? AND expires_at > ?",
                              (sid, self.clock())).fetchone()
        return Session.from_json(row[0]) if row else None

    def latest_for(self, user_id: int, chat_id: int) -> Session | None:
        row = self.db.execute("SELECT data FROM sessions WHERE user_id = ? AND chat_id = ? AND expires_at > ? "
                              "ORDER BY expires_at DESC LIMIT 1", (user_id, chat_id, self.clock())).fetchone()
        return Session.from_json(row[0]) if row else None

    def image(self, sid: str) -> np.ndarray | None:
        image = self.images.get(sid)
        if image is not None:
            self.images.move_to_end(sid)
        return image

    def keep_image(self, sid: str, image: np.ndarray) -> None:
        self.images[sid] = image
        self.images.move_to_end(sid)
        while len(self.images) > self.max_images:
            self.images.popitem(last=False)

    def delete(self, sid: str) -> None:
        self.db.execute("DELETE FROM sessions WHERE sid = ?", (sid,))
        self.images.pop(sid, None)

    def sweep(self) -> int:
        """Deletes expired sessions and their images; returns how many images were dropped."""
        now = self.clock()
        self.db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
        live = {sid for (sid,) in self.db.execute("SELECT sid FROM sessions")}
        stale = [sid for sid in self.images if sid not in live]
        for sid in stale:
            del self.images[sid]
        return len(stale)

    def mode(self, user_id: int, default: str) -> str:
        row = self.db.execute("SELECT mode FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return row[0] if row else default

    def set_mode(self, user_id: int, mode: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO users VALUES (?, ?)", (user_id, mode))
