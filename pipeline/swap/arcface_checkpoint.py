"""SimSwap's ArcFace identity encoder, read from ``arcface_checkpoint.tar`` without running it.

That file is ``torch.save`` of a whole pickled ``ResNet`` module (the IR-ResNet of SimSwap's
``models/arcface_models.py``). Unpickling it the normal way imports and runs whatever classes
and callables the pickle names, so a swapped-in file could execute anything. Here the pickle
is read by an unpickler that knows only tensor storage, a few inert containers, and module
classes, which it turns into plain records; the tensors are then collected from those records
and loaded into our own copy of the network.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pipeline.weights import CheckpointError, load_matching_state

ARCFACE_INPUT_SIZE = 112
EMBEDDING_SIZE = 512

# The encoder's classes as SimSwap pickled them; under any module name they only ever become records.
_ARCFACE_CLASS_NAMES = frozenset({"ResNet", "IRBlock", "SEBlock"})
_MODULE_PREFIXES = ("torch.nn.modules.", "torch.nn.parallel.")

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


class UnsafeCheckpointError(CheckpointError):
    """A pickle that names something other than tensors, containers and module classes."""


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


class _ModuleRecord:
    """Stands in for a pickled ``nn.Module``: keeps its ``__dict__`` and does nothing else."""

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


_SAFE_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("torch", "device"): torch.device,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._records: dict[tuple[str, str], type[_ModuleRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if name in _ARCFACE_CLASS_NAMES or module.startswith(_MODULE_PREFIXES):
            key = (module, name)
            if key not in self._records:
                self._records[key] = type(name, (_ModuleRecord,), {})
            return self._records[key]
        raise UnsafeCheckpointError(f"the checkpoint's pickle refers to {module}.{name}, which is not allowed")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"unexpected persistent id in the checkpoint: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        raw = bytearray(self._archive.read(f"{self._prefix}/data/{key}"))
        if not raw:
            return torch.empty(0, dtype=storage_type.dtype)
        flat = torch.frombuffer(raw, dtype=storage_type.dtype)
        if flat.numel() != numel:
            raise CheckpointError(f"storage {key} holds {flat.numel()} elements, the pickle says {numel}")
        return flat


def read_pickled_module(path: str | Path) -> Any:
    """The object graph of a zip-format ``torch.save`` file, with module objects as inert records."""
    try:
        archive = zipfile.ZipFile(Path(path))
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: not a zip-format PyTorch file (saved by torch >= 1.6)") from exc
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0].removesuffix("/data.pkl")
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        try:
            return _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix).load()
        except CheckpointError:
            raise
        except Exception as exc:  # a malformed pickle raises anything from the unpickler
            raise CheckpointError(f"{path}: unreadable checkpoint pickle ({type(exc).__name__}: {exc})") from exc


def _find_record(obj: Any, class_name: str) -> _ModuleRecord | None:
    """Breadth-first, so a ``{'model': DataParallel(ResNet)}`` wrapper is seen through."""
    queue, seen = [obj], set()
    while queue:
        item = queue.pop(0)
        if id(item) in seen:  # a pickle can hold cycles
            continue
        seen.add(id(item))
        if isinstance(item, _ModuleRecord):
            if type(item).__name__ == class_name:
                return item
            queue.extend(item.state.get("_modules", {}).values())
        elif isinstance(item, dict):
            queue.extend(item.values())
        elif isinstance(item, (list, tuple)):
            queue.extend(item)
    return None


def module_state_dict(record: _ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """What ``state_dict()`` would have returned for the pickled module."""
    state = record.state
    skip = state.get("_non_persistent_buffers_set", set())
    tensors = {f"{prefix}{name}": value for name, value in state.get("_parameters", {}).items() if value is not None}
    tensors.update({f"{prefix}{name}": value for name, value in state.get("_buffers", {}).items()
                    if value is not None and name not in skip})
    for name, child in state.get("_modules", {}).items():
        if isinstance(child, _ModuleRecord):
            tensors.update(module_state_dict(child, f"{prefix}{name}."))
    return tensors


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class SEBlock(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.PReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(self.avg_pool(x).flatten(1))
        return x * weights[:, :, None, None]


class IRBlock(nn.Module):
    """Pre-activation residual block; one PReLU serves both activations, as in the original."""

    def __init__(self, inplanes: int, planes: int, stride: int, use_se: bool) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, inplanes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()
        self.conv2 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.se = SEBlock(planes) if use_se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + residual)


class ArcFaceResNet(nn.Module):
    """SimSwap's identity network: 112x112 ImageNet-normalised RGB in, 512-d embedding out."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), use_se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        widths = (64, 128, 256, 512)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip(widths, layers), start=1):
            stride = 1 if index == 1 else 2
            stage = [IRBlock(inplanes, planes, stride, use_se)]
            stage += [IRBlock(planes, planes, 1, use_se) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, EMBEDDING_SIZE)
        self.bn3 = nn.BatchNorm1d(EMBEDDING_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.bn3(self.fc(self.bn2(x).flatten(1)))


def load_arcface(path: str | Path) -> ArcFaceResNet:
    """Our ``ArcFaceResNet`` with the weights of SimSwap's ``arcface_checkpoint.tar``."""
    resnet = _find_record(read_pickled_module(path), "ResNet")
    if resnet is None:
        raise CheckpointError(f"{path}: no pickled ResNet module in the checkpoint")
    try:
        state = {key: value.clone() for key, value in module_state_dict(resnet).items()}
    except RecursionError as exc:
        raise CheckpointError(f"{path}: the pickled module tree contains itself") from exc
    layers = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    use_se = any(".se." in key for key in state)
    net = ArcFaceResNet(layers, use_se)  # type: ignore[arg-type]
    return load_matching_state(net, state, path, f"does not match the ArcFace IR-ResNet{layers}")
