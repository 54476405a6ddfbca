"""Image parts of chat requests: `data:image/...;base64,` URLs, or local files inside one allowed directory.

Nothing is fetched from the network: an http(s) URL is refused with a message that says what to send instead. A local
path (`file://` URL or a plain path) is read only when the server was started with --allow-local-files DIR, and only
when its real path (symlinks resolved) lies inside DIR. Encoded size and pixel count are limited before decoding the
pixels (PIL reads the header first), so a small request cannot make the server decode a huge image.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import ServeError

DEFAULT_MAX_IMAGE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ImagePolicy:
    allow_local_files: Path | None = None  # resolved directory, or None: no local files
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def make(cls, allow_local_files=None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
             max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> "ImagePolicy":
        root = None
        if allow_local_files is not None:
            root = Path(allow_local_files).resolve()
            if not root.is_dir():
                raise ServeError(f"--allow-local-files {allow_local_files} is not a directory", status=500)
        return cls(root, max_bytes, max_pixels)


def _bad(message: str, code: str = "invalid_image") -> ServeError:
    return ServeError(message, param="messages", code=code)


def _decode(data: bytes, policy: ImagePolicy, where: str):
    from PIL import Image, UnidentifiedImageError

    from ..data import to_rgb

    if len(data) > policy.max_bytes:
        raise _bad(f"{where} is {len(data)} bytes; the limit is {policy.max_bytes} bytes", "image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > policy.max_pixels:
                raise _bad(f"{where} is {w}x{h} pixels; the limit is {policy.max_pixels} pixels", "image_too_large")
            im.load()
            return to_rgb(im)
    except ServeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad(f"{where} does not decode as an image ({type(exc).__name__})") from None


def load_image(url: str, policy: ImagePolicy, where: str = "image"):
    """A PIL RGB image from an image_url of a chat request (ServeError with a 4xx status otherwise)."""
    if not isinstance(url, str) or not url.strip():
        raise _bad(f"{where}: image_url.url is missing or empty; send a data:image/...;base64,... URL",
                   "missing_image")
    url = url.strip()
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head or not head[5:].startswith("image/"):
            raise _bad(f"{where}: a data URL must look like data:image/png;base64,<base64 bytes>")
        if len(payload) > policy.max_bytes * 4 // 3 + 4:
            raise _bad(f"{where} is larger than the limit of {policy.max_bytes} bytes", "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the data URL's payload is not valid base64") from None
        return _decode(data, policy, where)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise _bad(f"{where}: the server fetches no URLs (no network); send the image as a data:image/...;base64 URL",
                   "unsupported_image_url")
    if parsed.scheme not in ("", "file"):
        raise _bad(f"{where}: unsupported image URL scheme {parsed.scheme!r}; send a data:image/...;base64 URL",
                   "unsupported_image_url")
    if policy.allow_local_files is None:
        raise _bad(f"{where}: local image files are not allowed on this server (start it with --allow-local-files "
                   "DIR); send a data:image/...;base64 URL", "local_files_not_allowed")
    raw = unquote(parsed.path) if parsed.scheme == "file" else url
    path = Path(raw)
    if not path.is_absolute():
        path = policy.allow_local_files / path
    real = Path(os.path.realpath(path))
    root = policy.allow_local_files
    if real != root and root not in real.parents:
        raise _bad(f"{where}: {raw} is outside the allowed directory {root}", "local_file_outside_allowed_dir")
    if not real.is_file():
        raise _bad(f"{where}: {raw} is not a file in {root}", "missing_image")
    if real.stat().st_size > policy.max_bytes:
        raise _bad(f"{where}: {raw} is {real.stat().st_size} bytes; the limit is {policy.max_bytes} bytes",
                   "image_too_large")
    return _decode(real.read_bytes(), policy, where)
