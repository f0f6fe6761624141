"""The Telegram conversation: photo -> numbered preview -> taps -> anonymized result.

Handlers run concurrently on the event loop; everything that touches the models goes
through the single worker (bot.worker), and everything else CPU-bound (decoding a
re-downloaded photo, redrawing a preview) goes to a helper thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import cv2
import numpy as np
from telegram import Bot, BotCommand, CallbackQuery, InputFile, InputMediaPhoto, Message, Update
from telegram.constants import ChatAction
from telegram.error import BadRequest, NetworkError, TelegramError
from telegram.ext import (AIORateLimiter, Application, ApplicationHandlerStop, CallbackQueryHandler, CommandHandler,
                          ContextTypes, MessageHandler, TypeHandler, filters)

from bot import keyboards
from bot.config import BotConfig
from bot.keyboards import Action
from bot.messages import COMMANDS, fallback_text, language, mode_name, text
from bot.store import Session, SessionStore, new_seed
from bot.worker import KeyedLocks, QueueFull, Worker
from pipeline.anonymizer import Anonymizer
from pipeline.image_io import ImageError, encode_image, load_image
from pipeline.render import draw_numbered_faces
from pipeline.select import mark_kept
from pipeline.types import Face, Fallback

log = logging.getLogger(__name__)
T = TypeVar("T")

PREVIEW_MAX_SIDE = 1600  # the chat shows previews small; a smaller upload makes every tap faster
PHOTO_MAX_SIDE = 2560  # sendPhoto wants width + height <= 10000; Telegram recompresses to ~2560 anyway
PNG_MAX_PIXELS = 8_000_000  # beyond this a PNG nears the 50 MB upload limit: high-quality JPEG instead
DOWNLOAD_LIMIT = 20 * 2**20  # the cloud Bot API's getFile limit
CAPTION_LIMIT = 1024
CHAT_ACTION_EVERY = 4.5  # Telegram shows a chat action for about 5 seconds
DOWNLOAD_RETRY_DELAYS = (0.5, 2.0)  # a photo's download is idempotent: a dropped connection is worth two more tries


@dataclass
class Result:
    photo: bytes
    document: bytes
    filename: str
    faces: list[Face]


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    scale = max_side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def render_preview(image: np.ndarray, faces: list[Face], kept: set[int]) -> bytes:
    mark_kept(faces, kept)
    return encode_image(_shrink(draw_numbered_faces(image, faces), PREVIEW_MAX_SIDE), "JPEG", 85)


def _truncate(caption: str) -> str:
    return caption if len(caption) <= CAPTION_LIMIT else caption[:CAPTION_LIMIT - 1] + "…"


def preview_caption(session: Session) -> str:
    lang = session.lang
    caption = text(lang, "preview", count=len(session.faces), kept=len(session.kept),
                   mode=mode_name(lang, session.mode))
    pages = keyboards.page_count(len(session.faces))
    if pages > 1:
        caption += "\n" + text(lang, "preview_page", page=min(session.page, pages - 1) + 1, pages=pages)
    return caption


def result_caption(session: Session, faces: list[Face]) -> str:
    lang = session.lang
    lines = [text(lang, "result", replaced=sum(not f.keep for f in faces), mode=mode_name(lang, session.mode))]
    fallbacks: dict[Fallback, list[str]] = defaultdict(list)
    for face in faces:
        if face.replacement and face.replacement.fallback:
            fallbacks[face.replacement.fallback].append(str(face.number))
    lines += [text(lang, "fallback", numbers=", ".join(numbers), reason=fallback_text(lang, fallback))
              for fallback, numbers in fallbacks.items()]
    return _truncate("\n".join(lines))


class FaceBot:
    """The bot's state and handlers; one per running Application."""

    def __init__(self, config: BotConfig, anonymizer: Anonymizer) -> None:
        self.config = config
        self.anonymizer = anonymizer
        self.store: SessionStore | None = None
        self.worker = Worker(config.queue_size)
        # One job per user at a time keeps one user's album from crowding everyone else out of the queue.
        self.user_jobs = KeyedLocks()
        # Taps on one session are applied one after another, so two quick taps cannot lose a toggle.
        self.session_taps = KeyedLocks()
        self.recent_photos: defaultdict[int, deque[float]] = defaultdict(deque)
        self.sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def register(self, app: Application) -> None:
        app.add_handler(TypeHandler(Update, self.gate), group=-1)
        for name, callback in (("start", self.on_start), ("help", self.on_help), ("privacy", self.on_privacy),
                               ("settings", self.on_settings), ("cancel", self.on_cancel)):
            app.add_handler(CommandHandler(name, callback))
        app.add_handler(MessageHandler(filters.PHOTO | filters.Document.ALL, self.on_photo))
        # Only in private chats: in a group, chatter is not addressed to the bot.
        app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND & filters.ChatType.PRIVATE, self.on_text))
        app.add_handler(CallbackQueryHandler(self.on_button))
        app.add_error_handler(self.on_error)

    async def start(self, app: Application) -> None:
        self.store = SessionStore(self.config.state_path, self.config.session_ttl, self.config.max_images)
        self.worker.start()
        # The synthetic-face pools are drawn once, first in the queue, so no user's photo waits for them.
        self.worker.submit(self.anonymizer.faces_source.draw_pools).add_done_callback(_log_pools)
        self.sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")
        for lang, commands in COMMANDS.items():
            await app.bot.set_my_commands([BotCommand(*c) for c in commands],
                                          language_code=None if lang == "en" else lang)

    async def stop(self, app: Application) -> None:
        if self.sweeper:
            self.sweeper.cancel()
            await asyncio.gather(self.sweeper, return_exceptions=True)
        await self.worker.stop()
        if self.store:
            self.store.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            self.sweep()

    def sweep(self) -> None:
        assert self.store
        dropped = self.store.sweep()
        self._forget_old_photos()
        if dropped:
            log.info("expired %d pending selection(s)", dropped)

    # -- plumbing --------------------------------------------------------------------------

    @property
    def sessions(self) -> SessionStore:
        assert self.store, "FaceBot.start() has not run"
        return self.store

    async def gate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        allowed = self.config.allowed_users
        user = update.effective_user
        if allowed is None or (user and user.id in allowed):
            return
        lang = language(user.language_code if user else None)
        if update.callback_query:
            await update.callback_query.answer(text(lang, "not_allowed"))
        elif update.effective_message and update.effective_chat and update.effective_chat.type == "private":
            await update.effective_message.reply_text(text(lang, "not_allowed"))
        raise ApplicationHandlerStop

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("update failed", exc_info=context.error)
        if isinstance(update, Update) and update.effective_chat:
            lang = language(update.effective_user.language_code if update.effective_user else None)
            with contextlib.suppress(TelegramError):
                await context.bot.send_message(update.effective_chat.id, text(lang, "failed"))

    async def _keep_uploading(self, bot: Bot, chat_id: int, done: asyncio.Event) -> None:
        # Stopped by an event, never cancelled: cancelling a request in flight can leave httpcore's connection
        # pool holding a broken connection that a later request (a photo's download) then fails on.
        while not done.is_set():
            with contextlib.suppress(TelegramError):
                await bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), CHAT_ACTION_EVERY)

    async def _run_job(self, bot: Bot, chat_id: int, lang: str, job: Callable[[], T]) -> T | None:
        """The job's result from the worker, or None when the queue was full (the user has been told)."""
        try:
            future = self.worker.submit(job)
        except QueueFull:
            await bot.send_message(chat_id, text(lang, "queue_full"))
            return None
        position = self.worker.queue.qsize()
        if position >= self.config.queue_notice_at:
            await bot.send_message(chat_id, text(lang, "queue_position", position=position))
        done = asyncio.Event()
        uploading = asyncio.create_task(self._keep_uploading(bot, chat_id, done))
        try:
            return await future
        finally:
            done.set()
            await uploading

    def _within_rate(self, user_id: int) -> bool:
        now = time.monotonic()
        recent = self.recent_photos[user_id]
        while recent and recent[0] <= now - 60:
            recent.popleft()
        if len(recent) >= self.config.photos_per_minute:
            return False
        recent.append(now)
        return True

    def _forget_old_photos(self) -> None:
        minute_ago = time.monotonic() - 60
        for user_id in [u for u, recent in self.recent_photos.items() if not recent or recent[-1] <= minute_ago]:
            del self.recent_photos[user_id]

    async def _download(self, bot: Bot, file_id: str) -> bytes:
        async def once() -> bytes:
            file = await bot.get_file(file_id)
            return bytes(await file.download_as_bytearray())

        for delay in DOWNLOAD_RETRY_DELAYS:
            try:
                return await once()
            except NetworkError as exc:  # includes time-outs; a BadRequest (a wrong file id) will not get better
                if isinstance(exc, BadRequest):
                    raise
                log.warning("download failed (%s); trying again in %g s", exc, delay)
                await asyncio.sleep(delay)
        return await once()

    async def _image(self, bot: Bot, session: Session) -> np.ndarray:
        """The session's photo: from memory, or after a restart or an eviction downloaded again by its file id."""
        image = self.sessions.image(session.sid)
        if image is None:
            image = await asyncio.to_thread(load_image, await self._download(bot, session.file_id))
            self.sessions.keep_image(session.sid, image)
        return image

    # -- commands --------------------------------------------------------------------------

    async def _reply(self, update: Update, key: str, **values: object) -> Message:
        assert update.effective_message
        lang = language(update.effective_user.language_code if update.effective_user else None)
        return await update.effective_message.reply_text(text(lang, key, **values))

    async def on_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._reply(update, "start")

    async def on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._reply(update, "help")

    async def on_privacy(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._reply(update, "privacy", minutes=round(self.config.session_ttl / 60))

    async def on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._reply(update, "send_photo")

    async def on_settings(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message and update.effective_user
        lang = language(update.effective_user.language_code)
        mode = self.sessions.mode(update.effective_user.id, self.config.default_mode)
        await update.effective_message.reply_text(text(lang, "settings", mode=mode_name(lang, mode)),
                                                  reply_markup=keyboards.settings_keyboard(lang, mode))

    async def on_cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_user and update.effective_chat
        session = self.sessions.latest_for(update.effective_user.id, update.effective_chat.id)
        if session is None:
            await self._reply(update, "nothing_to_cancel")
            return
        await self._close(context.bot, session)
        await self._reply(update, "cancelled")

    async def _close(self, bot: Bot, session: Session) -> None:
        """Deletes the session and its image, and takes the buttons off its messages."""
        self.sessions.delete(session.sid)
        for message_id in (session.preview_message_id, session.result_message_id):
            if message_id is not None:
                with contextlib.suppress(TelegramError):
                    await bot.edit_message_reply_markup(session.chat_id, message_id, reply_markup=None)

    # -- a new photo -----------------------------------------------------------------------

    def _detect(self, data: bytes) -> tuple[np.ndarray, list[Face], bytes | None]:
        image = load_image(data)
        faces = self.anonymizer.detect(image)
        return image, faces, render_preview(image, faces, set()) if faces else None

    async def on_photo(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        assert message and user
        lang = language(user.language_code)
        if not self._within_rate(user.id):
            await message.reply_text(text(lang, "rate_limited", limit=self.config.photos_per_minute))
            return
        if message.photo:
            file_id = message.photo[-1].file_id  # the largest size Telegram made
        else:
            assert message.document
            if (message.document.file_size or 0) > DOWNLOAD_LIMIT:
                await message.reply_text(text(lang, "bad_image", reason=text(lang, "too_big")))
                return
            file_id = message.document.file_id
        if self.user_jobs.busy(user.id) and message.media_group_id is None:  # an album's photos queue up silently
            await message.reply_text(text(lang, "busy_user"))
        async with self.user_jobs.hold(user.id):
            data = await self._download(context.bot, file_id)
            try:
                detected = await self._run_job(context.bot, message.chat_id, lang, lambda: self._detect(data))
            except ImageError as exc:
                detected = exc
        if isinstance(detected, ImageError):
            await message.reply_text(text(lang, "bad_image", reason=detected))
            return
        if detected is None:
            return
        image, faces, preview = detected
        if preview is None:
            await message.reply_text(text(lang, "no_faces"))
            return
        session = self.sessions.create(user_id=user.id, chat_id=message.chat_id, file_id=file_id, lang=lang,
                                       faces=[face.to_json() for face in faces],
                                       mode=self.sessions.mode(user.id, self.config.default_mode))
        self.sessions.keep_image(session.sid, image)
        async with self.session_taps.hold(session.sid):  # a tap racing this reply waits for the message id
            sent = await message.reply_photo(preview, caption=preview_caption(session),
                                             reply_markup=keyboards.selection_keyboard(session))
            session.preview_message_id = sent.message_id
            self.sessions.save(session)

    # -- buttons ---------------------------------------------------------------------------

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        assert query
        lang = language(query.from_user.language_code)
        action = keyboards.parse(query.data)
        if isinstance(action, str):
            await self._set_mode(query, lang, action)
            return
        if action is None:
            await query.answer(text(lang, "invalid"))
            return
        # Checked once before waiting for the session, so that a stranger is answered at once even
        # while the owner's photo is being anonymized, and again after, as the previous tap left it.
        refusal = self._refusal(self.sessions.get(action.sid), action, query)
        if refusal is None:
            async with self.session_taps.hold(action.sid):
                session = self.sessions.get(action.sid)
                refusal = self._refusal(session, action, query)
                if session and refusal is None:
                    await self._apply(context.bot, query, session, action)
                    return
        await query.answer(text(lang, refusal), show_alert=refusal == "expired")

    def _refusal(self, session: Session | None, action: Action, query: CallbackQuery) -> str | None:
        if session is None:
            return "expired"
        if query.from_user.id != session.user_id:
            return "not_yours"
        return None if self._applies(session, action, query) else "invalid"

    async def _set_mode(self, query: CallbackQuery, lang: str, mode: str) -> None:
        self.sessions.set_mode(query.from_user.id, mode)
        await query.answer()
        with contextlib.suppress(BadRequest):  # "message is not modified" when the mode was already set
            await query.edit_message_text(text(lang, "settings", mode=mode_name(lang, mode)),
                                          reply_markup=keyboards.settings_keyboard(lang, mode))

    @staticmethod
    def _applies(session: Session, action: Action, query: CallbackQuery) -> bool:
        """Whether a well-formed button fits the session's state: a forged or stale one does not."""
        message = query.message
        on_preview = message is not None and message.chat.id == session.chat_id and (
            message.message_id == session.preview_message_id)
        on_result = message is not None and message.chat.id == session.chat_id and (
            message.message_id == session.result_message_id)
        if action.kind in (keyboards.TOGGLE, keyboards.KEEP_ALL, keyboards.REPLACE_ALL, keyboards.ANONYMIZE,
                           keyboards.CANCEL):
            return on_preview and not session.done and (
                action.kind != keyboards.TOGGLE or action.arg in session.numbers)
        if action.kind == keyboards.PAGE:
            items = len(keyboards.rerollable(session)) if session.done else len(session.faces)
            return (on_result if session.done else on_preview) and action.arg < keyboards.page_count(items)
        if action.kind == keyboards.REROLL:
            return on_result and action.arg in keyboards.rerollable(session)
        return on_result  # START_OVER

    async def _apply(self, bot: Bot, query: CallbackQuery, session: Session, action: Action) -> None:
        kind = action.kind
        if kind == keyboards.CANCEL:
            await query.answer()
            await self._close(bot, session)
            with contextlib.suppress(TelegramError):
                await query.edit_message_caption(text(session.lang, "cancelled"), reply_markup=None)
            return
        if kind == keyboards.PAGE:
            session.page = action.arg
            self.sessions.save(session)
            await query.answer()
            if session.done:
                await query.edit_message_reply_markup(keyboards.result_keyboard(session))
            else:
                await query.edit_message_caption(preview_caption(session),
                                                 reply_markup=keyboards.selection_keyboard(session))
            return
        if kind in (keyboards.TOGGLE, keyboards.KEEP_ALL, keyboards.REPLACE_ALL):
            if kind == keyboards.TOGGLE:
                session.kept ^= {action.arg}
            else:
                session.kept = set(session.numbers) if kind == keyboards.KEEP_ALL else set()
            self.sessions.save(session)
            await query.answer()
            await self._redraw_preview(bot, query, session)
            return
        if kind == keyboards.START_OVER:
            await query.answer()
            await self._start_over(bot, session)
            return
        if kind == keyboards.REROLL:
            session.face_seeds[action.arg] = new_seed()
        await query.answer()
        await self._anonymize(bot, session)

    async def _redraw_preview(self, bot: Bot, query: CallbackQuery, session: Session) -> None:
        image = await self._image(bot, session)
        preview = await asyncio.to_thread(render_preview, image, session.detections(), session.kept)
        with contextlib.suppress(BadRequest):  # "not modified": Keep all when all were kept already
            await query.edit_message_media(InputMediaPhoto(preview, caption=preview_caption(session)),
                                           reply_markup=keyboards.selection_keyboard(session))

    async def _start_over(self, bot: Bot, session: Session) -> None:
        image = await self._image(bot, session)
        preview = await asyncio.to_thread(render_preview, image, session.detections(), session.kept)
        if session.result_message_id is not None:
            with contextlib.suppress(TelegramError):
                await bot.edit_message_reply_markup(session.chat_id, session.result_message_id, reply_markup=None)
        session.done, session.page, session.result_message_id = False, 0, None
        sent = await bot.send_photo(session.chat_id, preview, caption=preview_caption(session),
                                    reply_markup=keyboards.selection_keyboard(session))
        session.preview_message_id = sent.message_id
        self.sessions.save(session)

    def _render_result(self, image: np.ndarray, session: Session) -> Result:
        faces = session.detections()
        out = self.anonymizer.anonymize(image, faces, keep=session.kept, mode=session.mode, seed=session.seed,
                                        face_seeds=session.face_seeds)
        photo = encode_image(_shrink(out, PHOTO_MAX_SIDE), "JPEG", 90)
        if out.shape[0] * out.shape[1] <= PNG_MAX_PIXELS:
            return Result(photo, encode_image(out, "PNG"), "anonymized.png", faces)
        return Result(photo, encode_image(out, "JPEG", 95), "anonymized.jpg", faces)

    async def _anonymize(self, bot: Bot, session: Session) -> None:
        image = await self._image(bot, session)
        async with self.user_jobs.hold(session.user_id):
            result = await self._run_job(bot, session.chat_id, session.lang,
                                         lambda: self._render_result(image, session))
        if result is None:
            return
        previous = session.preview_message_id if not session.done else session.result_message_id
        if previous is not None:
            with contextlib.suppress(TelegramError):
                if session.done:
                    await bot.edit_message_reply_markup(session.chat_id, previous, reply_markup=None)
                else:
                    await bot.edit_message_caption(session.chat_id, previous,
                                                   caption=text(session.lang, "done_preview"), reply_markup=None)
        session.done, session.page = True, 0
        session.synthetic = {f.number for f in result.faces
                             if f.replacement is not None and f.replacement.treatment == "synthetic"}
        sent = await bot.send_photo(session.chat_id, result.photo, caption=result_caption(session, result.faces),
                                    reply_markup=keyboards.result_keyboard(session))
        session.result_message_id = sent.message_id
        self.sessions.save(session)
        await bot.send_document(session.chat_id, InputFile(result.document, filename=result.filename))


def _log_pools(future: asyncio.Future) -> None:
    if future.cancelled():
        return
    if future.exception() is not None:
        log.error("drawing the synthetic-face pools failed (they are drawn at first use instead)",
                  exc_info=future.exception())
    else:
        log.info("synthetic-face pools drawn: %s", ", ".join(future.result()))


def build_application(config: BotConfig, anonymizer: Anonymizer) -> Application:
    facebot = FaceBot(config, anonymizer)
    builder = (Application.builder().token(config.token).base_url(config.base_url)
               .base_file_url(config.base_file_url).concurrent_updates(256)
               .post_init(facebot.start).post_shutdown(facebot.stop))
    if config.rate_limiter:
        builder = builder.rate_limiter(AIORateLimiter())
    app = builder.build()
    facebot.register(app)
    app.bot_data["facebot"] = facebot
    return app


def webhook_settings(webhook_url: str, listen: str = "0.0.0.0", port: int = 8443,
                     secret_token: str | None = None) -> dict[str, Any]:
    """Updater.start_webhook / run_webhook arguments: Telegram must present the secret on every update.

    The webhook is registered anew on each start, so a fresh random secret per run needs no storage.
    """
    return {"listen": listen, "port": port, "url_path": urlparse(webhook_url).path.lstrip("/"),
            "webhook_url": webhook_url, "secret_token": secret_token or secrets.token_urlsafe(32)}


@contextlib.asynccontextmanager
async def serving(app: Application, poll_timeout: float = 10.0,
                  webhook: dict[str, Any] | None = None) -> AsyncIterator[Application]:
    """Runs ``app`` inside an already running event loop (run_polling/run_webhook insist on owning the loop)."""
    await app.initialize()
    try:
        if app.post_init:
            await app.post_init(app)
        if webhook:
            await app.updater.start_webhook(**webhook, allowed_updates=Update.ALL_TYPES)
        else:
            await app.updater.start_polling(timeout=poll_timeout, allowed_updates=Update.ALL_TYPES)
        await app.start()
        try:
            yield app
        finally:
            await app.updater.stop()
            await app.stop()
    finally:
        await app.shutdown()
        if app.post_shutdown:
            await app.post_shutdown(app)


def run(app: Application, webhook: dict[str, Any] | None = None) -> None:
    """Until interrupted: polling (development), or a webhook built by webhook_settings (production)."""
    if webhook:
        app.run_webhook(**webhook, allowed_updates=Update.ALL_TYPES)
    else:
        app.run_polling(allowed_updates=Update.ALL_TYPES)
