"""An image's format and size from its header, before any pixel is decoded.

Every format the decoder accepts is here, and only these: a file whose header does not say its
size is refused, never handed to a codec to find out (a 34-byte WebP or a small TIFF can claim
billions of pixels, and the codecs allocate them before failing). Sizes are read as the
decoders read them: the first frame of a GIF (with the logical screen), the first page of a
TIFF, a WebP's canvas.
"""

import struct

SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WebP",
}
SNIFF_BYTES = 16  # enough for every signature above (and WebP's "WEBP" at 8..12)


def sniff_format(data: bytes):
    kind = next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)
    if kind == "WebP" and data[8:12] != b"WEBP":
        return None  # another RIFF file (WAV, AVI)
    return kind


def _png_size(data: bytes):
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_layout(data: bytes):
    """(height, width, offset of the first scan) from the JPEG marker segments, or None."""
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
            size = struct.unpack(">HH", data[offset + 5:offset + 9])
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return (*size, offset) if size else None
        offset += 2 + length
    return None


def _jpeg_size(data: bytes):
    layout = jpeg_layout(data)
    return layout[:2] if layout else None


def _bmp_size(data: bytes):
    if len(data) < 26:
        return None
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(height), abs(width)  # a negative height is a top-down bitmap


def _gif_blocks_end(data: bytes, offset: int):
    """The offset after a run of GIF data sub-blocks starting at `offset`, or None."""
    while offset < len(data):
        size = data[offset]
        offset += 1 + size
        if size == 0:
            return offset
    return None


def _gif_size(data: bytes):
    """The larger of the logical screen and the first frame's extent (a frame may reach past it)."""
    if len(data) < 13:
        return None
    width, height, flags = *struct.unpack("<HH", data[6:10]), data[10]
    offset = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # the global colour table
    while offset < len(data):
        if data[offset] == 0x21 and offset + 2 < len(data):  # extension: label, then sub-blocks
            offset = _gif_blocks_end(data, offset + 2)
            if offset is None:
                return None
        elif data[offset] == 0x2C and offset + 9 <= len(data):  # the first image descriptor
            left, top, frame_width, frame_height = struct.unpack("<HHHH", data[offset + 1:offset + 9])
            return max(height, top + frame_height), max(width, left + frame_width)
        elif data[offset] == 0x3B:  # the trailer: no frame at all
            return height, width
        else:
            return None
    return None


def _webp_size(data: bytes):
    chunk, body = data[12:16], data[20:]
    if chunk == b"VP8X" and len(body) >= 10:  # extended: the canvas, 24 bits a side minus one
        return int.from_bytes(body[7:10], "little") + 1, int.from_bytes(body[4:7], "little") + 1
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", body[6:10])
        return height & 0x3FFF, width & 0x3FFF
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:  # lossless: 14 bits a side minus one
        bits = int.from_bytes(body[1:5], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    return None


_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
_TIFF_SHORT, _TIFF_LONG = 3, 4


def _tiff_size(data: bytes):
    """ImageWidth and ImageLength of the first directory (the page decoders read)."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    offset = struct.unpack(order + "I", data[4:8])[0]
    if offset + 2 > len(data):
        return None
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    sides = {}
    for entry in range(count):
        start = offset + 2 + 12 * entry
        if start + 12 > len(data):
            return None
        tag, kind = struct.unpack(order + "HH", data[start:start + 4])
        if tag in (_TIFF_WIDTH, _TIFF_LENGTH) and kind in (_TIFF_SHORT, _TIFF_LONG):
            sides[tag] = struct.unpack_from(order + ("H" if kind == _TIFF_SHORT else "I"), data, start + 8)[0]
    if len(sides) != 2:
        return None
    return sides[_TIFF_LENGTH], sides[_TIFF_WIDTH]


_SIZE_READERS = {"PNG": _png_size, "JPEG": _jpeg_size, "BMP": _bmp_size, "GIF": _gif_size, "WebP": _webp_size,
                 "TIFF": _tiff_size}


def header_size(data: bytes, kind: str):
    """(height, width) as the header of a `kind` image states it, or None where it cannot be read."""
    return _SIZE_READERS[kind](data)
