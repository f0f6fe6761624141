"""StyleGAN2-ADA generator: official-pickle loading (and its safety), the math, and the CLI.

No NVIDIA file or code is available here, so the tests write pickles the way official ones are
written: every network is a ``torch_utils.persistence`` object pickled as
``_reconstruct_persistent_obj(meta)`` with its source in ``meta['module_src']``, the constructor
arguments are ``dnnlib.util.EasyDict``s, gains are numpy float64 scalars, and tensors pickle
through torch's own ``__reduce_ex__``. A throw-away ``torch_utils`` / ``dnnlib`` package on
``sys.path`` makes those globals nameable while writing; its reconstruct function does what
NVIDIA's does with ``module_src`` (exec), which the control test uses to show the hostile file
really is hostile to a plain ``pickle.load``.
"""

from __future__ import annotations

import builtins
import importlib
import math
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.generate.official_pickle import (
    NetworkPickleError,
    UnsafePickleError,
    load_generator,
    module_state_dict,
    read_network_pickle,
)
from pipeline.generate.stylegan2 import (
    Generator,
    modulated_conv2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)

Z_DIM = W_DIM = 32
RESOLUTION = 32
MAPPING_KWARGS = {"num_layers": 2}
SYNTHESIS_KWARGS = {"channel_base": 512, "channel_max": 32, "num_fp16_res": 2, "conv_clamp": 256}
HARMLESS_SRC = "import torch\nclass Generator(torch.nn.Module):\n    pass\n"

_FAKE_MODULES = {
    "dnnlib/__init__.py": "from .util import EasyDict\n",
    "dnnlib/util.py": "class EasyDict(dict):\n    pass\n",
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": (
        "def _reconstruct_persistent_obj(meta):\n"
        "    exec(meta['module_src'], {})  # what NVIDIA's loader does with the embedded source\n"
        "    return meta\n"
    ),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The networks here are tiny: one thread avoids OpenMP spinning when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def official(tmp_path: Path) -> Any:
    """The stand-in ``dnnlib`` / ``torch_utils`` globals, importable only during the test."""
    root = tmp_path / "nvidia_stand_in"
    for rel, src in _FAKE_MODULES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(src)
    sys.path.insert(0, str(root))
    try:
        yield SimpleNamespace(
            reconstruct=importlib.import_module("torch_utils.persistence")._reconstruct_persistent_obj,
            EasyDict=importlib.import_module("dnnlib.util").EasyDict,
        )
    finally:
        sys.path.remove(str(root))
        for name in ("dnnlib", "dnnlib.util", "torch_utils", "torch_utils.persistence"):
            sys.modules.pop(name, None)


class _Persistent:
    """Pickles exactly as a ``persistence.persistent_class`` instance does."""

    def __init__(self, official: Any, class_name: str, state: dict[str, Any], module_src: str) -> None:
        self.official, self.class_name, self.state, self.module_src = official, class_name, state, module_src

    def __reduce__(self) -> tuple[Any, ...]:
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name,
                    state=self.state)
        return (self.official.reconstruct, (meta,))


def _as_official(module: torch.nn.Module, official: Any, init_kwargs: dict[str, Any] | None = None,
                 module_src: str = HARMLESS_SRC) -> _Persistent:
    state = dict(module.__dict__)
    state["_modules"] = OrderedDict((name, _as_official(child, official, module_src=module_src))
                                    for name, child in module._modules.items())
    state["_init_args"] = ()
    state["_init_kwargs"] = init_kwargs or {}
    for gain in ("weight_gain", "act_gain"):  # np.sqrt(...) in the original: numpy float64
        if gain in state:
            state[gain] = np.float64(state[gain])
    return _Persistent(official, type(module).__name__, state, module_src)


def _make_generator(c_dim: int, seed: int) -> Generator:
    torch.manual_seed(seed)
    G = Generator(Z_DIM, c_dim, W_DIM, RESOLUTION, 3, mapping_kwargs=MAPPING_KWARGS,
                  synthesis_kwargs=SYNTHESIS_KWARGS)
    with torch.no_grad():  # trained-looking values where init leaves zeros
        G.mapping.w_avg.normal_()
        for name, p in G.named_parameters():
            if name.endswith(("noise_strength", ".bias")):
                p.normal_(std=0.1)
    return G.eval()


