"""Image decoding with OpenCV that gives the same RGB array as `PIL.Image.open(p).convert("RGB")`.

- No EXIF rotation (the official code never rotates; OpenCV's IMREAD_UNCHANGED does not either).
- Alpha is dropped, not composited; grey and palette images are expanded to RGB.
- CMYK / YCCK JPEGs are decoded by Pillow itself (see _decode_with_pillow).
- 16-bit images: each sample v becomes round(v / 257), the linear rescale of 0..65535 onto
  0..255. Pillow (so the official code) differs here: 16-bit RGB keeps the high byte (v >> 8,
  at most one level from ours), 16-bit grey is clipped at 255 (most such images turn white).
- Refused with an ImageError and a one-line reason: missing, empty, not an image, corrupt or
  truncated, smaller than the network accepts, larger than a pixel limit. The limit is checked
  from the PNG / JPEG header before any pixel is decoded (decompression bombs).
"""

import io
import os
import struct
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np

from trufor_trt.architecture import MIN_SIDE
from trufor_trt.errors import ImageError
from trufor_trt.held_setting import HeldSetting

DEFAULT_MAX_PIXELS = 150_000_000
SIXTEEN_BIT_STEP = 257  # 65535 / 255

SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WebP",
}


def sniff_format(data: bytes):
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


def _png_size(data: bytes):
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_layout(data: bytes):
    """(height, width, offset of the first scan, component count) from the JPEG marker
    segments, or None."""
    size, offset = None, 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        length = struct.unpack(">H", data[offset + 2:offset + 4])[0]
        if marker in _JPEG_FRAME_MARKERS and offset + 10 <= len(data):
            size = (*struct.unpack(">HH", data[offset + 5:offset + 9]), data[offset + 9])
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return (size[0], size[1], offset, size[2]) if size else None
        offset += 2 + length
    return None


def _header_size(data: bytes, kind):
    if kind == "PNG":
        return _png_size(data)
    if kind == "JPEG":
        layout = _jpeg_layout(data)
        return layout[:2] if layout else None
    return None


def _jpeg_is_complete(data: bytes) -> bool:
    """A whole JPEG has an end-of-image marker after its first scan (0xFF is byte-stuffed
    inside scans, so the marker cannot occur there by chance)."""
    layout = _jpeg_layout(data)
    return layout is not None and data.find(b"\xff\xd9", layout[2]) != -1


def separate_python_stderr() -> None:
    """Point Python's sys.stderr at a duplicate of file descriptor 2, so that silencing the
    codecs (which write to descriptor 2 itself: quiet_decoders) never swallows a message of
    this program's own, printed from another thread meanwhile. A command's process calls it
    once, before anything is decoded; where sys.stderr is not descriptor 2 already (a test's
    capture), nothing changes."""
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # not a file with a descriptor
        return
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding,
                           errors=sys.stderr.errors)


def _silence_decoders():
    """OpenCV's log off and descriptor 2 on /dev/null; returns what they were."""
    log_level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    return log_level, saved


def _restore_decoders(previous) -> None:
    log_level, saved = previous
    os.dup2(saved, 2)
    os.close(saved)
    cv2.utils.logging.setLogLevel(log_level)


# A corrupt file is reported once, by us: OpenCV's log and the codec libraries' own warnings
# (libjpeg's "Corrupt JPEG data", libpng's), which they write straight to file descriptor 2,
# are silenced while files are decoded (the process's descriptor 2: this program's own messages
# go through separate_python_stderr's duplicate of it). The pipeline's host workers decode at
# once: the first decode silences, the last restores.
quiet_decoders = HeldSetting(_silence_decoders, _restore_decoders).held


def _check_size(path, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageError(path, f"image is {width}x{height} = {height * width:,} pixels, more than "
                               f"the limit of {max_pixels:,} (raise it with --max-pixels)")
    if min(height, width) < MIN_SIDE:
        raise ImageError(path, f"image is {width}x{height}, smaller than the network's minimum "
                               f"of {MIN_SIDE} px a side")


def _to_rgb8(path, pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint16:
        pixels = np.rint(pixels / SIXTEEN_BIT_STEP).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ImageError(path, f"unsupported sample type {pixels.dtype} (8- and 16-bit only)")
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
    channels = pixels.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))
    if channels in (3, 4):
        return np.ascontiguousarray(pixels[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    raise ImageError(path, f"unsupported channel count {channels}")


def _admit(path, height: int, width: int, admit) -> None:
    reason = admit(height, width) if admit is not None else None
    if reason:
        raise ImageError(path, reason)


def _decode_with_pillow(path, data: bytes) -> np.ndarray:
    """A four-component JPEG (CMYK, YCCK, Adobe-inverted or not) through Pillow itself: OpenCV's
    CMYK conversion rounds differently (most samples +1, which moves the map by 2e-2)."""
    from PIL import Image

    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # --max-pixels, checked from the header, is the limit
            with Image.open(io.BytesIO(data)) as image:
                return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(path, f"truncated or corrupt JPEG (the decoder could not read it: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def decode_image(path, max_pixels: int = DEFAULT_MAX_PIXELS, admit=None) -> np.ndarray:
    """H x W x 3 uint8 RGB, as the official code feeds the network. `admit(height, width)`,
    when given, may refuse the size (returning why) before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "broken or looping symbolic link" if path.is_symlink()
                         else "no such file" if not path.exists() else "not a regular file")
    return decode_bytes(path.read_bytes(), path, max_pixels, admit)


def decode_bytes(data: bytes, label, max_pixels: int = DEFAULT_MAX_PIXELS, admit=None) -> np.ndarray:
    """decode_image for an image already in memory (an upload); `label` names it in errors."""
    if not data:
        raise ImageError(label, "empty file")
    kind = sniff_format(data)
    if kind is None:
        raise ImageError(label, "not an image (unknown file signature)")
    size = _header_size(data, kind)
    if size is not None:
        _check_size(label, *size, max_pixels)
        _admit(label, *size, admit)
    if kind == "JPEG" and not _jpeg_is_complete(data):
        raise ImageError(label, "truncated or corrupt JPEG (no end-of-image marker)")
    if kind == "JPEG" and _jpeg_layout(data)[3] == 4:
        return _decode_with_pillow(label, data)
    with quiet_decoders():
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageError(label, f"truncated or corrupt {kind} (the decoder could not read it)")
    _check_size(label, pixels.shape[0], pixels.shape[1], max_pixels)
    _admit(label, pixels.shape[0], pixels.shape[1], admit)
    return _to_rgb8(label, pixels)
