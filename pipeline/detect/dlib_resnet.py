"""dlib's face recognition ResNet, read from its official ``.dat`` file (CC0).

Two uses. Its 128-d face descriptors carry gender and age far better than features a small CNN
learns from UTKFace alone, so the detector's attribute heads can consult it for the faces they are
unsure of (``attributes.CascadeAttributeHead``, ``--identity-branch``; off by default, see
README). And it is a second, independent identity model for the anonymization benchmark:
re-identification measured with one identity model says as much about that model as about the
anonymization; dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (Davis King, CC0, shipped by
the ``face_recognition_models`` package) was trained on other data with another loss, so a figure
that holds under both is about the faces. The file is dlib's own serialization (no pickle): layer
records from the input up, each a type string, its parameter tensor (raw little-endian float32)
and its hyper-parameters as dlib's variable-length integers. It is read here field by field and
checked against the architecture of dlib's face recognition example: a 7x7 stem, 14 residual
blocks (32, 64, 128, 256 channels; 4 of them down-sampling, shortcut average-pooled and
zero-padded), global average pooling and a 128-d linear layer. Input: a 150 x 150 RGB chip,
minus dlib's mean colour, over 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.weights import load_verified

CHIP = 150
CHIP_PADDING = 0.25  # dlib's get_face_chip_details padding in its face recognition example
# Our 5 landmarks (eye centres, nose tip, mouth corners) in dlib's normalized mean face (the
# averages of its 68-point mean shape: points 36-41, 42-47, 30, 48, 54), before padding.
_MEAN_FACE_POINTS = np.array([[0.225492, 0.215990], [0.754761, 0.215990], [0.490127, 0.515625],
                              [0.254149, 0.780233], [0.726104, 0.780233]])
DLIB_CHIP_TEMPLATE = ((_MEAN_FACE_POINTS + CHIP_PADDING) / (1 + 2 * CHIP_PADDING) * CHIP).astype(np.float32)


class DlibFormatError(ValueError):
    pass


class _Reader:
    """dlib's serialization primitives over the file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self._next_at: dict[str, int] = {}  # where each string sought next occurs (-1: nowhere more)

    def integer(self) -> int:
        # One control byte (low nibble: how many bytes follow, 0x80: negative), then little-endian bytes.
        control = self.data[self.pos]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if control & 0x80 else value

    def real(self) -> float:  # dlib's float_details: a mantissa and a power of two
        mantissa = self.integer()
        return mantissa * 2.0 ** self.integer()

    def string(self) -> str:
        size = self.integer()
        text = self.data[self.pos:self.pos + size].decode("latin-1")
        self.pos += size
        return text

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"tensor format version {version}, expected 2")
        shape = [self.integer() for _ in range(4)]
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, "<f4", count, self.pos).copy()
        self.pos += 4 * count
        return values.reshape(shape)

    def next_string(self, texts) -> str | None:
        """Reads the nearest of these strings ahead, skipping what lies before it; None when none is.

        Each string's next place is remembered and only searched again once the reader has passed
        it, so reading every layer scans the file once per layer type, not once per layer."""
        for text in texts:
            at = self._next_at.get(text)
            if at is None or 0 <= at < self.pos:  # never sought, or already passed
                self._next_at[text] = self.data.find(bytes([0x01, len(text)]) + text.encode("latin-1"), self.pos)
        found = [(self._next_at[text], text) for text in texts if self._next_at[text] >= 0]
        if not found:
            return None
        self.pos = min(found)[0]
        return self.string()


@dataclass
class _Layer:
    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc"
    weights: np.ndarray | None = None
    hyper: tuple[int, ...] = ()


_LAYER_NAMES = {"con_4": "con", "affine_": "affine", "relu_": "relu", "max_pool_2": "max_pool",
                "avg_pool_2": "avg_pool", "add_prev_": "add_prev", "fc_2": "fc"}


