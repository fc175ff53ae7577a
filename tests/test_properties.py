"""Property-based tests (hypothesis): random config keys and values, random YAML files, and random or corrupted image
bytes thrown at the config parser and at every image / mask decoder. Every failure must be the project's own error
(ConfigError, DataError) naming the key, file or row, never another exception and never a hang (each example has a
deadline; the decoders' inputs are kept small except for headers that declare huge images)."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from acr.config import Config, ConfigError, apply_overrides, load_config, parse_overrides, to_dict
from acr.data.file_codecs import load_label_map
from acr.data.shards import decode_image_bytes, decode_mask_bytes
from acr.data.voc import DataError, load_image, load_mask

# Derandomized (the same examples on every run, so CI is reproducible; ACR_HYPOTHESIS_EXPLORE=1 draws new ones), no
# example database written to the checkout.
FAST = settings(max_examples=300, deadline=timedelta(seconds=3), derandomize=os.environ.get("ACR_HYPOTHESIS_EXPLORE") is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out += _leaves(v, key) if isinstance(v, dict) else [key]
    return out


DEFAULTS = to_dict(Config())
LEAF_KEYS = _leaves(DEFAULTS)
SECTIONS = [k for k, v in DEFAULTS.items() if isinstance(v, dict)]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.integers(-2 ** 80, 2 ** 80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["resnet18", "voc", "fp64", "null", "1e-3", "scale", "adversarial"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)
segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0 ", max_size=10)
keys = st.one_of(st.sampled_from(LEAF_KEYS), st.sampled_from(SECTIONS),
                 st.lists(segment, min_size=1, max_size=4).map(".".join),
                 st.tuples(st.sampled_from(LEAF_KEYS), segment).map(lambda t: t[0] + t[1]))


def _names_the_key(message: str, key: str) -> bool:
    """The error names `key` (or, for an unknown key, the first part of it that does not exist)."""
    if key.strip(" .") and key in message:  # an empty key is in every message: it names nothing
        return True
    if "unknown config key" in message:
        node, path = DEFAULTS, ""
        for part in key.split("."):
            path = f"{path}.{part}" if path else part
            if not isinstance(node, dict) or part not in node:
                return f"'{path}'" in message
            node = node[part]
    return False


# --------------------------------------------------------------------------------------------------------------------
# (a) the config parser


@FAST
@given(key=keys, value=values)
@example(key="model.decoder_depth", value=10 ** 12)  # 2**depth must not be computed for any depth
@example(key="train.keep_checkpoints", value=0)
@example(key="optim.lr", value=10 ** 400)  # an int beyond the float range
@example(key="train..epochs", value=1)
def test_any_override_is_applied_or_refused_naming_its_key(key, value):
    try:
        cfg = apply_overrides(Config(), {key: value})
    except ConfigError as exc:
        assert _names_the_key(str(exc), key), (key, value, str(exc))
        return
    node = to_dict(cfg)  # applied: the key is one of the tree's, and its value is there
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, (key, value)
        node = node[part]


@FAST
@given(text=st.one_of(st.text(max_size=40), st.tuples(keys, st.text(max_size=20)).map("=".join)))
@example(text="train.epochs=[[[[")
@example(text="=3")
@example(text="train.epochs=!!python/object/apply:os.system ['true']")
def test_any_command_line_item_is_parsed_or_refused(text):
    try:
        pairs = parse_overrides([text])
    except ConfigError as exc:
        assert text.split("=", 1)[0].strip() in str(exc) or repr(text) in str(exc), (text, str(exc))
        return
    assert len(pairs) == 1 and isinstance(pairs[0][0], str)
    try:
        load_config(None, [text])
    except ConfigError as exc:
        assert _names_the_key(str(exc), pairs[0][0]), (text, str(exc))


def _trees():
    leaf = st.tuples(st.sampled_from(LEAF_KEYS), values)
    return st.lists(leaf | st.tuples(keys, values), max_size=4)


@FAST
@given(items=_trees(), raw=st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=60)))
@example(items=[], raw=b"\xff\xfe\x00train: 1")  # not UTF-8
@example(items=[], raw="base: [1]")
@example(items=[], raw="- 1\n- 2")
def test_any_yaml_file_loads_or_is_refused_naming_file_or_key(items, raw):
    tree: dict = {}
    for key, value in items:
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        if raw is None:
            path.write_text(yaml.safe_dump(tree))
        else:
            path.write_bytes(raw.encode() if isinstance(raw, str) else raw)
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            msg = str(exc)
            assert str(path) in msg or any(_names_the_key(msg, k) for k in _leaves(tree) + list(tree)), msg
            return
    assert isinstance(cfg, Config)


# --------------------------------------------------------------------------------------------------------------------
# (b) image and mask decoders


def _encoded(mode: str, fmt: str, size=(6, 5)) -> bytes:
    rng = np.random.default_rng(0)
    if mode in ("RGB", "RGBA", "CMYK"):
        im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8), mode)
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 60000, (size[1], size[0]), dtype=np.uint16))  # mode I;16
    else:
        im = Image.fromarray(rng.integers(0, 4, (size[1], size[0]), dtype=np.uint8), "L").convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


CORPUS = [_encoded("RGB", "JPEG"), _encoded("RGB", "PNG"), _encoded("P", "PNG"), _encoded("L", "PNG"),
          _encoded("I;16", "PNG"), _encoded("RGBA", "PNG"), _encoded("1", "PNG"), _encoded("P", "GIF"),
          _encoded("RGB", "BMP"), _encoded("RGB", "TIFF"), _encoded("RGB", "WEBP"), _encoded("CMYK", "JPEG")]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG (valid chunk CRCs) declaring any size and pixel format, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b)


encodings = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(CORPUS),
    st.tuples(st.sampled_from(CORPUS), st.integers(0, 400)).map(lambda t: t[0][:t[1]]),  # truncated
    st.tuples(st.sampled_from(CORPUS), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                                  min_size=1, max_size=6)).map(lambda t: _flip(*t)),  # corrupted
    st.builds(_png_header, st.integers(0, 3000), st.integers(0, 3000), st.sampled_from([1, 2, 4, 8, 16, 7]),
              st.sampled_from([0, 2, 3, 4, 6, 5])),  # a header alone, declaring any size
)
huge = _png_header(100_000, 100_000, 8, 2)  # 10^10 pixels: a decompression bomb
# PIL warns about corrupt TIFF tags and EXIF data of the corrupted inputs: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL", "ignore::PIL.Image.DecompressionBombWarning")
WHERE = "row id 'x7' of shard s3://b/train/part-00000.parquet"


@FAST
@given(data=encodings)
@example(data=b"")
@example(data=huge)
def test_image_bytes_decode_or_fail_naming_the_row(data):
    try:
        image = decode_image_bytes(data, WHERE)
    except DataError as exc:
        assert WHERE in str(exc)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0


@FAST
@given(data=encodings)
@example(data=b"")
@example(data=huge)
@example(data=CORPUS[1])  # an RGB PNG is not a mask
def test_mask_bytes_decode_or_fail_naming_the_row(data):
    try:
        mask = decode_mask_bytes(data, WHERE, 20)
    except DataError as exc:
        assert WHERE in str(exc)
        return
    assert mask.dtype == np.uint8 and mask.ndim == 2
    assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decoders")


@FAST
@given(data=encodings)
@example(data=b"")
@example(data=huge)
@example(data=CORPUS[1])
def test_image_mask_and_label_map_files_load_or_fail_naming_the_file(folder, data):
    path = folder / "2007_000032.png"
    path.write_bytes(data)
    for load in (load_image, lambda p: load_mask(p, 20), lambda p: load_label_map(p.read_bytes(), str(p), (5, 6), 20)):
        try:
            out = load(path)
        except DataError as exc:
            assert str(path) in str(exc)
            continue
        assert out.dtype == np.uint8 and out.size > 0
