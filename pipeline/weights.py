"""The weights manifest (weights/manifest.json): provenance and hashes of every model we use."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

class CheckpointError(ValueError):
    """A weights file that is not the model we expect; the message is meant for the user."""


MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifest.json"


@lru_cache(maxsize=1)
def manifest_models() -> tuple[dict, ...]:
    return tuple(json.loads(MANIFEST.read_text(encoding="utf-8"))["models"])


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_verified(path: Path, sha256: str | None, formats: tuple[str, ...]) -> dict:
    """A ``torch.save`` dict of ours, read without running code: refused when its hash differs from
    the given one (the manifest's) or its ``format`` is not one of ``formats``."""
    import torch

    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(f"{path}: sha256 differs from weights/manifest.json; retrain or update the manifest")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") not in formats:
        raise ValueError(f"{path}: not a {' or '.join(formats)} file")
    return blob


def known_model(sha256: str) -> dict | None:
    """The manifest entry of a file with this hash, if it is one we know."""
    return next((m for m in manifest_models() if m.get("sha256") == sha256), None)


def load_matching_state(net, state: dict, path, description: str):
    """Load a checkpoint's tensors into ``net``, refusing a file whose keys do not match exactly.

    The error names the first missing and unexpected keys, which is what a user needs to see
    when they pass the wrong file (another model, another variant, a training checkpoint).
    """
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: {description}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return net.eval()
