"""Image decoding exactly as the official code feeds the network: `PIL.Image.open(p).convert("RGB")`.

Pillow decodes every accepted format, so every file gives the official pixels: no EXIF rotation,
alpha dropped (not composited), grey and palette images expanded (a GIF's transparent index
keeps its palette colour, a first frame smaller than the screen is placed on it as Pillow
places it), 16-bit samples as Pillow converts them (RGB keeps each sample's high byte; grey
is clipped at 255).
- Refused with an ImageError and a one-line reason: missing, not a regular file (a FIFO, a
  device), larger than a file limit, empty, not an image, corrupt or truncated, smaller than the
  network accepts, larger than a pixel limit. The size is checked twice before any pixel is
  decoded: from the header of every accepted format (image_headers.py: a bomb never reaches a
  codec, some of which allocate the whole canvas when they open a file), and from the size
  Pillow itself parsed, the size it then decodes (a file whose headers disagree cannot slip one
  past the other). A file's bytes are read once, bounded, only once its first ones are an image's.
- Bounded in time as well (decode_allowance): the codec reads the file through a reader that
  stops it once the image's allowance has passed, a few KB at a time, so a file whose cost is
  not in its pixels (a progressive JPEG of thousands of scans, a PNG of many compressed text
  chunks) costs at most that; a JPEG with absurdly many scans is refused before decoding.
"""

import errno
import io
import os
import stat
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from trufor_trt.architecture import MIN_SIDE
from trufor_trt.engine.image_headers import SNIFF_BYTES, header_size, jpeg_layout, sniff_format
from trufor_trt.errors import ImageError, IncompleteImage, one_line
from trufor_trt.held_setting import HeldSetting

DEFAULT_MAX_PIXELS = 150_000_000
# The largest image file read (--max-file): an uncompressed 16-bit TIFF at the default pixel
# limit is 0.9 GB.
DEFAULT_MAX_FILE = 1024 ** 3
# Pillow's name of each format image_headers.sniff_format names: the file is opened as that
# format alone (Pillow would otherwise try its other plugins on it).
PILLOW_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF", "WebP": "WEBP"}
# Seconds a decode may take (--decode-seconds): this much for any image, and as much again per
# 10 megapixels (a plain decode here takes 0.03 s per megapixel; a Jetson's cores a few times that).
DEFAULT_DECODE_SECONDS = 1.0
# Scans a progressive JPEG may have: encoders write 6 to about 20; each costs a pass over every
# block of the image, so tens of thousands are a decoding bomb, refused before any is decoded.
MAX_JPEG_SCANS = 500
# How much of the file the codec is handed at a time (Pillow's default is 64 KB): between two
# reads the allowance is checked, and 64 KB of a progressive JPEG's scans can cost seconds.
READ_SLICE = 4096
# Pillow's own bomb check stops at twice Image.MAX_IMAGE_PIXELS; --max-pixels, checked on the
# size Pillow parsed, is the limit here, so Pillow's warning below it says nothing new.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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
    """Descriptor 2 on /dev/null; returns what it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    return saved


def _restore_decoders(saved) -> None:
    os.dup2(saved, 2)
    os.close(saved)


# A corrupt file is reported once, by us: the codec libraries' own warnings (libtiff's, for
# one), which they write straight to file descriptor 2,
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


def _admit(path, height: int, width: int, admit) -> None:
    reason = admit(height, width) if admit is not None else None
    if reason:
        raise ImageError(path, reason)


def decode_allowance(height: int, width: int, decode_seconds: float) -> float:
    """The seconds an image of this size may take to decode."""
    return decode_seconds * (1 + height * width / 10e6)


class DecodeTimeout(Exception):
    pass


class _ReaderWithDeadline(io.BytesIO):
    """The file's bytes as the codec reads them, until the deadline: then every read raises."""

    def __init__(self, data: bytes, deadline: float):
        super().__init__(data)
        self._deadline = deadline

    def read(self, size=-1):
        if time.monotonic() > self._deadline:
            raise DecodeTimeout
        return super().read(size)


def _pillow_image(label, data: bytes, kind: str, max_pixels: int, admit, seconds: float) -> np.ndarray:
    """The pixels of `data` as Pillow gives them (convert("RGB")), once the size Pillow parsed
    from the file, which is the size it decodes, is within the limits; DecodeTimeout once
    `seconds` have passed."""
    reader = _ReaderWithDeadline(data, time.monotonic() + seconds)
    try:
        with quiet_decoders(), Image.open(reader, formats=[PILLOW_FORMATS[kind]]) as image:
            image.decodermaxblock = READ_SLICE
            width, height = image.size
            _check_size(label, height, width, max_pixels)
            _admit(label, height, width, admit)
            return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    except Image.UnidentifiedImageError:  # a variant of the format Pillow has no mode for
        raise ImageError(label, f"unsupported {kind} (the decoder has no mode for this kind of {kind} "
                                "file; the official code cannot read it either)") from None
    except Image.DecompressionBombError:
        raise ImageError(label, f"image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, more than the "
                                "decoder takes") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError) as exc:  # Pillow's kinds
        raise IncompleteImage(label, f"truncated or corrupt {kind} (the decoder could not read it: "
                                     f"{one_line(exc)})") from None


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


def decode_image(path, max_pixels: int = DEFAULT_MAX_PIXELS, admit=None, max_bytes: int = DEFAULT_MAX_FILE,
                 decode_seconds: float = DEFAULT_DECODE_SECONDS) -> np.ndarray:
    """H x W x 3 uint8 RGB, as the official code feeds the network. `admit(height, width)`,
    when given, may refuse the size (returning why) before any pixel is decoded;
    `decode_seconds`: see decode_allowance."""
    return decode_bytes(read_image_file(path, max_bytes), Path(path), max_pixels, admit, decode_seconds)


def _check_scans(label, data: bytes) -> None:
    scans = data.count(b"\xff\xda")  # a marker's bytes: inside a scan 0xFF is always followed by 0x00
    if scans > MAX_JPEG_SCANS:
        raise ImageError(label, f"JPEG of {scans:,} scans, more than the {MAX_JPEG_SCANS} any encoder writes "
                                "(each costs a pass over the whole image: a decoding bomb)")


def decode_bytes(data: bytes, label, max_pixels: int = DEFAULT_MAX_PIXELS, admit=None,
                 decode_seconds: float = DEFAULT_DECODE_SECONDS) -> np.ndarray:
    """decode_image for an image already in memory (an upload); `label` names it in errors."""
    if not data:
        raise IncompleteImage(label, "empty file")
    kind = sniff_format(data)
    if kind is None:
        raise ImageError(label, "not an image (unknown file signature)")
    size = header_size(data, kind)
    if size is None:  # never left to a codec to find out
        raise IncompleteImage(label, f"truncated or corrupt {kind} (its header does not say its size)")
    _check_size(label, *size, max_pixels)
    _admit(label, *size, admit)
    if kind == "JPEG":
        if not _jpeg_is_complete(data):
            raise IncompleteImage(label, "truncated or corrupt JPEG (no end-of-image marker)")
        _check_scans(label, data)
    seconds = decode_allowance(*size, decode_seconds)
    try:
        return _pillow_image(label, data, kind, max_pixels, admit, seconds)
    except DecodeTimeout:
        raise ImageError(label, f"decoding took over {seconds:.3g} s, this image's allowance (--decode-seconds "
                                f"{decode_seconds:g}: a file that costs more than its pixels, a decoding "
                                "bomb)") from None