def _write_pickle(path: Path, official: Any, G_ema: Generator, module_src: str = HARMLESS_SRC,
                  protocol: int = 3, zip_format: bool = False) -> None:
    init_kwargs = official.EasyDict(
        z_dim=G_ema.z_dim, c_dim=G_ema.c_dim, w_dim=G_ema.w_dim, img_resolution=G_ema.img_resolution,
        img_channels=G_ema.img_channels, mapping_kwargs=official.EasyDict(MAPPING_KWARGS),
        synthesis_kwargs=official.EasyDict(SYNTHESIS_KWARGS))
    other = _make_generator(G_ema.c_dim, seed=99)  # stands in for G: must not be the one loaded
    data = {
        "G": _as_official(other, official, init_kwargs, module_src),
        "D": _as_official(torch.nn.Linear(4, 1), official, official.EasyDict(), module_src),
        "G_ema": _as_official(G_ema, official, init_kwargs, module_src),
        "augment_pipe": None,
        "training_set_kwargs": official.EasyDict(resolution=RESOLUTION, use_labels=G_ema.c_dim > 0),
    }
    # An instance attribute makes pickle emit BUILD for the EasyDict, as Python 3.7 may.
    data["training_set_kwargs"].__dict__["note"] = "BUILD"
    if zip_format:
        torch.save(data, path, pickle_protocol=protocol)
    else:
        with path.open("wb") as f:
            pickle.dump(data, f, protocol=protocol)


def _images(G: Generator, z: np.ndarray, c: torch.Tensor | None, psi: float = 0.7) -> torch.Tensor:
    with torch.no_grad():
        return G(torch.from_numpy(z), c, truncation_psi=psi, noise_mode="const")


@pytest.mark.parametrize(("c_dim", "protocol", "zip_format"),
                         [(0, 3, False), (4, 3, False), (0, 4, False), (4, 2, True)])
def test_official_pickle_round_trip(tmp_path, official, c_dim, protocol, zip_format):
    G = _make_generator(c_dim, seed=1)
    path = tmp_path / "network-snapshot-000000.pkl"
    _write_pickle(path, official, G, protocol=protocol, zip_format=zip_format)

    loaded = load_generator(path)

    reference = G.state_dict()
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    z = np.random.RandomState(5).randn(2, Z_DIM)
    c = torch.eye(c_dim)[[1, 3]] if c_dim else None
    assert torch.equal(_images(loaded, z, c), _images(G, z, c))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_pickle_records_are_inert_data(tmp_path, official):
    path = tmp_path / "net.pkl"
    _write_pickle(path, official, _make_generator(0, seed=1))
    data = read_network_pickle(path)
    record = data["G_ema"]
    assert record.class_name == "Generator" and record.type == "class"
    assert record.init_kwargs["synthesis_kwargs"] == SYNTHESIS_KWARGS
    assert isinstance(record.init_kwargs["mapping_kwargs"], dict)
    assert data["training_set_kwargs"] == {"resolution": RESOLUTION, "use_labels": False}
    assert set(module_state_dict(data["D"])) == {"weight", "bias"}


