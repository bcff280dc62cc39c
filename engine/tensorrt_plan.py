"""Everything about a TensorRT engine that needs no TensorRT: shapes, profiles, how engines are
built on each TensorRT release, where engines live, which one fits an image and this machine.

Version facts used (NVIDIA's TensorRT release notes and API docs):
- 10.0 made explicit batch the only mode and has NetworkDefinitionCreationFlag.STRONGLY_TYPED;
  10.12 deprecated weak typing and the FP16/INT8 builder flags; 11.0 removed them.
- A weakly typed network with BuilderFlag.FP16 lets TensorRT run *any* layer in FP16, whatever
  the ONNX says; so every build here is strongly typed and sets no precision flag: each
  tensor's type comes from the graph (the FP16 plan and the Q/DQ nodes are in the ONNX).
- BuilderFlag.TF32 is on by default and lets FP32 convolutions and matrix products round their
  inputs to 10-bit mantissas on Ampere and newer: cleared, so FP32 means FP32.
"""

import json
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from trufor_trt.engine.cuda import Gpu
from trufor_trt.engine.runner import INPUT_NAME, OUTPUT_NAMES
from trufor_trt.errors import EngineError
from trufor_trt.files import sha256_bytes, write_atomically
from trufor_trt.shapes import parse_shape

MIN_TENSORRT = (10, 0)
ENGINES_FOLDER = "engines"
# The flags cleared on every build (those on by default that change FP32 arithmetic).
CLEARED_BUILDER_FLAGS = ("TF32",)
# What an engine must expose, as the runner feeds and reads it.
IO_CONTRACT = {INPUT_NAME: ("input", "FLOAT"), **{name: ("output", "FLOAT") for name in OUTPUT_NAMES}}


@dataclass(frozen=True)
class Profile:
    """One optimization profile over the input's height and width, and its batch: 1 .. max_batch
    images of one size (tuned for full batches)."""

    min: tuple
    opt: tuple
    max: tuple
    max_batch: int = 1

    def __post_init__(self):
        for axis in (0, 1):
            if not self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise EngineError(f"profile {self.tag()}: needs min <= opt <= max on each side")
        if self.max_batch < 1:
            raise EngineError(f"profile {self.tag()}: the batch must be at least 1")

    def tag(self) -> str:
        sizes = "_".join(f"{h}x{w}" for h, w in (self.min, self.opt, self.max))
        return sizes if self.max_batch == 1 else f"{sizes}_b{self.max_batch}"

    def input_shapes(self) -> tuple:
        """The input's (min, opt, max) shapes, N x 3 x H x W, as the builder takes them."""
        return ((1, 3, *self.min), (self.max_batch, 3, *self.opt), (self.max_batch, 3, *self.max))

    def as_dict(self) -> dict:
        """What the sidecar keeps (max_batch only when above 1: older sidecars lack it)."""
        sizes = {"min": self.min, "opt": self.opt, "max": self.max}
        return sizes if self.max_batch == 1 else {**sizes, "max_batch": self.max_batch}

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


def profile_from_options(integrated_gpu: bool, min_shape=None, opt_shape=None, max_shape=None,
                         max_batch: int = 1) -> Profile:
    base = default_profile(integrated_gpu)
    return Profile(min=parse_shape(min_shape) if min_shape else base.min,
                   opt=parse_shape(opt_shape) if opt_shape else base.opt,
                   max=parse_shape(max_shape) if max_shape else base.max, max_batch=max_batch)


def version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built on one TensorRT release."""

    strongly_typed: bool
    precision_flags: tuple  # BuilderFlag names set: none, precision comes from the ONNX
    cleared_flags: tuple  # BuilderFlag names cleared
    tf32: bool


def build_settings(tensorrt_version: str) -> BuildSettings:
    """The same on every supported release; older ones are refused (JetPack 6.0 has 8.6, 5 has 8.5)."""
    if version_tuple(tensorrt_version) < MIN_TENSORRT:
        raise EngineError(f"TensorRT {tensorrt_version} is too old: trufor-trt needs TensorRT >= "
                          f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} (JetPack 6.1 or newer; JetPack 6.0 has 8.6) "
                          "for strongly typed builds")
    return BuildSettings(strongly_typed=True, precision_flags=(), cleared_flags=CLEARED_BUILDER_FLAGS,
                         tf32=False)


def io_contract_problems(tensors: dict) -> list:
    """Why an engine's I/O (name -> (mode, dtype name), read off the engine) does not match what
    the runner feeds and reads ([] if it does)."""
    problems = [f"tensor {name} is missing" for name in IO_CONTRACT if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in IO_CONTRACT]
    problems += [f"tensor {name} is {tensors[name][0]} {tensors[name][1]}, expected {mode} {dtype}"
                 for name, (mode, dtype) in IO_CONTRACT.items()
                 if name in tensors and tuple(tensors[name]) != (mode, dtype)]
    return problems


def engine_path(model_dir, gpu: Gpu, tensorrt_version: str, precision: str, profile: Profile,
                chain: bool = False) -> Path:
    """A whole-image engine's file, or a chain's folder (its part engines inside)."""
    name = f"{precision}-chain-{profile.tag()}" if chain else f"{precision}-{profile.tag()}.engine"
    return Path(model_dir) / ENGINES_FOLDER / gpu.key(tensorrt_version) / name


def sidecar_path(engine: Path) -> Path:
    """Beside the engine file, or beside the chain's folder."""
    return engine.with_name(engine.name.removesuffix(".engine") + ".json")


