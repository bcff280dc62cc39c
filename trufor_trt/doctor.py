"""`trufor-trt doctor`: what this machine can run, in the shape a bug report needs.

Each probe catches what a broken install raises (ImportError, OSError, the CUDA layer's and
TensorRT's own errors) and reports it as one line, so the doctor runs without torch, TensorRT
or a GPU, and on a machine where any of them is broken.
"""

import platform
import sys
from pathlib import Path

from trufor_trt import __version__
from trufor_trt.engine.cuda_layer import NO_DRIVER, nvidia_driver_problem
from trufor_trt.engine.tensorrt_start import INSTALL_BY_DRIVER
from trufor_trt.errors import TruforError, one_line
from trufor_trt.installed import distribution_versions, install_command

# Distributions worth naming in a report; what to install for each backend that is missing.
DISTRIBUTIONS = ("numpy", "opencv-python-headless", "typer", "rich", "onnxruntime", "onnx",
                 "onnx-graphsurgeon", "torch", "tensorrt", "pycuda", "cuda-bindings")
INSTALL = {"onnxruntime": install_command("onnxruntime"), "torch": install_command("torch"),
           "tensorrt": INSTALL_BY_DRIVER}


def _one_line(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, TruforError) else one_line(exc)


def _cuda_report() -> dict:
    """The CUDA layer in use and each GPU it sees, or why there is none."""
    try:
        from trufor_trt.engine.cuda_layer import cuda_layer

        layer = cuda_layer()
        gpus = []
        for ordinal in range(layer.device_count()):
            gpu = layer.gpu(ordinal)
            gpus.append({"index": ordinal, "name": gpu.name,
                         "compute_capability": ".".join(map(str, gpu.compute_capability)),
                         "memory_gib": round(layer.total_memory(ordinal) / 2 ** 30, 1),
                         "integrated": gpu.integrated})
        return {"layer": layer.name, "driver_cuda_version": layer.driver_version(), "gpus": gpus,
                "problem": None}
    except (TruforError, ImportError, OSError) as exc:
        return {"layer": None, "driver_cuda_version": None, "gpus": [], "problem": _one_line(exc)}


def _started(start, trt, layer) -> dict:
    """Whether TensorRT can create this object (its Runtime, its Builder) under the GPU's context."""
    try:
        with layer.current():
            start(trt, layer.driver_version())
    except TruforError as exc:
        return {"ok": False, "problem": _one_line(exc)}
    return {"ok": True, "problem": None}


def _tensorrt_report(cuda: dict) -> dict:
    """TensorRT's version and, where a GPU answers, whether it starts a Runtime (what running an
    engine needs) and a Builder (what `build` needs): the real check, as importing proves
    neither (a CUDA 13 build on an older driver imports, then fails there)."""
    not_started = {"ok": False, "problem": "not tried: no usable TensorRT and GPU"}
    try:
        from trufor_trt.engine.tensorrt_plan import build_settings
        from trufor_trt.engine.tensorrt_start import import_tensorrt, start_builder, start_runtime

        trt = import_tensorrt()
        version = trt.__version__
        build_settings(version)  # refuses releases older than 10.0
    except (TruforError, ImportError, OSError) as exc:
        return {"version": None, "can_build": False, "problem": _one_line(exc), "runtime": not_started,
                "builder": not_started}
    if not cuda["gpus"]:
        return {"version": version, "can_build": False, "problem": f"no GPU to build on ({cuda['problem']})",
                "runtime": not_started, "builder": not_started}
    from trufor_trt.engine.cuda_layer import cuda_layer

    layer = cuda_layer()
    runtime, builder = _started(start_runtime, trt, layer), _started(start_builder, trt, layer)
    return {"version": version, "can_build": builder["ok"], "problem": runtime["problem"] or builder["problem"],
            "runtime": runtime, "builder": builder}


def _onnxruntime_report() -> dict:
    try:
        import onnxruntime

        return {"usable": True, "version": onnxruntime.__version__,
                "providers": onnxruntime.get_available_providers(), "problem": None}
    except (ImportError, OSError) as exc:
        return {"usable": False, "problem": _one_line(exc), "install": INSTALL["onnxruntime"]}


