"""The Telegram bot, end to end: the real Application and the real pipeline against a fake Bot API server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

import pipeline.cli as cli
from bot import keyboards
from bot.app import FaceBot, build_application, serving, webhook_settings
from bot.config import BotConfig, ConfigError, RedactToken, read_token
from bot.main import config_from
from bot.messages import TEXTS
from bot.store import Session
from fake_telegram import Call, FakeTelegram
from pipeline.image_io import load_image


@pytest.fixture(scope="session")
def anonymizer():
    from pipeline.anonymizer import Anonymizer, AnonymizerConfig

    return Anonymizer(AnonymizerConfig())


@pytest.fixture
def fake() -> FakeTelegram:
    server = FakeTelegram().start()
    yield server
    server.close()


@contextlib.asynccontextmanager
async def running_bot(fake: FakeTelegram, anonymizer, state: Path, webhook: dict[str, Any] | None = None,
                      **settings: Any) -> AsyncIterator[FaceBot]:
    config = BotConfig(token=fake.token, api_base_url=fake.url, state_path=state, **settings)
    app = build_application(config, anonymizer)
    async with serving(app, poll_timeout=1, webhook=webhook):
        yield app.bot_data["facebot"]


def encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def tiles(astronaut: np.ndarray, columns: int, rows: int, side: int) -> np.ndarray:
    tile = cv2.resize(astronaut, (side, side), interpolation=cv2.INTER_AREA)
    return np.concatenate([np.concatenate([tile] * columns, axis=1)] * rows, axis=0)


def five_faces_1024(astronaut: np.ndarray) -> np.ndarray:
    """A 1024 x 683 group photo: five astronauts, three in front and two behind."""
    canvas = np.full((683, 1024, 3), 90, np.uint8)
    tile = cv2.resize(astronaut, (340, 340), interpolation=cv2.INTER_AREA)
    for top, lefts in ((0, (2, 342, 682)), (343, (172, 512))):
        for left in lefts:
            canvas[top:top + 340, left:left + 340] = tile
    return canvas


def buttons(message: dict[str, Any]) -> dict[str, str]:
    """Button label -> callback data."""
    rows = message.get("reply_markup", {}).get("inline_keyboard", [])
    return {button["text"]: button["callback_data"] for row in rows for button in row}


async def bot_sent(fake: FakeTelegram, method: str, chat_id: int, count: int = 1, timeout: float = 60) -> Call:
    """The ``count``-th call of ``method`` to the chat, once it has happened."""
    calls = await fake.wait_for(lambda: len(c := fake.calls(method, chat_id)) >= count and c, timeout)
    return calls[count - 1]


async def reply_text(fake: FakeTelegram, chat_id: int, count: int = 1) -> str:
    return (await bot_sent(fake, "sendMessage", chat_id, count)).params["text"]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def inner(image: np.ndarray, face: dict[str, Any]) -> np.ndarray:
    """The middle half of a face box: inside the face whatever the mask's feathering."""
    x1, y1, x2, y2 = face["box"]
    w, h = x2 - x1, y2 - y1
    return image[int(y1 + h / 4):int(y2 - h / 4), int(x1 + w / 4):int(x2 - w / 4)].astype(np.int16)


