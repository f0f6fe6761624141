"""Bot settings, the token, and keeping that token out of every log line."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_data_dir

TELEGRAM_API = "https://api.telegram.org"


class ConfigError(RuntimeError):
    """A setting the operator must fix; the message says which."""


@dataclass(frozen=True)
class BotConfig:
    token: str
    api_base_url: str = TELEGRAM_API  # Telegram's own, or a local Bot API server (or a test fake)
    state_path: Path = Path(user_data_dir("facechange")) / "bot-sessions.sqlite3"
    session_ttl: float = 15 * 60.0  # seconds without a tap before a selection and its image are deleted
    max_images: int = 64  # decoded photos held in memory for pending selections; older ones are re-downloaded
    photos_per_minute: int = 10
    queue_size: int = 100  # jobs waiting for the worker; beyond this users are asked to come back
    queue_notice_at: int = 2  # tell users their position when at least this many jobs are ahead
    allowed_users: frozenset[int] | None = None  # None: everyone
    default_mode: str = "synthetic"
    rate_limiter: bool = True  # PTB's AIORateLimiter: Telegram's flood limits on what we send
    sweep_interval: float = 60.0

    @property
    def base_url(self) -> str:
        return f"{self.api_base_url.rstrip('/')}/bot"

    @property
    def base_file_url(self) -> str:
        return f"{self.api_base_url.rstrip('/')}/file/bot"


def read_token(environ: Mapping[str, str] = os.environ) -> str:
    """TELEGRAM_BOT_TOKEN, or the contents of the file TELEGRAM_BOT_TOKEN_FILE names (a secrets mount)."""
    token = environ.get("TELEGRAM_BOT_TOKEN", "").strip()
    token_file = environ.get("TELEGRAM_BOT_TOKEN_FILE", "").strip()
    if token and token_file:
        raise ConfigError("set TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE, not both")
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read TELEGRAM_BOT_TOKEN_FILE {token_file}: {exc.strerror}") from exc
    if not token:
        raise ConfigError("no bot token: set TELEGRAM_BOT_TOKEN or TELEGRAM_BOT_TOKEN_FILE (see `facechange bot -h`)")
    return token


def parse_allowed_users(value: str | None) -> frozenset[int] | None:
    """FACECHANGE_ALLOWED_USERS: comma-separated numeric Telegram user ids; empty means everyone."""
    if not value or not value.strip():
        return None
    try:
        return frozenset(int(part) for part in value.replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise ConfigError(f"FACECHANGE_ALLOWED_USERS must be numeric user ids, got {value!r}") from exc


class RedactToken(logging.Filter):
    """Replaces the token wherever it appears in a record: message, arguments, traceback.

    Attached to handlers rather than loggers, because a logger's filters do not see records
    that propagate up from its children (httpx, telegram.ext, ...).
    """

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = message.replace(self.token, "<token>"), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self.token in record.exc_text:
            record.exc_text = record.exc_text.replace(self.token, "<token>")
        return True


def configure_logging(token: str, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request URL at INFO, and Bot API URLs contain the token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    redact = RedactToken(token)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
