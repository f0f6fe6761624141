"""Reading NVIDIA's StyleGAN2-ADA network pickles without running the code inside them.

An official ``network-snapshot-*.pkl`` / ``ffhq.pkl`` is a plain ``pickle.dump`` of a dict
{'G', 'D', 'G_ema', 'augment_pipe', ...}. Each network is a ``torch_utils.persistence``
object whose pickled form is ``_reconstruct_persistent_obj(meta)``, and ``meta['module_src']``
is Python source that NVIDIA's loader ``exec()``s: loading such a file the official way runs
whatever its author wrote. Here the unpickler resolves only an explicit allow-list of globals;
the persistence hook is replaced by ``PersistentRecord``, which keeps the object's state and
constructor arguments and never looks at ``module_src``; anything else raises
``UnsafePickleError``. Tensor storages arrive as ``torch.storage._load_from_bytes(bytes)``,
whose payload is a legacy ``torch.save`` stream, and is read with ``weights_only=True``.

``torch.save`` zip archives holding the same objects are read with the same restrictions.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.generate.stylegan2 import Generator

__all__ = [
    "NetworkPickleError",
    "PersistentRecord",
    "UnsafePickleError",
    "generator_from_record",
    "load_generator",
    "module_state_dict",
    "read_network_pickle",
]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list (a function or class it could run)."""


class NetworkPickleError(ValueError):
    """A safely readable file that does not hold a StyleGAN2-ADA generator we can build."""


@dataclass(frozen=True)
class PersistentRecord:
    """What ``persistence._reconstruct_persistent_obj`` would rebuild, kept as inert data.

    ``state`` is the object's ``__dict__`` as pickled; for an ``nn.Module`` it holds
    ``_parameters``, ``_buffers`` and ``_modules`` (child records) besides plain attributes.
    """

    type: str
    class_name: str
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    state: dict[str, Any]


class _EasyDict(dict):
    """Stands in for ``dnnlib.util.EasyDict``: a plain dict that, like the original, has a
    ``__dict__``, because pickles written by older Pythons may BUILD an (empty) state onto it."""


def _record_from_meta(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise NetworkPickleError("malformed persistent object in the pickle")
    state = meta["state"]
    init_args = state.get("_init_args", ())
    init_kwargs = state.get("_init_kwargs", {})
    return PersistentRecord(type=str(meta.get("type")), class_name=str(meta.get("class_name")),
                            init_args=tuple(init_args) if isinstance(init_args, (tuple, list)) else (),
                            init_kwargs=dict(init_kwargs) if isinstance(init_kwargs, dict) else {},
                            state=state)


def _storage_from_bytes(data: Any) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("tensor storage payload is not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notice
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"tensor storage payload refused: {exc}") from exc


def _latin1_bytes(text: Any, encoding: str) -> bytes:
    # Protocol 2 (torch.save's default) writes bytes as _codecs.encode(text, 'latin1').
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("only latin-1 byte strings may be rebuilt with _codecs.encode")
    return text.encode("latin1")


def _numpy_scalar(dtype: Any, data: Any) -> Any:
    # Module attributes such as weight_gain are numpy float64 scalars; an object dtype would
    # let the payload name arbitrary objects, so only plain numeric scalars are rebuilt.
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} refused")
    return np.frombuffer(data, dtype=dtype)[0]


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # Protocols 0-2 spell the builtins module the Python 2 way.
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _record_from_meta,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: not a tensor, container or StyleGAN record "
                "(the file may contain code; it was not run)") from None


# torch.load subclasses ``pickle_module.Unpickler``; its own find_class handles storage types
# and defers everything else to ours, so zip archives get the same allow-list.
_RESTRICTED_PICKLE_MODULE = SimpleNamespace(Unpickler=_RestrictedUnpickler, load=pickle.load,
                                            __name__="restricted_pickle")


