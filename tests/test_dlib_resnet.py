"""dlib's face recognition ResNet read from its own file format: a second, independent identity model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.detect.dlib_resnet import DlibEmbedder, DlibFormatError, DlibResNet, read_layers


def _integer(value: int) -> bytes:
    body = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little") if value else b""
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def _string(text: str) -> bytes:
    return _integer(len(text)) + text.encode()


def _tensor(values: np.ndarray, shape: tuple[int, int, int, int]) -> bytes:
    return _integer(2) + b"".join(_integer(n) for n in shape) + values.astype("<f4").tobytes()


def write_dlib_resnet(path: Path, rng: np.random.Generator, drop_last_block: bool = False) -> dict:
    """A file in dlib's format with the face recognition network's layers and random weights;
    returns some of what was written, to compare with what is read back."""
    out = [_string("loss_metric_2"), _integer(7), _string("input_rgb_image_sized")]
    for mantissa, exponent in ((16093282, -17), (15335555, -17), (13670547, -17)):  # dlib's mean colour
        out += [_integer(mantissa), _integer(exponent)]
    out += [_integer(150), _integer(150)]
    bookkeeping = _integer(1) * 3  # what dlib stores between layers and a reader must skip
    written: dict = {"convs": []}

    def con(cin: int, filters: int, size: int, stride: int) -> None:
        weights = rng.normal(0, (2 / (cin * size * size)) ** 0.5, filters * cin * size * size + filters)
        written["convs"].append(weights.astype(np.float32))
        pad = 0 if stride == 2 else size // 2
        out.extend([_string("con_4"), _tensor(weights, (len(weights), 1, 1, 1)),
                    *(_integer(n) for n in (filters, size, size, stride, stride, pad, pad)), bookkeeping])

    def layer(name: str, *ints: int) -> None:
        out.extend([_string(name), *(_integer(n) for n in ints), bookkeeping])

    def affine(channels: int) -> None:
        values = np.concatenate([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.1, channels)])
        out.extend([_string("affine_"), _tensor(values, (2 * channels, 1, 1, 1)), bookkeeping])

    con(3, 32, 7, 2), affine(32), layer("relu_"), layer("max_pool_2", 3, 3, 2, 2, 0, 0)
    channels = 32
    plan = [(32, False)] * 3 + [(64, True)] + [(64, False)] * 3 + [(128, True)] + [(128, False)] * 2 + \
        [(256, True)] + [(256, False)] * 2 + [(256, True)]
    for filters, down in plan[:-1] if drop_last_block else plan:
        con(channels, filters, 3, 2 if down else 1), affine(filters), layer("relu_")
        con(filters, filters, 3, 1), affine(filters)
        if down:
            layer("avg_pool_2", 2, 2, 2, 2, 0, 0)
        layer("add_prev_"), layer("relu_")
        channels = filters
    layer("avg_pool_2", 0, 0, 1, 1, 0, 0)
    written["fc"] = rng.normal(0, 0.05, (256, 128)).astype(np.float32)
    out += [_string("fc_2"), _integer(128), _integer(256), _tensor(written["fc"], (256, 128, 1, 1))]
    path.write_bytes(b"".join(out))
    return written


def test_a_file_in_dlibs_format_is_read_back_exactly_and_runs(tmp_path):
    path = tmp_path / "model.dat"
    written = write_dlib_resnet(path, np.random.default_rng(0))
    mean, layers = read_layers(path)
    assert mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    network = DlibResNet(mean, layers)
    assert network.stem_conv.stride == (2, 2) and network.stem_conv.padding == (0, 0)
    first = written["convs"][0]
    assert np.array_equal(network.stem_conv.weight.detach().numpy().reshape(-1), first[:-32])
    down = network.blocks[3]  # the first 64-channel block: strided, unpadded, its shortcut pooled
    assert down.conv1.stride == (2, 2) and down.conv1.in_channels == 32 and down.shortcut_pool is not None
    assert np.array_equal(down.conv1.bias.detach().numpy(), written["convs"][7][-64:])
    assert np.array_equal(network.embedding.numpy(), written["fc"])
    chips = torch.rand(2, 3, 150, 150) * 255
    with torch.inference_mode():
        embeddings = network(chips)
        stem = torch.relu(network.stem_affine(network.stem_conv((chips - network.mean) / 256)))
        # 150 px leaves 8 px before the first 256-channel block, which strides it to 3 px while
        # its pooled shortcut is 4 px: only dlib's zero-padded add joins them
        eight = network.blocks[:10](torch.nn.functional.max_pool2d(stem, *network.stem_pool))
        joined = network.blocks[10](eight)
        strided = network.blocks[10].conv1(eight)
    assert embeddings.shape == (2, 128) and torch.isfinite(embeddings).all()
    assert eight.shape[-2:] == (8, 8) and strided.shape[-2:] == (3, 3)
    assert joined.shape[-2:] == (4, 4)


def test_a_file_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "model.dat"
    write_dlib_resnet(path, np.random.default_rng(1), drop_last_block=True)
    with pytest.raises(DlibFormatError, match="not those of dlib's face recognition ResNet"):
        DlibResNet.from_file(path)
    other = tmp_path / "other.dat"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(DlibFormatError, match="not a dlib face recognition model"):
        DlibResNet.from_file(other)


def _official_file() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dlib's model file comes with `pip install face_recognition_models` (100 MB), not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "dlib_face_recognition_resnet_model_v1.dat"


def test_the_official_model_tells_celeba_people_apart(anonymizer):
    from conftest import shared_path

    embedder = DlibEmbedder(_official_file())
    celeba = shared_path("data/celeba_identities")
    identities = json.loads((celeba / "identities.json").read_text())
    from pipeline.image_io import load_image

    people = sorted(set(identities.values()))[:8]
    chosen = [name for name in sorted(identities) if identities[name] in people]
    embeddings, labels = [], []
    for name in chosen:
        image = load_image(celeba / "images" / name)
        faces = anonymizer.detect(image)
        if faces:
            embeddings.append(embedder.embed(image, [max(faces, key=lambda f: f.score).landmarks])[0])
            labels.append(identities[name])
    embeddings, labels = np.stack(embeddings), np.array(labels)
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -1)
    nearest = labels[similarity.argmax(1)]
    assert len(labels) >= 80 and (nearest == labels).mean() >= 0.9  # each photo's nearest is the same person


def test_the_shipped_fp16_copy_gives_the_official_descriptors():
    from pipeline.detect.attributes import DLIB_WEIGHTS_FILE
    from pipeline.detect.dlib_resnet import load_network

    official = DlibResNet.from_file(_official_file())
    shipped = load_network(DLIB_WEIGHTS_FILE, None)
    chips = torch.rand(4, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        difference = (official(chips) - shipped(chips)).abs().max().item()
    assert difference < 2e-3  # descriptors have norm ~1.3; dlib's own match threshold is a distance of 0.6