def _torch_report() -> dict:
    try:
        import torch

        return {"usable": True, "version": torch.__version__,
                "devices": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "problem": None}
    except (ImportError, OSError) as exc:
        return {"usable": False, "problem": _one_line(exc), "install": INSTALL["torch"]}


def _backends(cuda: dict, tensorrt: dict) -> dict:
    problem = tensorrt["runtime"]["problem"] if tensorrt["version"] and cuda["gpus"] else \
        tensorrt["problem"] or cuda["problem"]
    trt = {"usable": problem is None, "problem": problem}
    if problem is not None:
        trt["install"] = INSTALL["tensorrt"]
    return {"tensorrt": trt, "onnxruntime": _onnxruntime_report(), "torch": _torch_report()}


def _engine_entries(model_dir: Path, here: tuple) -> list:
    """Every engine in the folder, and whether it can run on this GPU and TensorRT."""
    from trufor_trt.engine.model_dir import ModelDir
    from trufor_trt.engine.tensorrt_plan import ENGINES_FOLDER, Sidecar, sidecar_path

    model = ModelDir.open(model_dir)
    entries = []
    engines = (model.path / ENGINES_FOLDER).glob("*/*.engine")
    chains = (path for path in (model.path / ENGINES_FOLDER).glob("*/*-chain-*") if path.is_dir())
    for path in sorted([*engines, *chains]):
        entry = {"engine": str(path.relative_to(model.path))}
        try:
            sidecar = Sidecar.read(sidecar_path(path))
            entry.update(precision=sidecar.precision, device=sidecar.device,
                         tensorrt=sidecar.tensorrt_version, profile_max=list(sidecar.profile["max"]),
                         validation=sidecar.validation, validation_problem=sidecar.validation_problem() or None)
            sidecar.check_files(path)  # EngineError where an engine is not the one it describes
            if here is None:
                entry["runs_here"], entry["why_not"] = False, "TensorRT or a GPU is not usable here"
            else:
                gpu, version = here
                why = sidecar.mismatch(gpu, version, model.variant_sha256(sidecar.precision))
                entry["runs_here"], entry["why_not"] = not why, why or None
        except (TruforError, OSError) as exc:  # an engine's sidecar, or a variant the folder lacks
            entry["runs_here"], entry["why_not"] = False, _one_line(exc)
        entries.append(entry)
    return entries


def _model_report(model_dir: Path, backends: dict) -> dict:
    from trufor_trt.engine.model_dir import ModelDir

    try:
        manifest = ModelDir.open(model_dir).manifest
    except TruforError as exc:
        return {"path": str(model_dir), "ok": False, "problem": _one_line(exc)}
    here = None
    if backends["tensorrt"]["usable"]:
        from trufor_trt.engine.cuda_layer import gpu_info
        from trufor_trt.engine.tensorrt_start import import_tensorrt

        here = (gpu_info(), import_tensorrt().__version__)
    return {"path": str(model_dir), "ok": True, "problem": None,
            "variants": sorted(manifest["variants"]), "engines": _engine_entries(model_dir, here)}


def _largest_square_side(fits) -> int:
    low, high = 0, 1 << 16
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _cpu_memory_report() -> dict:
    from trufor_trt.engine.memory_budget import physical_memory
    from trufor_trt.engine.onnxruntime_runner import MEMORY

    physical = physical_memory()
    side = _largest_square_side(lambda side: MEMORY.refusal(side, side, physical) is None)
    return {"physical_gib": round(physical / 2 ** 30, 1) if physical else None,
            "onnxruntime_largest_square_image": f"{side}x{side}" if physical else None}


def _driver_first(report: dict, driver: str) -> None:
    """Where no NVIDIA driver is there, that is the reason to read first: a package's install
    hint cannot help."""
    if driver and report.get("problem") and NO_DRIVER not in report["problem"]:
        report["problem"] = f"{driver}; {report['problem']}"
        report.pop("install", None)