def changed(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


async def test_photo_keep_one_replace_other_reroll_and_start_over(fake, anonymizer, astronaut, tmp_path):
    pair = np.concatenate([astronaut, astronaut], axis=1)  # two faces, 512 px apart
    alice = fake.user(1)
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3") as facebot:
        fake.send_text(alice, "/start")
        assert await reply_text(fake, 1) == TEXTS["en"]["start"]
        fake.send_text(alice, "/privacy")
        assert "15 minutes" in await reply_text(fake, 1, 2)

        fake.send_document(alice, encode(pair, "PNG"), "pair.png", "image/png")  # a file: full resolution
        preview = (await bot_sent(fake, "sendPhoto", 1)).result
        keys = buttons(preview)
        assert {"1", "2", "Keep all", "Replace all", "Anonymize", "Cancel"} == set(keys)
        assert decode(fake.state.files[preview["photo"][0]["file_id"]]).shape == pair.shape
        sid = keys["1"].split(":")[1]
        faces = facebot.sessions.get(sid).faces
        assert len(faces) == 2

        tap = fake.tap(alice, preview, keys["1"])
        edit = await bot_sent(fake, "editMessageMedia", 1)
        assert fake.answers(tap)
        assert "✅ 1" in buttons(edit.result) and "1 kept" in edit.result["caption"]
        # The redrawn preview shows the kept face in green.
        redrawn = decode(edit.upload("media"))
        x1, y1 = (int(v) for v in faces[0]["box"][:2])
        green = redrawn[max(y1 - 30, 0):y1 + 3, x1:x1 + 30].reshape(-1, 3).astype(int)
        assert ((green[:, 1] > 150) & (green[:, 0] < 120)).any()

        fake.tap(alice, fake.message(1, preview["message_id"]), keys["Anonymize"])
        first = decode((await bot_sent(fake, "sendDocument", 1)).upload("document"))
        result = (await bot_sent(fake, "sendPhoto", 1, 2)).result
        assert fake.calls("sendChatAction", 1)[0].params["action"] == "upload_photo"
        assert first.shape == pair.shape
        assert changed(inner(first, faces[0]), inner(pair, faces[0])) == 0  # kept: untouched
        assert changed(inner(first, faces[1]), inner(pair, faces[1])) > 10  # replaced
        assert not Image.open(io.BytesIO(fake.calls("sendDocument")[0].upload("document"))).getexif()
        assert set(buttons(result)) == {"Re-roll 2", "Start over"}
        assert "1 face(s) replaced" in result["caption"]

        fake.tap(alice, result, buttons(result)["Re-roll 2"])
        second = decode((await bot_sent(fake, "sendDocument", 1, 2)).upload("document"))
        assert changed(inner(second, faces[0]), inner(pair, faces[0])) == 0
        # Someone else this time (the same seed would give the same pixels: the blend matches skin tone
        # and light to the original, so two generated people differ less than either differs from it).
        assert changed(inner(second, faces[1]), inner(first, faces[1])) > 1
        assert fake.message(1, result["message_id"]).get("reply_markup") is None  # old result's buttons gone

        rerolled = (await bot_sent(fake, "sendPhoto", 1, 3)).result
        fake.tap(alice, rerolled, buttons(rerolled)["Start over"])
        again = (await bot_sent(fake, "sendPhoto", 1, 4)).result
        assert "✅ 1" in buttons(again)  # the choices so far are kept


async def test_group_stranger_and_forged_buttons_change_nothing(fake, anonymizer, astronaut, tmp_path):
    alice, bob = fake.user(1), fake.user(2, "ko")
    group = fake.group_chat(500)
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3") as facebot:
        fake.send_text(alice, "/settings", chat=group)
        settings = (await bot_sent(fake, "sendMessage", -500)).result
        fake.tap(alice, settings, buttons(settings)["pixelate"])
        edited = (await bot_sent(fake, "editMessageText", -500)).result
        assert "✅ pixelate" in buttons(edited)

        fake.send_photo(alice, encode(astronaut), chat=group)
        preview = (await bot_sent(fake, "sendPhoto", -500)).result
        assert "pixelate" in preview["caption"]
        toggle = buttons(preview)["1"]
        sid = toggle.split(":")[1]
        before = len(fake.calls())

        refused = fake.tap(bob, preview, toggle)
        answer = (await fake.wait_for(lambda: fake.answers(refused))).pop()
        assert answer.params["text"] == TEXTS["ko"]["not_yours"]

        forged = {"t:AAAAAAAA:1": "expired", f"t:{sid}:7": "invalid", f"t:{sid}:1:1": "invalid",
                  f"a:{sid}:1": "invalid", f"t:{sid}": "invalid", "z" * 80: "invalid", "m:evil": "invalid",
                  f"t:{sid}:01a": "invalid", f"x:{sid}:1": "invalid"}
        for data, reason in forged.items():
            query = fake.tap(alice, preview, data)
            answer = (await fake.wait_for(lambda: fake.answers(query))).pop()
            assert answer.params["text"] == TEXTS["en"][reason], data
        # A genuine button replayed from another message (the settings one) is refused too.
        query = fake.tap(alice, settings, f"a:{sid}")
        assert (await fake.wait_for(lambda: fake.answers(query))).pop().params["text"] == TEXTS["en"]["invalid"]

        assert {c.method for c in fake.calls()[before:]} == {"answerCallbackQuery"}
        assert facebot.sessions.get(sid).kept == set()

        fake.send_text(bob, "/help", chat=group)
        assert await fake.wait_for(lambda: any(c.params["text"] == TEXTS["ko"]["help"]
                                               for c in fake.calls("sendMessage", -500)))
        fake.send_text(alice, "/cancel", chat=group)
        await fake.wait_for(lambda: any(c.params["text"] == TEXTS["en"]["cancelled"]
                                        for c in fake.calls("sendMessage", -500)))
        assert facebot.sessions.get(sid) is None and sid not in facebot.sessions.images
        assert fake.message(-500, preview["message_id"]).get("reply_markup") is None


async def test_bad_files_no_faces_rate_limit_and_expiry(fake, anonymizer, astronaut, tmp_path):
    alice, carol = fake.user(1), fake.user(3, "ko-KR")
    smooth = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3", photos_per_minute=3,
                           session_ttl=1.0, sweep_interval=0.2) as facebot:
        fake.send_document(alice, b"%PDF-1.4 definitely not a photo", "scan.jpg", "image/jpeg")
        assert "not an image we can read" in await reply_text(fake, 1)
        fake.send_document(alice, encode(astronaut)[:3000], "cut.jpg", "image/jpeg")
        assert "truncated or corrupt" in await reply_text(fake, 1, 2)
        fake.send_photo(alice, encode(smooth))
        assert await reply_text(fake, 1, 3) == TEXTS["en"]["no_faces"]
        fake.send_photo(alice, encode(astronaut))
        assert "3 per minute" in await reply_text(fake, 1, 4)
        fake.send_text(alice, "hello?")
        assert await reply_text(fake, 1, 5) == TEXTS["en"]["send_photo"]

        fake.send_photo(carol, encode(cv2.resize(astronaut, (256, 256))))
        preview = (await bot_sent(fake, "sendPhoto", 3)).result
        assert preview["caption"].startswith("얼굴 1개")
        await fake.wait_for(lambda: not facebot.sessions.images)  # expired: the image is gone from memory
        query = fake.tap(carol, preview, buttons(preview)["익명화"])
        answer = (await fake.wait_for(lambda: fake.answers(query))).pop()
        assert answer.params["text"] == TEXTS["ko"]["expired"]


