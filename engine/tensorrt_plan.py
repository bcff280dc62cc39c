"""Everything about a TensorRT engine that needs no TensorRT: shapes, profiles, the precision
mode per TensorRT release, where engines live, and whether one fits this machine.

Version facts used (NVIDIA's TensorRT release notes):
- 10.0 made explicit batch the only mode (no EXPLICIT_BATCH flag needed).
- 10.12 deprecated weakly typed networks and the FP16/INT8 builder flags in favour of strongly
  typed networks, whose precision comes from the ONNX types.
- 11.0 removed weak typing, BuilderFlag.FP16/INT8 and the INT8 calibrators.
"""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import TruforError
from ..files import write_atomically
from .decode import MIN_SIDE

STRONG_TYPING_FROM = (10, 12)
ENGINES_FOLDER = "engines"
# Weakly typed builds (TensorRT < 10.12) need the flags that let TensorRT pick lower
# precision; INT8 graphs keep their attention in FP16, so INT8 needs both.
WEAK_TYPING_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}


class EngineError(TruforError):
    """An engine cannot be built or used here, with what to do about it."""


def parse_shape(text: str) -> tuple:
    """'HxW' -> (H, W), each at least the network's minimum side."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise EngineError(f"shape {text!r}: expected HEIGHTxWIDTH, e.g. 1024x768")
    shape = int(match.group(1)), int(match.group(2))
    if min(shape) < MIN_SIDE:
        raise EngineError(f"shape {text}: each side must be at least {MIN_SIDE} px")
    return shape


@dataclass(frozen=True)
class Profile:
    """One optimization profile over the input's height and width (batch 1)."""

    min: tuple
    opt: tuple
    max: tuple

    def __post_init__(self):
        for axis in (0, 1):
            if not self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise EngineError(f"profile {self.tag()}: needs min <= opt <= max on each side")

    def tag(self) -> str:
        return "_".join(f"{h}x{w}" for h, w in (self.min, self.opt, self.max))

    def admits(self, height: int, width: int) -> bool:
        return (self.min[0] <= height <= self.max[0]) and (self.min[1] <= width <= self.max[1])

    def refusal(self, height: int, width: int) -> str:
        needed = f"{max(height, self.max[0])}x{max(width, self.max[1])}"
        return (f"image {height}x{width} (HxW) is outside this engine's profile "
                f"{self.min[0]}x{self.min[1]} .. {self.max[0]}x{self.max[1]}; rebuild with "
                f"`trufor-trt build --max-shape {needed}`" if height > self.max[0] or width > self.max[1]
                else f"image {height}x{width} is below this engine's minimum "
                     f"{self.min[0]}x{self.min[1]}; rebuild with a smaller --min-shape")


# Defaults: a Jetson shares 8-64 GB between CPU and GPU and runs capture-size crops; a
# data-center GPU takes photos up to 4 MP in one engine. Larger images need --max-shape.
DEFAULT_PROFILES = {
    "jetson": Profile(min=(32, 32), opt=(768, 768), max=(1536, 1536)),
    "datacenter": Profile(min=(32, 32), opt=(1024, 1024), max=(2048, 2048)),
}


def default_profile(integrated_gpu: bool) -> Profile:
    return DEFAULT_PROFILES["jetson" if integrated_gpu else "datacenter"]


def profile_from_options(integrated_gpu: bool, min_shape=None, opt_shape=None, max_shape=None) -> Profile:
    base = default_profile(integrated_gpu)
    return Profile(min=parse_shape(min_shape) if min_shape else base.min,
                   opt=parse_shape(opt_shape) if opt_shape else base.opt,
                   max=parse_shape(max_shape) if max_shape else base.max)


def version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def strongly_typed(tensorrt_version: str) -> bool:
    return version_tuple(tensorrt_version) >= STRONG_TYPING_FROM


def builder_flags(tensorrt_version: str, precision: str) -> tuple:
    """BuilderFlag names to set: none when strongly typed (the ONNX carries the precision)."""
    return () if strongly_typed(tensorrt_version) else WEAK_TYPING_FLAGS[precision]


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple
    integrated: bool

    def key(self, tensorrt_version: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        major, minor = self.compute_capability
        return f"{slug}-sm{major}{minor}-trt{tensorrt_version}"


def engine_path(model_dir, gpu: Gpu, tensorrt_version: str, precision: str, profile: Profile) -> Path:
    return (Path(model_dir) / ENGINES_FOLDER / gpu.key(tensorrt_version)
            / f"{precision}-{profile.tag()}.engine")


def sidecar_path(engine: Path) -> Path:
    return engine.with_suffix(".json")


def find_engines(model_dir, gpu: Gpu, tensorrt_version: str, precision: str) -> list:
    folder = Path(model_dir) / ENGINES_FOLDER / gpu.key(tensorrt_version)
    return sorted(folder.glob(f"{precision}-*.engine"))


@dataclass(frozen=True)
class Sidecar:
    """What an engine was built from and for (written beside it as JSON)."""

    precision: str
    profile: dict
    tensorrt_version: str
    device: str
    compute_capability: list
    onnx_file: str
    onnx_sha256: str
    strongly_typed: bool
    builder_flags: list
    workspace_gib: float
    build_seconds: float

    def write(self, path: Path) -> None:
        write_atomically(path, (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def read(cls, path: Path) -> "Sidecar":
        if not path.is_file():
            raise EngineError(f"engine {path.with_suffix('.engine')}: its sidecar {path.name} is missing")
        return cls(**json.loads(path.read_text()))

    def profile_object(self) -> Profile:
        return Profile(**{key: tuple(value) for key, value in self.profile.items()})

    def mismatch(self, gpu: Gpu, tensorrt_version: str, onnx_sha256: str) -> str:
        """Why this engine cannot run here ('' if it can)."""
        if self.tensorrt_version != tensorrt_version:
            return f"built with TensorRT {self.tensorrt_version}, this is {tensorrt_version}"
        if self.device != gpu.name or tuple(self.compute_capability) != tuple(gpu.compute_capability):
            return f"built for {self.device} (sm{''.join(map(str, self.compute_capability))}), this is {gpu.name}"
        if self.onnx_sha256 != onnx_sha256:
            return "built from another ONNX graph than the model folder's"
        return ""


def build_command(model_dir, precision: str, profile: Profile) -> str:
    return (f"trufor-trt build --model {model_dir} --{precision} --min-shape {profile.min[0]}x{profile.min[1]} "
            f"--opt-shape {profile.opt[0]}x{profile.opt[1]} --max-shape {profile.max[0]}x{profile.max[1]}")