class _Call:
    """Pickles as ``func(*args)``: what a hostile file uses to run code at load time."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


@pytest.mark.parametrize("make_payload", [
    lambda m: _Call(os.system, f"touch '{m}'"),
    lambda m: _Call(builtins.exec, _touch(m)),
    lambda m: _Call(builtins.eval, f"__import__('builtins').{_touch(m)}"),
    lambda m: _Call(subprocess.Popen, ["touch", str(m)]),
    lambda m: _Call(torch.storage._load_from_bytes, pickle.dumps(_Call(os.system, f"touch '{m}'"))),
], ids=["os.system", "exec", "eval", "subprocess", "storage-payload"])
def test_hostile_globals_are_refused(tmp_path, make_payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": make_payload(marker)}, protocol=3))
    with pytest.raises(UnsafePickleError):
        load_generator(path)
    assert not marker.exists()


def test_hostile_zip_archive_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"G_ema": _Call(os.system, f"touch '{marker}'")}, path)
    with pytest.raises(UnsafePickleError):
        load_generator(path)
    assert not marker.exists()


def test_embedded_module_source_never_runs(tmp_path, official):
    marker = tmp_path / "marker"
    path = tmp_path / "evil-src.pkl"
    G = _make_generator(0, seed=1)
    _write_pickle(path, official, G, module_src=_touch(marker))

    loaded = load_generator(path)
    assert not marker.exists()
    z = np.random.RandomState(0).randn(1, Z_DIM)
    assert torch.equal(_images(loaded, z, None), _images(G, z, None))

    with path.open("rb") as f:  # control: the naive, NVIDIA-style load does run it
        pickle.load(f)
    assert marker.exists()


def test_foreign_network_is_a_clear_error(tmp_path, official):
    path = tmp_path / "other.pkl"
    with path.open("wb") as f:
        pickle.dump({"G_ema": _as_official(torch.nn.Linear(2, 2), official)}, f)
    with pytest.raises(NetworkPickleError, match="Generator"):
        load_generator(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(NetworkPickleError):
        load_generator(path)


def _upfirdn_numpy(x: np.ndarray, f: np.ndarray, up: int, pad: tuple[int, int, int, int],
                   gain: float) -> np.ndarray:
    """The definition: zero-insert, pad, then a true 2-D convolution, written as loops."""
    h, w = x.shape
    upsampled = np.zeros((h * up, w * up))
    upsampled[::up, ::up] = x
    px0, px1, py0, py1 = pad
    padded = np.pad(upsampled, ((py0, py1), (px0, px1)))
    fh, fw = f.shape
    out = np.zeros((padded.shape[0] - fh + 1, padded.shape[1] - fw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            for a in range(fh):
                for b in range(fw):
                    out[i, j] += padded[i + a, j + b] * f[fh - 1 - a, fw - 1 - b]
    return out * gain


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 5, 3]])
def test_upfirdn2d_matches_direct_definition(taps):
    f = setup_filter(taps)
    assert f.shape == (4, 4) and math.isclose(float(f.sum()), 1.0, rel_tol=1e-6)
    x = np.random.RandomState(0).randn(5, 6)
    expected = _upfirdn_numpy(x, f.double().numpy(), up=2, pad=(2, 1, 2, 1), gain=4.0)
    actual = upsample2d(torch.from_numpy(x)[None, None], f.double())[0, 0].numpy()
    assert actual.shape == (10, 12)
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
    cropped = upfirdn2d(torch.from_numpy(x)[None, None], f.double(), padding=(1, -1, 0, 2))[0, 0].numpy()
    np.testing.assert_allclose(cropped, _upfirdn_numpy(x, f.double().numpy(), 1, (1, 0, 0, 2), 1.0)[:, :-1],
                               rtol=1e-12, atol=1e-12)


def _modconv_reference(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, noise: torch.Tensor,
                       up: int, f: torch.Tensor) -> torch.Tensor:
    """Per sample: modulate, demodulate, then conv2d; up=2 as zero-insert + FIR + convolution."""
    outputs = []
    for n in range(x.shape[0]):
        w = weight * styles[n][None, :, None, None]
        w = w / torch.sqrt((w ** 2).sum(dim=[1, 2, 3], keepdim=True) + 1e-8)
        xn = x[n:n + 1]
        if up == 1:
            out = F.conv2d(xn, w, padding=1)
        else:
            c, h, wd = xn.shape[1:]
            zeros = torch.zeros(1, c, h * 2, wd * 2, dtype=x.dtype)
            zeros[:, :, ::2, ::2] = xn
            padded = F.pad(zeros, [3, 2, 3, 2])
            filtered = F.conv2d(padded, (f * 4).flip([0, 1])[None, None].repeat(c, 1, 1, 1), groups=c)
            out = F.conv2d(filtered, w.flip([2, 3]))  # the up layers convolve (flip_weight=False)
        outputs.append(out)
    return torch.cat(outputs) + noise


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_modulated_conv_matches_reference(up, fused):
    gen = torch.Generator().manual_seed(up)
    x = torch.randn(3, 5, 6, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 5, 3, 3, generator=gen, dtype=torch.float64)
    styles = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 1, 6 * up, 6 * up, generator=gen, dtype=torch.float64)
    f = setup_filter([1, 3, 3, 1]).double()
    actual = modulated_conv2d(x, weight, styles, noise=noise, up=up, padding=1, resample_filter=f,
                              flip_weight=(up == 1), fused_modconv=fused)
    torch.testing.assert_close(actual, _modconv_reference(x, weight, styles, noise, up, f),
                               rtol=1e-10, atol=1e-10)


def test_mapping_truncation_and_noise_modes():
    G = _make_generator(0, seed=3)
    z = torch.randn(2, Z_DIM)
    ws = G.mapping(z, None)
    assert ws.shape == (2, G.num_ws, W_DIM) and torch.equal(ws[:, 0], ws[:, -1])
    torch.testing.assert_close(G.mapping(z, None, truncation_psi=0), G.mapping.w_avg.expand_as(ws))
    cut = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(cut[:, :3], G.mapping.w_avg + 0.5 * (ws[:, :3] - G.mapping.w_avg))
    assert torch.equal(cut[:, 3:], ws[:, 3:])
    with torch.no_grad():
        const = [G(z, None, noise_mode="const") for _ in range(2)]
        random = [G(z, None, noise_mode="random") for _ in range(2)]
        none = G(z, None, noise_mode="none")
    assert torch.equal(*const) and not torch.equal(*random) and not torch.equal(const[0], none)


def test_ffhq_1024_layout():
    """The official FFHQ 1024 config (channel_base 32768, channel_max 512): 18 ws and NVIDIA's shapes."""
    with torch.device("meta"):
        G = Generator(512, 0, 512, 1024, 3, mapping_kwargs={"num_layers": 8},
                      synthesis_kwargs={"channel_base": 32768, "channel_max": 512, "num_fp16_res": 4,
                                        "conv_clamp": 256})
    shapes = {name: tuple(t.shape) for name, t in G.state_dict().items()}
    assert G.num_ws == 18
    assert shapes["mapping.fc7.weight"] == (512, 512) and shapes["mapping.w_avg"] == (512,)
    assert shapes["synthesis.b4.const"] == (512, 4, 4)
    assert shapes["synthesis.b64.conv0.weight"] == (512, 512, 3, 3)
    assert shapes["synthesis.b128.conv0.weight"] == (256, 512, 3, 3)
    assert shapes["synthesis.b1024.conv1.weight"] == (32, 32, 3, 3)
    assert shapes["synthesis.b1024.conv1.noise_const"] == (1024, 1024)
    assert shapes["synthesis.b1024.torgb.weight"] == (3, 32, 1, 1)
    assert shapes["synthesis.b8.resample_filter"] == (4, 4)
    assert "synthesis.b4.conv0.weight" not in shapes
    assert [getattr(G.synthesis, f"b{r}").use_fp16 for r in (64, 128, 1024)] == [False, True, True]