def read_layers(path: Path) -> tuple[tuple[float, float, float], list[_Layer]]:
    """(mean RGB, the layers from the input up) of a dlib face recognition ResNet file."""
    reader = _Reader(Path(path).read_bytes())
    if reader.next_string(("input_rgb_image_sized",)) is None:
        raise DlibFormatError(f"{path}: no input_rgb_image_sized layer; not a dlib face recognition model")
    mean = (reader.real(), reader.real(), reader.real())
    if (reader.integer(), reader.integer()) != (CHIP, CHIP):
        raise DlibFormatError(f"{path}: input is not {CHIP} x {CHIP}")
    layers = []
    # Each layer record starts with its type string; what lies between is bookkeeping we do not need.
    while (name := reader.next_string(_LAYER_NAMES)) is not None:
        layer = _Layer(_LAYER_NAMES[name])
        if layer.kind == "con":
            layer.weights = reader.tensor()
            layer.hyper = tuple(reader.integer() for _ in range(7))  # filters, rows, cols, strides y x, pads y x
        elif layer.kind == "affine":
            layer.weights = reader.tensor()
        elif layer.kind in ("max_pool", "avg_pool"):
            layer.hyper = tuple(reader.integer() for _ in range(6))  # rows, cols, strides y x, pads y x
        elif layer.kind == "fc":
            layer.hyper = (reader.integer(), reader.integer())  # outputs, inputs
            layer.weights = reader.tensor()
        layers.append(layer)
    return mean, layers


# The layer kinds of dlib's face recognition example network, input first: stem, residual blocks
# (a down-sampling block also average-pools its shortcut), pooling and the embedding layer.
_STEM = ["con", "affine", "relu", "max_pool"]
_BLOCK = ["con", "affine", "relu", "con", "affine", "add_prev", "relu"]
_DOWN_BLOCK = ["con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu"]
_BLOCKS = [False] * 3 + ([True] + [False] * 3) + ([True] + [False] * 2) + ([True] + [False] * 2) + [True]
_BLOCK_CHANNELS = [32] * 3 + [64] * 4 + [128] * 3 + [256] * 4
_HEAD = ["avg_pool", "fc"]


def _check_architecture(layers: list[_Layer]) -> None:
    expected = _STEM + [k for down in _BLOCKS for k in (_DOWN_BLOCK if down else _BLOCK)] + _HEAD
    if [layer.kind for layer in layers] != expected:
        raise DlibFormatError("the layers are not those of dlib's face recognition ResNet "
                              f"({len(layers)} layers read, {len(expected)} expected)")


def _conv(layer: _Layer, channels: int) -> nn.Conv2d:
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = layer.hyper
    weights = layer.weights.reshape(-1)
    split = filters * channels * rows * cols
    if weights.size != split + filters:
        raise DlibFormatError(f"a {rows}x{cols} convolution of {channels} -> {filters} channels holds "
                              f"{weights.size} values")
    conv = nn.Conv2d(channels, filters, (rows, cols), (stride_y, stride_x), (pad_y, pad_x))
    conv.weight.data = torch.from_numpy(weights[:split].reshape(filters, channels, rows, cols))
    conv.bias.data = torch.from_numpy(weights[split:])
    return conv


class _Affine(nn.Module):
    """dlib's affine layer: batch norm folded into a per-channel scale and shift."""

    def __init__(self, layer: _Layer) -> None:
        super().__init__()
        gamma, beta = np.split(layer.weights.reshape(-1), 2)
        self.register_buffer("scale", torch.from_numpy(gamma).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.from_numpy(beta).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _pool_arguments(layer: _Layer) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    rows, cols, stride_y, stride_x, pad_y, pad_x = layer.hyper
    return (rows, cols), (stride_y, stride_x), (pad_y, pad_x)


class _Residual(nn.Module):
    def __init__(self, layers: list[_Layer], channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(layers[0], channels)
        self.affine1 = _Affine(layers[1])
        self.conv2 = _conv(layers[3], self.conv1.out_channels)
        self.affine2 = _Affine(layers[4])
        self.shortcut_pool = _pool_arguments(layers[5]) if layers[5].kind == "avg_pool" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, *self.shortcut_pool) if self.shortcut_pool else x
        return F.relu(_add_zero_padded(y, shortcut))


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: tensors of different channels or sizes add as if the smaller were zero-padded
    (at the end): a down-sampling block's 3x3 output meets its 4x4 pooled shortcut at 8 px input."""
    size = [max(p, q) for p, q in zip(a.shape[1:], b.shape[1:])]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, size[2] - t.shape[3], 0, size[1] - t.shape[2], 0, size[0] - t.shape[1]))

    return pad(a) + pad(b)


