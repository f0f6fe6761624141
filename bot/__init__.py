"""Telegram front end (issue 7)."""