def _weights_report() -> dict:
    """Where `trufor-trt weights` keeps the official weights, and whether they are there."""
    from trufor_trt.batch.provenance import is_official
    from trufor_trt.files import sha256_file
    from trufor_trt.weights import installed_weights, weights_path

    stored = installed_weights()
    return {"path": str(weights_path()), "stored": stored is not None,
            "official": is_official(sha256_file(stored)) if stored else None}


def diagnose(model_dir: Path = None) -> dict:
    cuda = _cuda_report()
    # A CUDA layer that got an answer from a driver has one, whatever the library search says.
    driver = "" if cuda["driver_cuda_version"] else nvidia_driver_problem()
    tensorrt = _tensorrt_report(cuda)
    backends = _backends(cuda, tensorrt)
    for report in (cuda, tensorrt, backends["tensorrt"]):
        _driver_first(report, driver)
    report = {"trufor_trt": __version__, "python": sys.version.split()[0],
              "platform": platform.platform(), "machine": platform.machine(),
              "packages": distribution_versions(DISTRIBUTIONS), "cuda": cuda, "tensorrt": tensorrt,
              "backends": backends, "cpu_memory": _cpu_memory_report(), "weights": _weights_report()}
    if model_dir is not None:
        report["model"] = _model_report(Path(model_dir), backends)
    return report


def _validation_words(entry: dict) -> str:
    """An engine's validation, as the doctor's line says it."""
    if entry.get("validation_problem"):
        return f"; {entry['validation_problem']}"
    validation = entry.get("validation")
    if validation:
        worst = ", ".join(f"{name} {value:.2g}" for name, value in validation["max_abs"].items())
        return (f"; validated on {validation['image_count']} images: {worst}, "
                f"{validation['decisions_flipped']} flipped")
    return ""


def report_lines(report: dict) -> list:
    """The doctor's report as plain lines: what a user pastes into a bug report."""
    cuda, tensorrt = report["cuda"], report["tensorrt"]
    lines = [f"trufor-trt {report['trufor_trt']}, Python {report['python']}, {report['platform']}",
             "packages: " + ", ".join(f"{name} {version or '-'}" for name, version in report["packages"].items())]
    if cuda["layer"]:
        lines.append(f"CUDA: layer {cuda['layer']}, driver supports CUDA {cuda['driver_cuda_version']}")
        lines += [f"  GPU {gpu['index']}: {gpu['name']}, sm {gpu['compute_capability']}, {gpu['memory_gib']} GiB"
                  f"{', integrated' if gpu['integrated'] else ''}" for gpu in cuda["gpus"]]
    else:
        lines.append(f"CUDA: none ({cuda['problem']})")
    lines.append(f"TensorRT: {tensorrt['version'] or 'none'}; can build here: "
                 f"{'yes' if tensorrt['can_build'] else 'no (' + tensorrt['problem'] + ')'}")
    for name, backend in report["backends"].items():
        details = ", ".join(backend.get("devices") or backend.get("providers") or [])
        state = f"usable{f' ({details})' if details else ''}" if backend["usable"] else \
            f"not usable: {backend['problem']}"
        wanted = backend.get("install")
        install = f"; install: {wanted}" if wanted and "install" not in backend["problem"] else ""
        lines.append(f"backend {name}: {state}{install}")
    memory = report["cpu_memory"]
    lines.append(f"CPU memory: {memory['physical_gib']} GiB; ONNX Runtime takes images up to about "
                 f"{memory['onnxruntime_largest_square_image']} within it")
    weights = report["weights"]
    lines.append(f"weights: {weights['path']}" + (
        (" (official)" if weights["official"] else " (not the official trufor.pth.tar)") if weights["stored"]
        else " not downloaded yet: trufor-trt weights download"))
    if "model" in report:
        model = report["model"]
        state = f"ok, variants {', '.join(model['variants'])}" if model["ok"] else model["problem"]
        lines.append(f"model {model['path']}: {state}")
        lines += [f"  engine {entry['engine']}: "
                  + ("runs here" if entry["runs_here"] else f"not here ({entry['why_not']})")
                  + _validation_words(entry)
                  for entry in model.get("engines", [])]
    return lines
