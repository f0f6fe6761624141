"""Swap stage: put another identity onto detected faces."""
