"""Safe image loading: every bad input is a one-line ImageError, never a traceback."""

import base64
import io
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmdistill.data.images import ImageError, load_image, resolve_image_path


def png_bytes(size=(32, 24), mode="RGB", seed=0) -> bytes:
    """A noisy PNG (noise so that the compressed data is long enough to truncate)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def folder(tmp_path):
    """tmp_path/data holds the JSONL's images; tmp_path/outside.png lies outside it."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "ok.png").write_bytes(png_bytes())
    (tmp_path / "outside.png").write_bytes(png_bytes())
    return data


def raises_image_error(ref, base_dir, match, **kw) -> ImageError:
    with pytest.raises(ImageError, match=match) as info:
        load_image(ref, base_dir, **kw)
    assert "\n" not in str(info.value)
    return info.value


def test_loads_relative_path_as_rgb(folder):
    img = load_image("img/ok.png", folder)
    assert img.mode == "RGB" and img.size == (32, 24)
    assert resolve_image_path("img/ok.png", folder) == (folder / "img" / "ok.png").resolve()


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_other_modes_become_rgb(folder, mode):
    (folder / "m.png").write_bytes(png_bytes(mode=mode))
    assert load_image("m.png", folder).mode == "RGB"


def test_data_uri(folder):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert resolve_image_path(uri, folder) is None
    assert load_image(uri, folder).size == (32, 24)


def test_bad_base64(folder):
    raises_image_error("data:image/png;base64,@@not-base64@@", folder, "bad base64")


def test_malformed_data_uri(folder):
    raises_image_error("data:text/plain,hello", folder, "malformed data URI")


def test_missing_file(folder):
    err = raises_image_error("img/nope.png", folder, "file not found")
    assert str(err) == "image 'img/nope.png': file not found"


def test_dotdot_escape(folder):
    raises_image_error("../outside.png", folder, "escapes the data folder")
    raises_image_error("img/../../outside.png", folder, "escapes the data folder")


def test_dotdot_inside_is_fine(folder):
    assert load_image("img/../img/ok.png", folder).size == (32, 24)


def test_absolute_path_outside(folder):
    raises_image_error(str(folder.parent / "outside.png"), folder, "escapes the data folder")


def test_symlink_escape(folder):
    os.symlink(folder.parent / "outside.png", folder / "link.png")
    raises_image_error("link.png", folder, "escapes the data folder")
    os.symlink(folder.parent, folder / "up")
    raises_image_error("up/outside.png", folder, "escapes the data folder")


def test_symlink_inside_is_fine(folder):
    os.symlink(folder / "img" / "ok.png", folder / "alias.png")
    assert load_image("alias.png", folder).size == (32, 24)


def test_truncated_png(folder):
    data = png_bytes(size=(64, 64))
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    raises_image_error("cut.png", folder, "corrupt or truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_corrupt_bytes(folder):
    (folder / "junk.png").write_bytes(os.urandom(200))
    raises_image_error("junk.png", folder, "corrupt")


def test_corrupt_data_inside_valid_header(folder):
    data = bytearray(png_bytes(size=(64, 64)))
    data[100:400] = bytes(300)  # zero out part of the compressed pixel data
    (folder / "bad.png").write_bytes(bytes(data))
    raises_image_error("bad.png", folder, "corrupt")


def test_not_a_file(folder):
    raises_image_error("img", folder, "not a regular file")


def test_max_pixels(folder):
    err = raises_image_error("img/ok.png", folder, "too large", max_pixels=100)
    assert err.reason == "too large: 32x24 pixels > max 100"


def test_header_bomb_below_pil_limit(folder):
    # 8000 x 8000 = 64M pixels: under PIL's own limit, over ours; refused before decoding.
    (folder / "bomb.png").write_bytes(png_header_only(8000, 8000))
    err = raises_image_error("bomb.png", folder, "too large")
    assert err.reason == "too large: 8000x8000 pixels > max 50000000"


def test_header_bomb_above_pil_limit(folder):
    # 20000 x 20000 = 400M pixels: PIL itself refuses (DecompressionBombError).
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))
    raises_image_error("bomb.png", folder, "too large", max_pixels=10**12)


def test_url_refused(folder):
    raises_image_error("https://example.com/a.png", folder, "URLs are not supported")


def test_empty_ref(folder):
    raises_image_error("", folder, "empty image reference")


def test_error_pickles_and_shortens_long_refs():
    err = ImageError("data:image/png;base64," + "A" * 10_000, "bad base64\nsecond line")
    assert "\n" not in str(err) and len(str(err)) < 120
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
