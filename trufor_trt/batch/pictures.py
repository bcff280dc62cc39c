"""The pictures of a unit: the two heatmaps, the overlay and the thumbnail, as file bytes.

Made at the speed of memory, so that they never limit a GPU's throughput (docs/benchmarks.md, "Host
side"): the heatmaps are palette PNGs (one byte per pixel, the JET colours in the palette,
so the colour map is a lookup the viewer does), filtered with PNG's "Up" filter and deflated
at zlib level 1: at 1 MP, 10 ms and 380 KB against OpenCV's RGB PNG at 24 ms and 885 KB;
levels 3 and 6 saved 8% and 15% of the size for 2x and 8x the time. The overlay blends in
float32 in one OpenCV call and is encoded by OpenCV with its defaults (as small as PNG's own
filters at level 1, and faster). zlib and OpenCV release the GIL: the pictures of several
images are made on several threads at once.
"""

import struct
import zlib

import cv2
import numpy as np

OVERLAY_OPACITY = 0.6  # opacity of the heatmap where the map is 1
THUMBNAIL_SIDE = 192  # px, the longer side of a thumbnail
JPEG_QUALITY = 85
HEATMAP_ZLIB_LEVEL = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2  # each byte minus the one above it: smooth maps become runs of zeros


def encoded(suffix: str, bgr: np.ndarray, *params: int) -> bytes:
    """An image as the bytes of a file with this suffix (".png", ".jpg"), OpenCV's parameters."""
    ok, data = cv2.imencode(suffix, bgr, list(params))
    if not ok:
        raise RuntimeError(f"{suffix} encoding failed")
    return data.tobytes()


def heatmap_levels(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as 0..255, rounded to nearest (below 0 and NaN -> 0, above 1 -> 255)."""
    return cv2.convertScaleAbs(np.fmax(values, 0), alpha=255.0)


def _jet_palette() -> np.ndarray:
    """OpenCV's JET colour for each level, 256 x 3 BGR."""
    return cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, :]


JET_BGR = _jet_palette()


def heatmap_bgr(values: np.ndarray) -> np.ndarray:
    """A map of values in [0, 1] in the JET colour scale: 0 blue (pristine, or unreliable for
    the confidence map) .. 1 red (forged, or reliable)."""
    return JET_BGR[heatmap_levels(values)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def palette_png(levels: np.ndarray, palette_bgr: np.ndarray) -> bytes:
    """An 8-bit palette PNG of H x W levels; palette_bgr: 256 x 3 colours, BGR like OpenCV's."""
    height, width = levels.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = PNG_FILTER_UP
    rows[0, 1:] = levels[0]
    np.subtract(levels[1:], levels[:-1], out=rows[1:, 1:])  # modulo 256, as PNG defines it
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # depth 8, palette colour
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"PLTE", np.ascontiguousarray(palette_bgr[:, ::-1]).tobytes()),
                     _chunk(b"IDAT", zlib.compress(rows, HEATMAP_ZLIB_LEVEL)), _chunk(b"IEND", b"")])


def heatmap_png(values: np.ndarray) -> bytes:
    return palette_png(heatmap_levels(values), JET_BGR)


def overlay_png(rgb: np.ndarray, localization_map: np.ndarray) -> bytes:
    """The image with the heatmap laid over it, more opaque where forgery is more likely."""
    opacity = np.clip(localization_map, 0.0, 1.0).astype(np.float32, copy=False) * np.float32(OVERLAY_OPACITY)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    blended = cv2.blendLinear(heatmap_bgr(localization_map), bgr, opacity, np.float32(1.0) - opacity)
    return encoded(".png", blended)


def thumbnail_bgr(bgr: np.ndarray) -> np.ndarray:
    """At most THUMBNAIL_SIDE px a side, area-averaged."""
    height, width = bgr.shape[:2]
    scale = min(1.0, THUMBNAIL_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else bgr


def thumbnail_jpeg(bgr: np.ndarray) -> bytes:
    return encoded(".jpg", thumbnail_bgr(bgr), cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY)


def pictures(rgb: np.ndarray, localization_map: np.ndarray, confidence_map: np.ndarray) -> dict:
    """kind -> file bytes of the unit's pictures (outputs.PICTURES)."""
    return {"heatmap": heatmap_png(localization_map),
            "conf": heatmap_png(confidence_map),
            "overlay": overlay_png(rgb, localization_map),
            "thumbnail": thumbnail_jpeg(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))}
