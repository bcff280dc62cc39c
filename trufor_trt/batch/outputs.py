"""What `analyze` writes per image, always atomically (temporary name, then rename)."""

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..engine.postprocess import Analysis
from .provenance import PROVENANCE_KEY, provenance_array

OVERLAY_OPACITY = 0.6  # opacity of the heatmap where the map is 1
NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry


@dataclass(frozen=True)
class OutputPaths:
    npz: Path
    heatmap: Path  # the localization map
    confidence: Path  # the confidence map, on the same colour scale
    overlay: Path

    @classmethod
    def below(cls, out_dir: Path, relative: str) -> "OutputPaths":
        base = Path(out_dir) / relative
        return cls(npz=base.with_name(base.name + ".npz"),
                   heatmap=base.with_name(base.name + ".heatmap.png"),
                   confidence=base.with_name(base.name + ".conf.png"),
                   overlay=base.with_name(base.name + ".overlay.png"))

    def expected(self, with_png: bool) -> list:
        return [self.npz, self.heatmap, self.confidence, self.overlay] if with_png else [self.npz]


def npz_bytes(analysis: Analysis, save_noiseprint: bool, made_by: dict) -> bytes:
    """The official test script's keys: map, conf, score, imgsize (and np++ on request), and
    the provenance as one extra key."""
    arrays = {
        "map": analysis.localization_map,
        "conf": analysis.confidence_map,
        "score": np.float64(analysis.score),
        "imgsize": np.array(analysis.localization_map.shape, dtype=np.int64),
        PROVENANCE_KEY: provenance_array(made_by),
    }
    if save_noiseprint:
        arrays["np++"] = analysis.noiseprint
    return _npz(arrays)


def _npz(arrays: dict) -> bytes:
    """np.savez's layout with a fixed member date, so the same analysis gives the same bytes
    whichever way in wrote it, and whenever (np.savez stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_DATE), "w",
                              force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def encoded(suffix: str, bgr: np.ndarray, *params: int) -> bytes:
    """An image as the bytes of a file with this suffix (".png", ".jpg"), OpenCV's parameters."""
    ok, data = cv2.imencode(suffix, bgr, list(params))
    if not ok:
        raise RuntimeError(f"{suffix} encoding failed")
    return data.tobytes()


def _png(bgr: np.ndarray) -> bytes:
    return encoded(".png", bgr)


def heatmap_bgr(values: np.ndarray) -> np.ndarray:
    """A map of values in [0, 1] in the JET colour scale: 0 blue (pristine, or unreliable for
    the confidence map) .. 1 red (forged, or reliable)."""
    levels = np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET)


def heatmap_png(values: np.ndarray) -> bytes:
    return _png(heatmap_bgr(values))


def overlay_png(rgb: np.ndarray, localization_map: np.ndarray) -> bytes:
    """The image with the heatmap laid over it, more opaque where forgery is more likely."""
    opacity = (OVERLAY_OPACITY * np.clip(localization_map, 0.0, 1.0))[:, :, None]
    blended = rgb[:, :, ::-1] * (1.0 - opacity) + heatmap_bgr(localization_map) * opacity
    return _png(np.rint(blended).astype(np.uint8))