async def test_allow_list_refuses_others(fake, anonymizer, tmp_path):
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3", allowed_users=frozenset({1})):
        fake.send_text(fake.user(2), "/start")
        assert await reply_text(fake, 2) == TEXTS["en"]["not_allowed"]
        fake.send_text(fake.user(1), "/help")
        assert await reply_text(fake, 1) == TEXTS["en"]["help"]


async def test_restart_mid_selection_loses_nothing(fake, anonymizer, astronaut, tmp_path):
    pair = np.concatenate([astronaut, astronaut], axis=1)
    photo = encode(pair)
    alice = fake.user(1)
    state = tmp_path / "state.sqlite3"
    async with running_bot(fake, anonymizer, state) as facebot:
        fake.send_photo(alice, photo)
        preview = (await bot_sent(fake, "sendPhoto", 1)).result
        fake.tap(alice, preview, buttons(preview)["2"])
        await bot_sent(fake, "editMessageMedia", 1)
        faces = facebot.sessions.get(buttons(preview)["2"].split(":")[1]).faces
    downloads = len(fake.calls("getFile"))

    async with running_bot(fake, anonymizer, state) as facebot:
        assert not facebot.sessions.images  # the image was never written to disk
        message = fake.message(1, preview["message_id"])
        fake.tap(alice, message, buttons(message)["Anonymize"])
        out = decode((await bot_sent(fake, "sendDocument", 1)).upload("document"))
        assert len(fake.calls("getFile")) == downloads + 1  # fetched again by its file id
    original = load_image(photo)
    assert changed(inner(out, faces[1]), inner(original, faces[1])) == 0  # face 2 was kept before the restart
    assert changed(inner(out, faces[0]), inner(original, faces[0])) > 10