def read_network_pickle(path: str | Path) -> dict[str, Any]:
    """The top-level dict of a network pickle, with persistent objects as ``PersistentRecord``."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation notice
            if zipfile.is_zipfile(path):
                data = torch.load(path, map_location="cpu", weights_only=False,
                                  pickle_module=_RESTRICTED_PICKLE_MODULE)
            else:
                with path.open("rb") as f:
                    data = _RestrictedUnpickler(f).load()
    except (UnsafePickleError, NetworkPickleError, OSError):
        raise
    except Exception as exc:  # truncated or not a pickle: many exception types are possible
        raise NetworkPickleError(f"{path}: not a readable network pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise NetworkPickleError(f"{path}: expected a dict of networks, found {type(data).__name__}")
    return data


def module_state_dict(record: PersistentRecord, prefix: str = "") -> dict[str, Tensor]:
    """Parameters and persistent buffers of a pickled module tree, under ``state_dict()`` names."""
    state = record.state
    skipped = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, Tensor] = {}
    tensors = list(state.get("_parameters", {}).items())
    tensors += [(name, t) for name, t in state.get("_buffers", {}).items() if name not in skipped]
    for name, tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise NetworkPickleError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
        out[prefix + name] = tensor.detach()
    for name, child in state.get("_modules", {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise NetworkPickleError(f"{prefix}{name} is not a StyleGAN module ({type(child).__name__})")
        out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


_GENERATOR_KWARGS = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs",
                     "synthesis_kwargs"}
_MAPPING_KWARGS = {"num_layers", "embed_features", "layer_features", "activation", "lr_multiplier",
                   "w_avg_beta"}
_SYNTHESIS_KWARGS = {"channel_base", "channel_max", "num_fp16_res", "conv_clamp", "architecture",
                     "resample_filter", "use_noise", "activation"}
# Memory layout of the float16 layers only: nothing to build.
_IGNORED_SYNTHESIS_KWARGS = {"fp16_channels_last"}


def _checked_kwargs(kwargs: Any, allowed: set[str], ignored: set[str], what: str) -> dict[str, Any]:
    if not isinstance(kwargs, dict):
        raise NetworkPickleError(f"{what}: expected a dict, found {type(kwargs).__name__}")
    unknown = set(kwargs) - allowed - ignored
    if unknown:
        raise NetworkPickleError(f"{what}: unsupported options {sorted(unknown)} (not a StyleGAN2-ADA generator?)")
    return {k: v for k, v in kwargs.items() if k in allowed}


def generator_from_record(record: PersistentRecord) -> Generator:
    """Build our ``Generator`` from a pickled one: its constructor arguments, then its tensors (strict)."""
    if record.type != "class" or record.class_name != "Generator":
        raise NetworkPickleError(f"expected a StyleGAN2-ADA Generator, found {record.class_name!r}")
    if record.init_args:
        raise NetworkPickleError("the generator was built with positional arguments; expected keywords only")
    kwargs = _checked_kwargs(record.init_kwargs, _GENERATOR_KWARGS, set(), "Generator")
    kwargs["mapping_kwargs"] = _checked_kwargs(kwargs.get("mapping_kwargs", {}), _MAPPING_KWARGS, set(),
                                               "mapping_kwargs")
    kwargs["synthesis_kwargs"] = _checked_kwargs(kwargs.get("synthesis_kwargs", {}), _SYNTHESIS_KWARGS,
                                                 _IGNORED_SYNTHESIS_KWARGS, "synthesis_kwargs")
    try:
        G = Generator(**kwargs)
        G.load_state_dict(module_state_dict(record), strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise NetworkPickleError(f"the pickled generator does not fit StyleGAN2-ADA's layout: {exc}") from exc
    return G.eval().requires_grad_(False)


def load_generator(path: str | Path, key: str = "G_ema", device: torch.device | str = "cpu") -> Generator:
    """The generator ``key`` ('G_ema', the averaged weights NVIDIA samples from, or 'G') of a pickle."""
    data = read_network_pickle(path)
    record = data.get(key)
    if not isinstance(record, PersistentRecord):
        raise NetworkPickleError(f"{path}: no {key!r} network in the pickle (keys: {sorted(map(str, data))})")
    return generator_from_record(record).to(device)
