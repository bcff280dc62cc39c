"""A model folder: the exported graphs, the detection head and a manifest that describes them.

Reading and checking one needs neither torch nor onnx (a Jetson or CPU-only install loads it);
`trufor_trt.export.bundle` writes it. A folder is refused, with the reason, when its format
version is not ours, when it was exported from another checkpoint than the one asked for, when
a file it uses is not listed with its hash in the manifest, or when any listed file is missing
or differs from its hash: nothing is ever loaded from it unchecked.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trufor_trt.errors import TruforError
from trufor_trt.files import sha256_bytes, sha256_file
from trufor_trt.engine.postprocess import DetectionHead

FORMAT = "trufor-trt-model"
FORMAT_VERSION = 3  # 2: folded decoders, the CPU graph split for exact bands; 3: CPU decoders as matrix products
MANIFEST_FILE = "manifest.json"
DETECTION_HEAD_FILE = "detection_head.npz"


@dataclass(frozen=True)
class GraphVariant:
    name: str
    file: str
    attention: str  # the attention form it was exported with (see model/attention.py)
    precision: str
    purpose: str
    # "whole": image -> logits and Noiseprint++. The CPU graphs split it where exact row
    # bands bound the memory (bands.py): "noiseprint": image -> Noiseprint++; "features":
    # (image, Noiseprint++) -> the encoder's four maps (channels last); "decoder-maps": rows of
    # the coarse maps -> both decoders' maps of them, upsampled along the columns;
    # "decoder-band": a band of the 1/4 grid (c1 rows, the maps' rows, the row interpolation
    # matrices) -> the band's logits.
    part: str = "whole"


VARIANTS = (
    GraphVariant("fp32", "trufor_fp32.onnx", "tensorrt", "fp32",
                 "TensorRT-shaped graph every engine is built from"),
    GraphVariant("fp32-cpu-noiseprint", "trufor_fp32_cpu_noiseprint.onnx", "onnxruntime", "fp32",
                 "ONNX Runtime CPU: Noiseprint++, run in row bands", part="noiseprint"),
    GraphVariant("fp32-cpu", "trufor_fp32_cpu.onnx", "onnxruntime", "fp32",
                 "ONNX Runtime CPU: the two-stream encoder, attention as "
                 "com.microsoft.MultiHeadAttention", part="features"),
    GraphVariant("fp32-cpu-decoder-maps", "trufor_fp32_cpu_decoder_maps.onnx", "onnxruntime", "fp32",
                 "ONNX Runtime CPU: both folded decoders' coarse maps, upsampled along the columns",
                 part="decoder-maps"),
    GraphVariant("fp32-cpu-decoders", "trufor_fp32_cpu_decoders.onnx", "onnxruntime", "fp32",
                 "ONNX Runtime CPU: both folded decoders, run in row bands", part="decoder-band"),
)
# The CPU graphs in the order the ONNX Runtime runner chains them; the encoder's names the
# chain in the verification records.
CPU_VARIANTS = ("fp32-cpu-noiseprint", "fp32-cpu", "fp32-cpu-decoder-maps", "fp32-cpu-decoders")
CPU_VARIANT = "fp32-cpu"


class ModelDirError(TruforError):
    """A model folder that cannot be used as it is."""


def files_sha256(hashes: dict) -> str:
    """The SHA-256 of a set of files, from their names and each one's SHA-256."""
    return sha256_bytes(json.dumps(hashes, sort_keys=True).encode())


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise ModelDirError(f"model folder {path}: no such folder")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelDirError(f"model folder {path}: no {MANIFEST_FILE} (not exported, or incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as exc:
        raise ModelDirError(f"model folder {path}: unreadable {MANIFEST_FILE}: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"model folder {path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, this trufor-trt reads {FORMAT!r} version "
            f"{FORMAT_VERSION}: export it again")
    return manifest


def _used_files(manifest: dict) -> list:
    """Every file of the folder a runner may load: the graphs and the detection head."""
    return [variant["file"] for variant in manifest["variants"].values()] + [manifest["detection_head"]["file"]]


def _check_files(path: Path, manifest: dict) -> None:
    unlisted = sorted(set(_used_files(manifest)) - set(manifest["files"]))
    if unlisted:
        raise ModelDirError(f"model folder {path}: {', '.join(unlisted)} not listed with "
                            f"{'its hash' if len(unlisted) == 1 else 'their hashes'} in {MANIFEST_FILE} "
                            "(modified or incomplete): export it again")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ModelDirError(f"model folder {path}: {name} is missing")
        if sha256_file(file) != expected:
            raise ModelDirError(f"model folder {path}: {name} does not match its manifest hash "
                                "(corrupt or modified)")


def variant_names(path) -> set:
    """The graphs a model folder's manifest lists, its files not hashed (ModelDir.open checks
    them, as every command that loads one does): for saying early which graph is missing."""
    return set(_read_manifest(Path(path))["variants"])


@dataclass(frozen=True)
class ModelDir:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path, checkpoint_sha256: str = None) -> "ModelDir":
        """A checked model folder; `checkpoint_sha256`, when given, must be its source's."""
        path = Path(path)
        manifest = _read_manifest(path)
        source = manifest["checkpoint"]["sha256"]
        if checkpoint_sha256 is not None and source != checkpoint_sha256:
            raise ModelDirError(f"model folder {path}: exported from checkpoint {source[:12]}..., "
                                f"not from the given one ({checkpoint_sha256[:12]}...)")
        _check_files(path, manifest)
        return cls(path, manifest)

    @property
    def checkpoint_sha256(self) -> str:
        return self.manifest["checkpoint"]["sha256"]

    def variant_path(self, name: str) -> Path:
        variants = self.manifest["variants"]
        if name not in variants:
            raise ModelDirError(f"model folder {self.path}: has no {name!r} graph "
                                f"(it has: {', '.join(sorted(variants))})")
        return self.path / variants[name]["file"]

    def variant_sha256(self, name: str) -> str:
        """The variant graph's SHA-256, as checked when the folder was opened (no second read:
        on a GPU machine the graphs are hundreds of MB, and every runner needs this)."""
        return self.manifest["files"][self.variant_path(name).name]

    def files_sha256(self, files) -> str:
        """One SHA-256 for the listed files a runner loaded (names and hashes): what the outputs'
        provenance names as the model files, beside the checkpoint the manifest records."""
        return files_sha256({name: self.manifest["files"][name] for name in files})

    @property
    def detection_head_file(self) -> str:
        return self.manifest["detection_head"]["file"]

    def detection_head(self) -> DetectionHead:
        with np.load(self.path / self.detection_head_file) as arrays:
            return DetectionHead(**{name: arrays[name] for name in arrays.files})
