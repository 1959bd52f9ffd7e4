"""Safe image loading for JSONL records.

An image reference (``ref``) in a record is either

* a path relative to the folder that holds the JSONL file (``base_dir``), or
* a ``data:image/<type>;base64,<payload>`` URI.

Loading refuses, with a one-line :class:`ImageError`, anything that would be unsafe
or silently wrong: paths that escape the data folder (``..``, absolute paths,
symlinks pointing outside), missing files, corrupt or truncated files, malformed
base64 and decompression bombs. The pixel limit is checked from the header *before*
the pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "load_image", "decode_image_bytes", "resolve_image_path", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 50_000_000

# data:image/png;base64,....  (parameters such as ;charset=... are tolerated)
_DATA_URI = re.compile(r"^data:(image/[\w.+-]+)((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)


class ImageError(ValueError):
    """An image reference that cannot be used. ``str()`` is one line:
    ``image 'x.png': file not found``."""

    def __init__(self, ref: str, reason: str):
        super().__init__(ref, reason)  # args kept so the error pickles across workers
        self.ref = ref
        self.reason = _one_line(reason)

    def __str__(self) -> str:
        return f"image {short_ref(self.ref)!r}: {self.reason}"


def short_ref(ref: str, limit: int = 60) -> str:
    """A reference shortened for messages (data URIs can be megabytes long)."""
    ref = _one_line(str(ref))
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def resolve_image_path(ref: str, base_dir: str | Path) -> Path | None:
    """Resolve ``ref`` to a file inside ``base_dir`` without decoding it.

    Returns the resolved path, or None for a data URI (its syntax is checked, its
    payload is not decoded). Raises ImageError when the reference is empty, a URL,
    escapes the data folder (after resolving symlinks), or the file is missing.
    """
    return resolve_media_path(ref, base_dir, ImageError, _DATA_URI, "image")


def resolve_media_path(ref: str, base_dir: str | Path, error: type[ValueError], data_uri: re.Pattern, what: str) -> Path | None:
    """The path checks shared by images and audio clips (see :func:`resolve_image_path`): `error(ref, reason)`
    is raised, `data_uri` is the accepted ``data:<what>/...;base64,`` syntax."""
    if not isinstance(ref, str) or not ref.strip():
        raise error(str(ref), f"empty {what} reference")
    if ref[:5].lower() == "data:":
        if not data_uri.match(ref):
            raise error(ref, f"malformed data URI (expected data:{what}/<type>;base64,<payload>)")
        return None
    if re.match(r"^[a-z][a-z0-9+.-]*://", ref, re.IGNORECASE):
        raise error(ref, f"URLs are not supported; download the {what} files and use paths relative to the data folder")
    try:
        base = Path(base_dir).resolve()
        path = (base / ref).resolve()  # an absolute ref replaces base here, then is checked below
    except (OSError, ValueError, RuntimeError) as e:  # embedded NUL, symlink loop, ...
        raise error(ref, f"invalid path ({e})") from None
    if not path.is_relative_to(base):
        raise error(ref, f"escapes the data folder {str(base)!r}")
    if not path.exists():
        raise error(ref, "file not found")
    if not path.is_file():
        raise error(ref, "not a regular file")
    return path


def data_uri_bytes(ref: str, pattern: re.Pattern, error: type[Exception]) -> bytes:
    """The bytes of a base64 data URI `ref` that `pattern` matched (images and audio clips alike); a bad or empty
    payload raises `error(ref, reason)`."""
    payload = ref[pattern.match(ref).end() :]
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise error(ref, f"bad base64 in data URI ({e})") from None
    if not data:
        raise error(ref, "empty data URI")
    return data


def load_image(ref: str, base_dir: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``ref`` (relative path or data URI) as a fully decoded RGB image.

    Raises ImageError (one line) for every failure; never returns a half-decoded image.
    """
    path = resolve_image_path(ref, base_dir)
    if path is None:
        return _decode(io.BytesIO(data_uri_bytes(ref, _DATA_URI, ImageError)), ref, max_pixels)
    try:
        with path.open("rb") as f:
            return _decode(f, ref, max_pixels)
    except OSError as e:  # permission denied, I/O error
        raise ImageError(ref, f"cannot read file ({e.strerror or e})") from None


def decode_image_bytes(data: bytes, ref: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes from elsewhere (a download) with the same checks as ``load_image``; ``ref`` names them in
    the error."""
    return _decode(io.BytesIO(data), ref, max_pixels)


def _decode(fp, ref: str, max_pixels: int) -> Image.Image:
    """Open from a file object, check the size from the header, then decode fully."""
    with warnings.catch_warnings():
        # PIL warns (and above 2x its limit, raises) for huge images; treat both as errors.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(ref, f"too large: {width}x{height} pixels > max {max_pixels}")
                img.load()  # full decode: truncated / corrupt data fails here, not later
                return img.convert("RGB")
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(ref, f"too large: {e}") from None
        except UnidentifiedImageError:
            raise ImageError(ref, "corrupt or not an image (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
            # PIL reports bad data with a zoo of exception types.
            raise ImageError(ref, f"corrupt or truncated ({type(e).__name__}: {e})") from None