async def test_twenty_users_at_once_and_an_album(fake, anonymizer, astronaut, tmp_path):
    photo = encode(cv2.resize(astronaut, (256, 256)))
    users = [fake.user(100 + i) for i in range(20)]
    # Memory holds 5 photos: the others are downloaded again when their owners tap.
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3", default_mode="blur", max_images=5) as facebot:
        for user in users:
            fake.send_photo(user, photo)
        album = fake.user(99)
        for _ in range(2):
            fake.send_photo(album, photo, media_group_id="album-1")
        previews = [(await bot_sent(fake, "sendPhoto", user["id"])).result for user in users]
        album_previews = await fake.wait_for(lambda: len(c := fake.calls("sendPhoto", 99)) == 2 and c)
        assert len({buttons(p.result)["1"] for p in album_previews}) == 2  # a session each
        busy = TEXTS["en"]["busy_user"]
        assert all(c.params["text"] != busy for c in fake.calls("sendMessage", 99))  # no nagging for an album
        assert any("in the queue" in c.params["text"] for c in fake.calls("sendMessage"))
        for user, preview in zip(users, previews):
            fake.tap(user, preview, buttons(preview)["Anonymize"])
        for user in users:
            assert decode((await bot_sent(fake, "sendDocument", user["id"])).upload("document")).shape == (256, 256, 3)
        assert len(facebot.sessions.images) <= 5 and len(fake.calls("getFile")) > 22 + 10


async def test_dropped_connections_are_retried_and_a_lost_photo_is_reported(fake, anonymizer, astronaut, tmp_path):
    photo = encode(cv2.resize(astronaut, (256, 256)))
    alice = fake.user(1)
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3", default_mode="blur") as facebot:
        fake.reset_connections("getFile", 1)
        fake.reset_connections("file", 1)
        fake.send_photo(alice, photo)
        await bot_sent(fake, "sendPhoto", 1)  # a reset on each step of the download, and still a preview
        first = facebot.sessions.latest_for(1, 1)
        fake.reset_connections("file", 3)  # the first try and both retries
        fake.send_photo(alice, photo)
        assert await reply_text(fake, 1) == TEXTS["en"]["failed"]
        assert len(fake.calls("sendPhoto", 1)) == 1 and facebot.sessions.latest_for(1, 1).sid == first.sid


async def test_thirty_faces_page_through_the_keyboard(fake, anonymizer, astronaut, tmp_path):
    crowd = tiles(astronaut, 6, 5, 170)
    alice = fake.user(1)
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3", default_mode="blur"):
        fake.send_document(alice, encode(crowd, "PNG"), "crowd.png", "image/png")
        preview = (await bot_sent(fake, "sendPhoto", 1)).result
        keys = buttons(preview)
        assert "Page 1 of 2" in preview["caption"]
        assert [str(n) for n in range(1, 21)] == [k for k in keys if k.isdigit()]
        fake.tap(alice, preview, keys["Next ›"])
        page2 = (await bot_sent(fake, "editMessageCaption", 1)).result
        keys2 = buttons(page2)
        assert [str(n) for n in range(21, 31)] == [k for k in keys2 if k.isdigit()] and "‹ Prev" in keys2
        fake.tap(alice, page2, keys2["25"])
        toggled = (await bot_sent(fake, "editMessageMedia", 1)).result
        assert "✅ 25" in buttons(toggled) and "Page 2 of 2" in toggled["caption"]
        fake.tap(alice, toggled, keys2["Anonymize"])
        await bot_sent(fake, "sendDocument", 1)
        result = (await bot_sent(fake, "sendPhoto", 1, 2)).result
        assert set(buttons(result)) == {"Start over"}  # blurs have nothing to re-roll


