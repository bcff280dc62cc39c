"""`trufor-trt build` for images larger than one engine holds: a chain of engines (its plan is
engine/chain_plan.py, its runner engine/tensorrt_chain.py).

What would be built, and the device memory it should take, is said before TensorRT is imported:
a machine without TensorRT learns what `build` would make there, then the usual one-line reason.
"""

import time
from pathlib import Path

from trufor_trt.engine.chain import DECODER_VARIANTS
from trufor_trt.engine.chain_plan import CHAIN_WORKSPACE_GIB, ChainPlan, plan_chain
from trufor_trt.engine.cuda_layer import cuda_layer
from trufor_trt.engine.memory_budget import GIB
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.tensorrt_plan import (Sidecar, build_settings, default_profile, engine_path,
                                             profile_from_options, sidecar_path)
from trufor_trt.engine.tensorrt_start import import_tensorrt
from trufor_trt.errors import EngineError
from trufor_trt.files import sha256_bytes, write_atomically
from trufor_trt.export.tensorrt_build import coverage_warning, serialize_engine

LAYOUTS = ("auto", "whole", "chain")


def this_gpu():
    """(Gpu, free device bytes), or (None, None) where no CUDA layer or GPU answers."""
    try:
        cuda = cuda_layer()
        with cuda.current() as current:
            return cuda.gpu(), current.free_memory()
    except EngineError:
        return None, None


def builds_chain(layout: str, integrated: bool, max_shape) -> bool:
    """`auto`: a chain where the max shape is beyond the GPU kind's default whole-image profile."""
    if layout != "auto":
        return layout == "chain"
    if max_shape is None:
        return False
    largest = default_profile(integrated).max
    return max_shape[0] > largest[0] or max_shape[1] > largest[1]


def chain_weight_bytes(model: ModelDir, precision: str) -> int:
    """The weights the chain's engines hold, about the size of the graphs they come from."""
    return sum(model.variant_path(name).stat().st_size for name in (precision, *DECODER_VARIANTS.values()))


def plan_for_build(model: ModelDir, precision: str, gpu, free_bytes, min_shape, opt_shape, max_shape,
                   max_memory, on_step) -> ChainPlan:
    """The chain for this model and GPU (or, where none answers, a discrete GPU's defaults), said
    line by line; within --max-memory, else the GPU's free memory, else the preferred bands."""
    integrated = bool(gpu and gpu.integrated)
    profile = profile_from_options(integrated, min_shape, opt_shape, max_shape)
    budget = max_memory or (free_bytes if gpu else None)
    plan = plan_chain(precision, profile, chain_weight_bytes(model, precision), budget)
    limit = f"{budget / GIB:.1f} GiB budget" if budget else "no memory budget given (--max-memory)"
    where = f"{gpu.name}, {limit}" if gpu else f"no GPU answers here: as for a discrete GPU, {limit}"
    on_step(f"plan ({where}):")
    for line in plan.describe():
        on_step(line)
    return plan


def _part_record(folder: Path, part, serialized: bytes, seconds: float) -> dict:
    name = f"{part.part}.engine"
    write_atomically(folder / name, serialized)
    return {"file": name, "sha256": sha256_bytes(serialized), "profile": part.as_dict(),
            "build_seconds": round(seconds, 1)}


def build_chain(model: ModelDir, precision: str, plan: ChainPlan, timing_cache_path=None, on_step=print) -> Path:
    """Build the chain's engines into its folder, then its sidecar; returns the folder."""
    trt = import_tensorrt()
    from trufor_trt.export.chain_parts import chain_part_graphs

    settings = build_settings(trt.__version__)
    cuda = cuda_layer()
    gpu = cuda.gpu()
    warning = coverage_warning(model.manifest["variants"][precision], plan.profile)
    if warning:
        on_step("warning: " + warning)
    graphs = chain_part_graphs(model, precision)
    folder = engine_path(model.path, gpu, trt.__version__, precision, plan.profile, chain=True)
    folder.mkdir(parents=True, exist_ok=True)
    records, started = {}, time.perf_counter()
    cache = Path(timing_cache_path) if timing_cache_path else None
    for part in plan.parts:
        on_step(f"building the {part.part} engine ({precision}, strongly typed, TF32 off)")
        part_started = time.perf_counter()
        with cuda.current():
            serialized = serialize_engine(trt, settings, graphs[part.part], f"the chain's {part.part} part",
                                          part.inputs, CHAIN_WORKSPACE_GIB, cache, cuda.driver_version(), on_step)
        records[part.part] = _part_record(folder, part, serialized, time.perf_counter() - part_started)
    chain = {"bands": {"noiseprint_rows": plan.bands.noiseprint_rows, "decoder_rows": plan.bands.decoder_rows},
             "parts": records, "estimated_device_bytes": int(plan.estimated_bytes)}
    sidecar = Sidecar(precision=precision, profile=plan.profile.as_dict(), tensorrt_version=trt.__version__,
                      device=gpu.name, compute_capability=list(gpu.compute_capability),
                      onnx_file=model.variant_path(precision).name, onnx_sha256=model.variant_sha256(precision),
                      strongly_typed=settings.strongly_typed, builder_flags=list(settings.precision_flags),
                      cleared_flags=list(settings.cleared_flags), tf32=settings.tf32,
                      workspace_gib=CHAIN_WORKSPACE_GIB, build_seconds=round(time.perf_counter() - started, 1),
                      engine_sha256=sha256_bytes("".join(record["sha256"] for record in records.values()).encode()),
                      chain=chain)
    sidecar.write(sidecar_path(folder))  # after every engine: a sidecar never names a missing one
    return folder
