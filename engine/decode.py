"""Image decoding with OpenCV that gives the same RGB array as `PIL.Image.open(p).convert("RGB")`.

- No EXIF rotation (the official code never rotates; OpenCV's IMREAD_UNCHANGED does not either).
- Alpha is dropped, not composited; grey and palette images are expanded to RGB.
- CMYK / YCCK JPEGs are decoded by Pillow itself (see _decode_with_pillow).
- 16-bit images: each sample v becomes round(v / 257), the linear rescale of 0..65535 onto
  0..255. Pillow (so the official code) differs here: 16-bit RGB keeps the high byte (v >> 8,
  at most one level from ours), 16-bit grey is clipped at 255 (most such images turn white).
- Refused with an ImageError and a one-line reason: missing, not a regular file (a FIFO, a
  device), larger than a file limit, empty, not an image, corrupt or truncated, smaller than the
  network accepts, larger than a pixel limit. The size is read from the header of every accepted
  format (image_headers.py) before any pixel is decoded (decompression bombs), and a file's
  bytes are read only once its first ones are an image's.
"""

import errno
import io
import os
import stat
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np

from trufor_trt.architecture import MIN_SIDE
from trufor_trt.engine.image_headers import SNIFF_BYTES, header_size, jpeg_layout, sniff_format
from trufor_trt.errors import ImageError
from trufor_trt.held_setting import HeldSetting

DEFAULT_MAX_PIXELS = 150_000_000
# The largest image file read (--max-file): an uncompressed 16-bit TIFF at the default pixel
# limit is 0.9 GB.
DEFAULT_MAX_FILE = 1024 ** 3
SIXTEEN_BIT_STEP = 257  # 65535 / 255

def _jpeg_is_complete(data: bytes) -> bool:
    """A whole JPEG has an end-of-image marker after its first scan (0xFF is byte-stuffed
    inside scans, so the marker cannot occur there by chance)."""
    layout = jpeg_layout(data)
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


_SPECIAL_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_found(path: Path) -> str:
    return "broken or looping symbolic link" if path.is_symlink() else "no such file"


def open_regular(path, max_bytes: int = DEFAULT_MAX_FILE):
    """`path` opened for reading once it is known to be a regular file of at most `max_bytes`
    (ImageError with the reason otherwise). Opened without blocking, so that a FIFO or a device
    is refused, not waited on or read forever."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(path, _not_found(path)) from None
    except OSError as exc:
        looping = exc.errno == errno.ELOOP
        raise ImageError(path, "broken or looping symbolic link" if looping
                         else f"cannot be opened ({exc.strerror or exc})") from None
    status = os.fstat(descriptor)
    special = next((what for test, what in _SPECIAL_FILES if test(status.st_mode)), None)
    if special is not None or not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise ImageError(path, f"not a regular file ({special or 'a special file'})")
    if status.st_size > max_bytes:
        os.close(descriptor)
        raise ImageError(path, f"file is {status.st_size:,} bytes, more than the limit of {max_bytes:,} "
                               "(raise it with --max-file)")
    return os.fdopen(descriptor, "rb")


def read_image_file(path, max_bytes: int = DEFAULT_MAX_FILE) -> bytes:
    """The file's bytes, read only once it is a regular file within `max_bytes` whose first
    bytes are an accepted image format's signature (a large file that is not an image costs its
    first bytes, not its size)."""
    with open_regular(path, max_bytes) as file:
        head = file.read(SNIFF_BYTES)
        if head and sniff_format(head) is None:
            raise ImageError(path, "not an image (unknown file signature)")
        data = head + file.read(max_bytes + 1 - len(head))  # bounded, should the file grow meanwhile
    if len(data) > max_bytes:
        raise ImageError(path, f"file grew past the limit of {max_bytes:,} bytes while it was read (--max-file)")
    return data


def decode_image(path, max_pixels: int = DEFAULT_MAX_PIXELS, admit=None, max_bytes: int = DEFAULT_MAX_FILE) -> np.ndarray:
    """H x W x 3 uint8 RGB, as the official code feeds the network. `admit(height, width)`,
    when given, may refuse the size (returning why) before any pixel is decoded."""
    return decode_bytes(read_image_file(path, max_bytes), Path(path), max_pixels, admit)


def decode_bytes(data: bytes, label, max_pixels: int = DEFAULT_MAX_PIXELS, admit=None) -> np.ndarray:
    """decode_image for an image already in memory (an upload); `label` names it in errors."""
    if not data:
        raise ImageError(label, "empty file")
    kind = sniff_format(data)
    if kind is None:
        raise ImageError(label, "not an image (unknown file signature)")
    size = header_size(data, kind)
    if size is None:  # never left to a codec to find out
        raise ImageError(label, f"truncated or corrupt {kind} (its header does not say its size)")
    _check_size(label, *size, max_pixels)
    _admit(label, *size, admit)
    if kind == "JPEG" and not _jpeg_is_complete(data):
        raise ImageError(label, "truncated or corrupt JPEG (no end-of-image marker)")
    if kind == "JPEG" and jpeg_layout(data)[3] == 4:
        return _decode_with_pillow(label, data)
    with quiet_decoders():
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageError(label, f"truncated or corrupt {kind} (the decoder could not read it)")
    _check_size(label, pixels.shape[0], pixels.shape[1], max_pixels)
    _admit(label, pixels.shape[0], pixels.shape[1], admit)
    return _to_rgb8(label, pixels)