@pytest.mark.parametrize("count", [30, 300])
def test_keyboards_fit_telegram_limits(count):
    session = Session(sid="abcdEFGH", user_id=1, chat_id=1, file_id="f", lang="en", mode="synthetic", seed=1,
                      expires_at=0.0, faces=[{"number": n} for n in range(1, count + 1)],
                      synthetic=set(range(1, count + 1)))
    pages = keyboards.page_count(count)
    for done in (False, True):
        seen = []
        for page in range(pages):
            session.page, session.done = page, done
            markup = (keyboards.result_keyboard if done else keyboards.selection_keyboard)(session)
            flat = [b for row in markup.inline_keyboard for b in row]
            assert len(flat) <= 100 and all(len(b.callback_data.encode()) <= 64 for b in flat)
            assert all(isinstance(keyboards.parse(b.callback_data), keyboards.Action) for b in flat)
            seen += [keyboards.parse(b.callback_data).arg for b in flat if b.callback_data[0] in "tx"]
        assert seen == list(range(1, count + 1))


def test_token_never_reaches_the_log():
    token = "987654:SECRET-token-value"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactToken(token))
    logger = logging.getLogger("test_bot.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("POST https://api.telegram.org/bot%s/getMe", token)
        logger.warning(f"inline https://api.telegram.org/bot{token}/getUpdates")
        try:
            raise RuntimeError(f"connect failed for /bot{token}/sendPhoto")
        except RuntimeError:
            logger.exception("request failed")
    finally:
        logger.removeHandler(handler)
    assert token not in stream.getvalue() and stream.getvalue().count("<token>") == 3


def test_token_sources_and_cli_options(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("111:from-file\n")
    assert read_token({"TELEGRAM_BOT_TOKEN": "111:from-env"}) == "111:from-env"
    assert read_token({"TELEGRAM_BOT_TOKEN_FILE": str(secret)}) == "111:from-file"
    for environ in ({}, {"TELEGRAM_BOT_TOKEN": "a", "TELEGRAM_BOT_TOKEN_FILE": str(secret)},
                    {"TELEGRAM_BOT_TOKEN_FILE": str(tmp_path / "missing")}):
        with pytest.raises(ConfigError):
            read_token(environ)
    args = cli.build_parser().parse_args(["bot", "--webhook-url", "https://example.org/hook", "--state",
                                          str(tmp_path / "s.db"), "--photos-per-minute", "4"])
    config = config_from(args, {"TELEGRAM_BOT_TOKEN_FILE": str(secret), "TELEGRAM_API_BASE_URL": "http://local:8081",
                                "FACECHANGE_ALLOWED_USERS": "5, 6"})
    assert config == replace(BotConfig(token="111:from-file"), api_base_url="http://local:8081",
                             allowed_users=frozenset({5, 6}), photos_per_minute=4, state_path=tmp_path / "s.db")
    assert config.base_url == "http://local:8081/bot" and config.base_file_url == "http://local:8081/file/bot"
    assert args.handler is cli.cmd_bot and args.webhook_url == "https://example.org/hook"


async def test_latency_anonymize_tap_to_result_1024px_five_faces(fake, anonymizer, astronaut, tmp_path, capsys):
    """Prints the time from the Anonymize tap to the result (a measurement for the report, not a check)."""
    alice = fake.user(1)
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3") as facebot:
        photo = encode(five_faces_1024(astronaut))
        fake.send_photo(alice, photo)
        preview = (await bot_sent(fake, "sendPhoto", 1)).result
        session = facebot.sessions.get(buttons(preview)["1"].split(":")[1])
        assert len([k for k in buttons(preview) if k.isdigit()]) == 5
        start = time.perf_counter()
        fake.tap(alice, preview, buttons(preview)["Anonymize"])
        result = (await bot_sent(fake, "sendPhoto", 1, 2)).result
        to_photo = time.perf_counter() - start
        assert "5 face(s) replaced (synthetic person)" in result["caption"]
        await bot_sent(fake, "sendDocument", 1)
        to_document = time.perf_counter() - start
    image, faces = load_image(photo), session.detections()
    start = time.perf_counter()
    # The same work without the bot, on a thread too: the first anonymize on the main thread is much slower.
    await asyncio.to_thread(anonymizer.anonymize, image, faces, keep=set(), seed=session.seed)
    alone = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[latency] Anonymize tap -> result photo {to_photo:.2f} s, -> full-resolution PNG "
              f"{to_document:.2f} s; anonymize alone {alone:.2f} s (1024 x 683, 5 faces, mode synthetic)\n"
              f"[latency] result caption: {result['caption']!r}")


def _post(url: str, body: dict[str, Any], secret: str) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": secret})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_webhook_mode_registers_and_checks_its_secret(fake, anonymizer, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    webhook = webhook_settings("https://bot.example.org/telegram-hook", listen="127.0.0.1", port=port)
    async with running_bot(fake, anonymizer, tmp_path / "state.sqlite3", webhook=webhook):
        registered = fake.calls("setWebhook")[0].params
        assert registered["url"] == "https://bot.example.org/telegram-hook"
        assert registered["secret_token"] == webhook["secret_token"] and len(webhook["secret_token"]) >= 32
        update = {"update_id": 1, "message": fake.send_text(fake.user(1), "/help")}
        url = f"http://127.0.0.1:{port}/telegram-hook"
        assert await asyncio.to_thread(_post, url, update, "forged") == 403
        assert await asyncio.to_thread(_post, url, update, webhook["secret_token"]) == 200
        assert await reply_text(fake, 1) == TEXTS["en"]["help"]
        assert len(fake.calls("sendMessage")) == 1  # the forged post did nothing


def test_result_caption_explains_fallbacks_in_the_users_language():
    from bot.app import result_caption
    from bot.store import Session
    from pipeline.types import Face, Fallback, Replacement

    def face(number, fallback):
        record = Face(box=np.zeros(4, np.float32), landmarks=np.zeros((5, 2), np.float32), score=0.9, number=number)
        record.replacement = Replacement("blur", fallback=fallback)
        return record

    unreachable = Fallback("unreachable", (("gender", "female"), ("age_group", "60+")))
    faces = [face(1, unreachable), face(2, Fallback("profile")), face(3, unreachable)]
    session = Session("s", 1, 1, "f", "ko", [], "synthetic", 0, 0.0)
    caption = result_caption(session, faces)
    assert "얼굴 1, 3" in caption and "60+세 여성" in caption and "옆모습" in caption
    assert "cannot" not in caption and "female" not in caption
    session.lang = "en"
    assert "Face 1, 3: blurred instead (no synthetic female faces aged 60+ yet)" in result_caption(session, faces)


def test_only_faces_given_a_generated_person_can_be_rerolled_even_after_a_restart():
    session = Session(sid="s", user_id=1, chat_id=1, file_id="f", lang="en", mode="synthetic", seed=1,
                      expires_at=0.0, faces=[{"number": n} for n in (1, 2, 3)], kept={3}, synthetic={2})
    assert keyboards.rerollable(Session.from_json(session.to_json())) == [2]  # 1 fell back to blur, 3 kept


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_every_fallback_reason_has_a_caption_in_each_language(lang):
    from bot.messages import fallback_text
    from pipeline.types import FALLBACK_REASONS, Fallback

    values = {"size": 12.0, "gender": "female", "age_group": "60+", "score": 0.52}
    for code, english in FALLBACK_REASONS.items():
        needed = {name: values[name] for name in values if "{" + name in english}
        caption = fallback_text(lang, Fallback(code, tuple(needed.items())))
        assert caption and "{" not in caption