def find_engines(model_dir, gpu: Gpu, tensorrt_version: str, precision: str) -> list:
    """The precision's whole-image engine files and chain folders for this GPU and TensorRT."""
    folder = Path(model_dir) / ENGINES_FOLDER / gpu.key(tensorrt_version)
    chains = [path for path in folder.glob(f"{precision}-chain-*") if path.is_dir()]
    return sorted([*folder.glob(f"{precision}-*.engine"), *chains])


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
    builder_flags: list  # set
    cleared_flags: list
    tf32: bool
    workspace_gib: float
    build_seconds: float
    engine_sha256: str  # the engine file's: an engine that differs is never loaded
    # FP16 / INT8: the engine measured on this GPU against the FP32 graph (validation_record);
    # None until then. FP32 engines need none.
    validation: dict | None = None
    # A chain of engines (engine/tensorrt_chain.py): its bands and, per part, the engine file in
    # the chain's folder, its SHA-256 and profile; None for a whole-image engine.
    chain: dict | None = None
    # FP16 engines that `build --repair` built again (export/repair.py): the units given back
    # and every try; None for an engine built as planned.
    repair: dict | None = None

    def write(self, path: Path) -> None:
        write_atomically(path, (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def read(cls, path: Path) -> "Sidecar":
        engine = path.with_name(path.name.removesuffix(".json"))
        if not path.is_file():
            raise EngineError(f"engine {engine}: its sidecar {path.name} is missing")
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"engine {engine}: its sidecar {path.name} is unreadable ({exc})") from None
        known = {field.name for field in fields(cls)}
        required = {field.name for field in fields(cls) if field.default is MISSING}
        if not isinstance(values, dict) or not required <= set(values) <= known:
            raise EngineError(f"engine {engine}: its sidecar was written by another trufor-trt "
                              "version (fields differ); build the engine again")
        return cls(**values)

    def engine_bytes(self, engine: Path) -> bytes:
        """The engine file's bytes, once they are checked against the SHA-256 recorded here."""
        if self.chain is not None:
            raise EngineError(f"{engine} is a chain of engines: each is checked as it is loaded")
        data = engine.read_bytes()
        if sha256_bytes(data) != self.engine_sha256:
            raise EngineError(f"engine {engine}: differs from the engine its sidecar describes "
                              "(changed, or a build was interrupted): build it again")
        return data

    def check_files(self, engine: Path) -> None:
        """EngineError unless the engine (each of a chain's engines) is the one described here."""
        if self.chain is None:
            self.engine_bytes(engine)
            return
        for part, record in self.chain["parts"].items():
            if sha256_bytes((engine / record["file"]).read_bytes()) != record["sha256"]:
                raise EngineError(f"engine {engine}: its {part} engine differs from the one its sidecar "
                                  "describes: build it again")

    def profile_object(self) -> Profile:
        return Profile(**{key: value if key == "max_batch" else tuple(value) for key, value in self.profile.items()})

    def validation_problem(self) -> str:
        """Why a reduced-precision engine may not be trusted as evidence ('' if it may): never
        validated on its GPU, or validated over its precision's budget (with the numbers)."""
        if self.precision == "fp32":
            return ""
        if self.validation is None:
            return (f"not validated on its GPU (build validates {self.precision} engines: build it again, "
                    "or pass --accept-unvalidated)")
        if not self.validation["within_budget"]:
            return f"over its budget when validated: {self.validation['summary']} (--accept-unvalidated runs it anyway)"
        return ""

    def mismatch(self, gpu: Gpu, tensorrt_version: str, onnx_sha256: str) -> str:
        """Why this engine cannot run here ('' if it can)."""
        if self.tensorrt_version != tensorrt_version:
            return f"built with TensorRT {self.tensorrt_version}, this is {tensorrt_version}"
        if self.device != gpu.name or tuple(self.compute_capability) != tuple(gpu.compute_capability):
            return f"built for {self.device} (sm{''.join(map(str, self.compute_capability))}), this is {gpu.name}"
        if self.onnx_sha256 != onnx_sha256:
            return "built from another ONNX graph than the model folder's"
        if not self.strongly_typed or self.tf32 or self.builder_flags:
            return "built weakly typed or with TF32, so its precision is not the graph's"
        return ""


@dataclass(frozen=True)
class EngineSurvey:
    """The engines of one precision for this GPU and TensorRT: those that can run here (smallest
    profile first) and, for the others, why not."""

    usable: list  # [(engine path, Sidecar)]
    rejected: list  # [(engine path, reason)]

    def for_image(self, height: int, width: int):
        """(path, sidecar) of the smallest profile that admits the image, or None."""
        return next(((path, sidecar) for path, sidecar in self.usable
                     if sidecar.profile_object().admits(height, width)), None)

    def refusal(self, height: int, width: int) -> str:
        """Why no engine takes the image ('' if one does): the largest profile's refusal."""
        if self.for_image(height, width) is not None:
            return ""
        _, largest = self.usable[-1]
        return largest.profile_object().refusal(height, width)

    def problem(self, precision: str, gpu: Gpu, tensorrt_version: str, model_dir) -> str:
        """Why no engine can run at all ('' if one can)."""
        if self.usable:
            return ""
        why = "; ".join(f"{path.name}: {reason}" for path, reason in self.rejected)
        return (f"no usable {precision} engine for {gpu.name} and TensorRT {tensorrt_version} in "
                f"{model_dir}{f' ({why})' if why else ''}: run `trufor-trt build --model {model_dir} "
                f"--{precision}`")


def _profile_area(sidecar: Sidecar) -> tuple:
    """Smallest images first; of two engines for the same sizes, the one taking larger batches."""
    profile = sidecar.profile_object()
    height, width = profile.max
    return height * width, height, width, -profile.max_batch


def survey_engines(model_dir, gpu: Gpu, tensorrt_version: str, precision: str, onnx_sha256: str,
                   accept_unvalidated: bool = False, only=None) -> EngineSurvey:
    """Read every sidecar of the precision's engines for this GPU and TensorRT, and check it;
    a reduced-precision engine that is not validated within its budget is rejected unless
    `accept_unvalidated`. `only`: that engine file alone."""
    usable, rejected = [], []
    for path in find_engines(model_dir, gpu, tensorrt_version, precision):
        if only is not None and path != Path(only):
            continue
        try:
            sidecar = Sidecar.read(sidecar_path(path))
            why = sidecar.mismatch(gpu, tensorrt_version, onnx_sha256)
            if not why and not accept_unvalidated:
                why = sidecar.validation_problem()
        except EngineError as exc:
            why = str(exc)
        if why:
            rejected.append((path, why))
        else:
            usable.append((path, sidecar))
    usable.sort(key=lambda entry: _profile_area(entry[1]))
    return EngineSurvey(usable=usable, rejected=rejected)


# What a validation record compares, as validate.ValidationReport.overall() names the worst
# errors, against the budget's keys.
VALIDATED_OUTPUTS = {"map": "map_max", "conf": "conf_max", "score": "score_error_max", "np++": "noiseprint_max"}


def validation_record(overall: dict, budget: dict, images: str) -> dict:
    """The sidecar's record of an engine measured against the FP32 graph: the worst errors, the
    flips, the budget and whether it holds (every budgeted output within, no decision flipped)."""
    worst = {output: overall[key] for output, key in VALIDATED_OUTPUTS.items()}
    over = [f"{output} {worst[output]:.2g} > {limit:.2g}" for output, limit in budget.items()
            if not worst[output] <= limit]
    if overall["decisions_flipped"]:
        over.append(f"{overall['decisions_flipped']} decision(s) flipped")
    return {"reference": "fp32 graph, onnxruntime", "images": images, "image_count": overall["images"],
            "max_abs": worst, "decisions_flipped": overall["decisions_flipped"], "budget": budget,
            "within_budget": not over, "summary": "; ".join(over) or "within budget"}


def build_command(model_dir, precision: str, profile: Profile) -> str:
    batch = f" --max-batch {profile.max_batch}" if profile.max_batch > 1 else ""
    return (f"trufor-trt build --model {model_dir} --{precision} --min-shape {profile.min[0]}x{profile.min[1]} "
            f"--opt-shape {profile.opt[0]}x{profile.opt[1]} --max-shape {profile.max[0]}x{profile.max[1]}{batch}")