class DlibResNet(nn.Module):
    """The network the file describes; forward takes (N, 3, 150, 150) RGB 0..255, gives (N, 128)."""

    def __init__(self, mean: tuple[float, float, float], layers: list[_Layer]) -> None:
        super().__init__()
        _check_architecture(layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem_conv, self.stem_affine = _conv(layers[0], 3), _Affine(layers[1])
        self.stem_pool = _pool_arguments(layers[3])
        blocks, at, channels = [], len(_STEM), self.stem_conv.out_channels
        for down in _BLOCKS:
            size = len(_DOWN_BLOCK if down else _BLOCK)
            blocks.append(_Residual(layers[at:at + size], channels))
            channels, at = blocks[-1].conv2.out_channels, at + size
        self.blocks = nn.Sequential(*blocks)
        outputs, inputs = layers[-1].hyper
        # dlib keeps the layer as an inputs x outputs matrix: embedding = pooled features @ matrix
        self.register_buffer("embedding", torch.from_numpy(layers[-1].weights.reshape(inputs, outputs)))
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: Path) -> DlibResNet:
        """The network from dlib's official ``.dat`` or from our fp16 copy of it (``save_network``)."""
        if Path(path).suffix == ".pt":
            return load_network(path, None)
        return cls(*read_layers(path))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_affine(self.stem_conv((chips - self.mean) / 256.0)))
        x = self.blocks(F.max_pool2d(x, *self.stem_pool))
        return x.mean((2, 3)) @ self.embedding


def align_chip(image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The 150 x 150 chip dlib's model expects, placed by our 5 landmarks on dlib's mean face."""
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), DLIB_CHIP_TEMPLATE, method=cv2.LMEDS)
    return cv2.warpAffine(image_rgb, matrix, (CHIP, CHIP), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class DlibEmbedder:
    """Same interface as identity.IdentityEmbedder: L2-normalized embeddings, compared by cosine."""

    def __init__(self, dat_path: Path) -> None:
        self.network = DlibResNet.from_file(dat_path)

    def embed(self, image_rgb: np.ndarray, landmarks: list[np.ndarray]) -> np.ndarray:
        if not landmarks:
            return np.zeros((0, 128), np.float32)
        chips = np.stack([align_chip(image_rgb, lm) for lm in landmarks])
        with torch.inference_mode():
            embeddings = self.network(torch.from_numpy(chips).permute(0, 3, 1, 2).float()).numpy()
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-8)


NETWORK_FORMAT = "facechange-dlib-resnet-v1"


def save_network(network: DlibResNet, path: Path, provenance: dict) -> None:
    """fp16 tensors (11 MB instead of the .dat's 22 MB), loadable with ``weights_only``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in network.state_dict().items()}
    torch.save({"format": NETWORK_FORMAT, "state_dict": state, "provenance": provenance}, path)


def load_network(path: Path, sha256: str | None) -> DlibResNet:
    blob = load_verified(path, sha256, (NETWORK_FORMAT,))
    network = DlibResNet((0.0, 0.0, 0.0), _skeleton_layers())
    network.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return network


def _skeleton_layers() -> list[_Layer]:
    """The architecture's layers with zero weights, for loading a saved state into."""
    def con(cin: int, filters: int, size: int, stride: int) -> _Layer:
        pad = size // 2 if stride == 1 else 0  # dlib pads only unstrided convolutions
        return _Layer("con", np.zeros(filters * cin * size * size + filters, np.float32),
                      (filters, size, size, stride, stride, pad, pad))

    def affine(channels: int) -> _Layer:
        return _Layer("affine", np.zeros(2 * channels, np.float32))

    layers = [con(3, 32, 7, 2), affine(32), _Layer("relu"), _Layer("max_pool", hyper=(3, 3, 2, 2, 0, 0))]
    channels = 32
    for block, down in enumerate(_BLOCKS):
        filters = _BLOCK_CHANNELS[block]
        layers += [con(channels, filters, 3, 2 if down else 1), affine(filters), _Layer("relu"),
                   con(filters, filters, 3, 1), affine(filters)]
        layers += [_Layer("avg_pool", hyper=(2, 2, 2, 2, 0, 0))] if down else []
        layers += [_Layer("add_prev"), _Layer("relu")]
        channels = filters
    return layers + [_Layer("avg_pool", hyper=(0, 0, 1, 1, 0, 0)),
                     _Layer("fc", np.zeros(channels * 128, np.float32), (128, channels))]
