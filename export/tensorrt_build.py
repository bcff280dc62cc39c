"""`trufor-trt build`: one TensorRT engine from a model folder's graph variant, for this GPU.

The TensorRT calls are the documented Python API present in 10.3 (JetPack 6) and 11.x; every
decision that differs between releases is made in engine/tensorrt_plan.py, where it is tested.
"""

import time
from pathlib import Path

from ..engine.cuda import PrimaryContext, gpu_info
from ..engine.model_dir import ModelDir, sha256_file
from ..engine.runner import INPUT_NAME
from ..engine.tensorrt_plan import (EngineError, Profile, Sidecar, builder_flags, engine_path,
                                    profile_from_options, sidecar_path, strongly_typed)
from ..engine.tensorrt_runner import import_tensorrt
from ..files import write_atomically


def _parse(trt, builder, logger, onnx_path: Path, strong: bool):
    # 10.0+: explicit batch is the only mode; STRONGLY_TYPED is the one creation flag we set.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return network, parser


def _check_platform(trt, builder, precision: str) -> None:
    """Refuse loudly rather than silently build a slower or different-precision engine.
    (platform_has_fast_* exist in 10.x; 11 dropped them with weak typing, and strongly typed
    builds fail by themselves where a type is unsupported.)"""
    needs = {"fp16": "platform_has_fast_fp16", "int8": "platform_has_fast_int8"}.get(precision)
    if needs and hasattr(builder, needs) and not getattr(builder, needs):
        raise EngineError(f"this GPU has no fast {precision.upper()} support: build --fp32 instead")


def _config(trt, builder, precision: str, profile: Profile, workspace_gib: float, timing_cache: bytes):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in builder_flags(trt.__version__, precision):  # only before 10.12 (weak typing)
        config.set_flag(getattr(trt.BuilderFlag, flag))
    shapes = [(1, 3, *size) for size in (profile.min, profile.opt, profile.max)]
    optimization = builder.create_optimization_profile()
    optimization.set_shape(INPUT_NAME, *shapes)
    config.add_optimization_profile(optimization)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def build_engine(model_dir, precision: str, profile: Profile = None, workspace_gib: float = 4.0,
                 timing_cache_path=None, min_shape=None, opt_shape=None, max_shape=None,
                 on_step=print) -> Path:
    """Build and write the engine and its sidecar; returns the engine's path."""
    trt = import_tensorrt()
    gpu = gpu_info()
    profile = profile or profile_from_options(gpu.integrated, min_shape, opt_shape, max_shape)
    model = ModelDir.open(model_dir)
    onnx_path = model.variant_path(precision)
    strong = strongly_typed(trt.__version__)
    target = engine_path(model.path, gpu, trt.__version__, precision, profile)
    cache_path = Path(timing_cache_path) if timing_cache_path else None
    with PrimaryContext() as gpu_context, gpu_context.current():
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        _check_platform(trt, builder, precision)
        network, _parser = _parse(trt, builder, logger, onnx_path, strong)
        cached = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
        config, cache = _config(trt, builder, precision, profile, workspace_gib, cached)
        on_step(f"building {precision} for {gpu.name}, profile {profile.tag()} "
                f"({'strongly typed' if strong else 'builder flags'}); this takes minutes")
        started = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT could not build a {precision} engine (see its log above)")
        seconds = time.perf_counter() - started
        if cache_path:
            write_atomically(cache_path, bytes(cache.serialize()))
    # The sidecar first: an engine that exists always has one.
    Sidecar(precision=precision, profile={"min": profile.min, "opt": profile.opt, "max": profile.max},
            tensorrt_version=trt.__version__, device=gpu.name,
            compute_capability=list(gpu.compute_capability), onnx_file=onnx_path.name,
            onnx_sha256=sha256_file(onnx_path), strongly_typed=strong,
            builder_flags=list(builder_flags(trt.__version__, precision)),
            workspace_gib=workspace_gib, build_seconds=round(seconds, 1)).write(sidecar_path(target))
    write_atomically(target, bytes(serialized))
    return target
