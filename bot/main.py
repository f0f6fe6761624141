"""`facechange bot`: settings from the command line and the environment, then run until stopped."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from bot.config import TELEGRAM_API, BotConfig, ConfigError, configure_logging, parse_allowed_users, read_token

log = logging.getLogger("bot")


def config_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> BotConfig:
    config = BotConfig(token=read_token(environ),
                       api_base_url=environ.get("TELEGRAM_API_BASE_URL") or TELEGRAM_API,
                       allowed_users=parse_allowed_users(environ.get("FACECHANGE_ALLOWED_USERS")),
                       session_ttl=args.session_minutes * 60.0, photos_per_minute=args.photos_per_minute,
                       default_mode=args.mode)
    return replace(config, state_path=Path(args.state)) if args.state else config


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ConfigError as exc:
        raise SystemExit(f"facechange bot: {exc}") from exc
    configure_logging(config.token)
    # Heavy imports after the settings are known good: a typo in the token fails in a second, not ten.
    from bot.app import build_application, run, webhook_settings
    from pipeline.anonymizer import Anonymizer, AnonymizerConfig

    log.info("loading models")
    anonymizer = Anonymizer(AnonymizerConfig(device=args.device, threads=args.threads))
    log.info("serving %s via %s; sessions in %s", "webhook" if args.webhook_url else "polling",
             config.api_base_url, config.state_path)
    webhook = webhook_settings(args.webhook_url, args.listen, args.port,
                               os.environ.get("TELEGRAM_WEBHOOK_SECRET")) if args.webhook_url else None
    run(build_application(config, anonymizer), webhook)
    return 0