@pytest.mark.parametrize("c_dim", [0, 4])
def test_cli_generate_matches_module(tmp_path, official, c_dim):
    G = _make_generator(c_dim, seed=2)
    weights = tmp_path / "net.pkl"
    _write_pickle(weights, official, G)
    out = tmp_path / "out.npy"
    class_args = ["--class-idx", "2"] if c_dim else []
    assert main(["generate", "--weights", str(weights), "--seed", "7", "-n", "3", "--truncation", "0.7",
                 "--noise-mode", "const", "--save-array", str(out), "--outdir", str(tmp_path / "png"),
                 "--device", "cpu", *class_args]) == 0

    images = np.load(out)
    c = torch.eye(c_dim)[[2, 2, 2]] if c_dim else None
    expected = _images(G, np.random.RandomState(7).randn(3, Z_DIM), c).numpy()
    assert images.dtype == np.float32 and images.shape == (3, 3, RESOLUTION, RESOLUTION)
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)
    assert len(list((tmp_path / "png").glob("*.png"))) == 3

    if c_dim:
        with pytest.raises(SystemExit, match="conditional"):
            main(["generate", "--weights", str(weights), "--save-array", str(out), "--device", "cpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_same_images_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would round at ~1e-3
    G = _make_generator(4, seed=4)
    expected = _images(G, np.random.RandomState(1).randn(2, Z_DIM), torch.eye(4)[[0, 3]])
    G_cuda = G.to("cuda")
    z = torch.from_numpy(np.random.RandomState(1).randn(2, Z_DIM)).cuda()
    with torch.no_grad():
        actual = G_cuda(z, torch.eye(4, device="cuda")[[0, 3]], truncation_psi=0.7, noise_mode="const")
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-4, atol=1e-4)
