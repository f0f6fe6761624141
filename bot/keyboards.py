"""Inline keyboards and the callback data behind their buttons.

Callback data is visible to, and forgeable by, any client, so it names only a random session
id and a face number or page; every value is parsed strictly and checked against the session.
Faces are paged so that a crowd of 300 still fits Telegram's 100-buttons-per-message limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot.messages import mode_name, text
from bot.store import Session
from pipeline.types import TREATMENTS

FACES_PER_PAGE = 20
COLUMNS = 5
REROLL_COLUMNS = 4

TOGGLE, PAGE, KEEP_ALL, REPLACE_ALL, ANONYMIZE, CANCEL, REROLL, START_OVER = "tpkracxs"
_WITH_ARGUMENT = frozenset({TOGGLE, PAGE, REROLL})
_SESSION_DATA = re.compile(r"(?P<action>[tpkracxs]):(?P<sid>[A-Za-z0-9_-]{8})(?::(?P<arg>[0-9]{1,5}))?")
_MODE_DATA = re.compile(r"m:(?P<mode>[a-z]{1,16})")


@dataclass(frozen=True)
class Action:
    kind: str
    sid: str
    arg: int | None = None


def parse(data: str | None) -> Action | str | None:
    """An Action for a session button, a mode name for a settings button, None for anything else."""
    if not data or len(data) > 64:
        return None
    if match := _MODE_DATA.fullmatch(data):
        return match["mode"] if match["mode"] in TREATMENTS else None
    match = _SESSION_DATA.fullmatch(data)
    if not match or (match["arg"] is not None) != (match["action"] in _WITH_ARGUMENT):
        return None
    return Action(match["action"], match["sid"], int(match["arg"]) if match["arg"] is not None else None)


def _data(kind: str, sid: str, arg: int | None = None) -> str:
    return f"{kind}:{sid}" if arg is None else f"{kind}:{sid}:{arg}"


def page_count(items: int) -> int:
    return max(1, -(-items // FACES_PER_PAGE))


def _page_rows(session: Session, items: list[int], columns: int,
               button: Callable[[int], InlineKeyboardButton]) -> list[list[InlineKeyboardButton]]:
    """The buttons for one page of ``items`` (face numbers), plus prev/next when there are pages."""
    page = min(session.page, page_count(len(items)) - 1)
    buttons = [button(n) for n in items[page * FACES_PER_PAGE:(page + 1) * FACES_PER_PAGE]]
    rows = [buttons[i:i + columns] for i in range(0, len(buttons), columns)]
    navigation = [InlineKeyboardButton(text(session.lang, label), callback_data=_data(PAGE, session.sid, target))
                  for label, target in (("previous", page - 1), ("next", page + 1))
                  if 0 <= target < page_count(len(items))]
    if navigation:
        rows.append(navigation)
    return rows


def selection_keyboard(session: Session) -> InlineKeyboardMarkup:
    lang, sid = session.lang, session.sid
    rows = _page_rows(session, session.numbers, COLUMNS, lambda n: InlineKeyboardButton(
        f"✅ {n}" if n in session.kept else str(n), callback_data=_data(TOGGLE, sid, n)))
    rows.append([InlineKeyboardButton(text(lang, "keep_all"), callback_data=_data(KEEP_ALL, sid)),
                 InlineKeyboardButton(text(lang, "replace_all"), callback_data=_data(REPLACE_ALL, sid))])
    rows.append([InlineKeyboardButton(text(lang, "anonymize"), callback_data=_data(ANONYMIZE, sid)),
                 InlineKeyboardButton(text(lang, "cancel"), callback_data=_data(CANCEL, sid))])
    return InlineKeyboardMarkup(rows)


def rerollable(session: Session) -> list[int]:
    """Faces with a Re-roll button: those the last result replaced by a generated person (a blur,
    including a synthetic mode's fallback blur, has nothing to re-roll)."""
    return [n for n in session.numbers if n in session.synthetic and n not in session.kept]


def result_keyboard(session: Session) -> InlineKeyboardMarkup:
    faces = rerollable(session)
    rows = _page_rows(session, faces, REROLL_COLUMNS, lambda n: InlineKeyboardButton(
        text(session.lang, "reroll", number=n), callback_data=_data(REROLL, session.sid, n))) if faces else []
    rows.append([InlineKeyboardButton(text(session.lang, "start_over"), callback_data=_data(START_OVER, session.sid))])
    return InlineKeyboardMarkup(rows)


def settings_keyboard(lang: str, current: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(("✅ " if mode == current else "") + mode_name(lang, mode), callback_data=f"m:{mode}")
        for mode in TREATMENTS
    ]])
