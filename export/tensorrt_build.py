"""`trufor-trt build`: one TensorRT engine from a model folder's graph variant, for this GPU
(its validation, for FP16 / INT8, is trufor_trt/validate.py's validate_engine).

Strongly typed on every release, no precision flag, TF32 cleared (engine/tensorrt_plan.py says
why, and decides it where it is tested): the engine computes in exactly the types the ONNX
graph holds. The TensorRT calls are the documented Python API of 10.0 through 11.x.
"""

import time
from pathlib import Path

from trufor_trt.engine.cuda_layer import cuda_layer
from trufor_trt.engine.model_dir import ModelDir
from trufor_trt.engine.runner import INPUT_NAME
from trufor_trt.engine.tensorrt_plan import (BuildSettings, Profile, Sidecar, build_settings, engine_path,
                                             profile_from_options, sidecar_path)
from trufor_trt.engine.tensorrt_start import import_tensorrt, start_builder, tensorrt_logger, tensorrt_said
from trufor_trt.errors import EngineError, one_line
from trufor_trt.files import sha256_bytes, write_atomically


def _network_flags(trt) -> int:
    # Explicit batch is the only mode since 10.0; STRONGLY_TYPED is the one creation flag we set
    # (where a release no longer lists it, strong typing is its only mode).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parser_errors(parser) -> str:
    """The parser's errors, each as its description and the node it is about."""
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node_name()
        errors.append(" ".join(error.desc().split()) + (f" (node {node})" if node else ""))
    return "; ".join(errors) or "no reason given"


def _parse(trt, builder, graph, name: str):
    """`graph`: the ONNX file's path, or a serialized graph (a chain's part, cut in memory)."""
    network = builder.create_network(_network_flags(trt))
    logger = tensorrt_logger(trt)
    mark = logger.mark()
    try:
        parser = trt.OnnxParser(network, logger)
    except TypeError as exc:  # pybind11's "factory function returned nullptr"
        raise EngineError(f"TensorRT could not create its ONNX parser ({one_line(exc)}"
                          f"{tensorrt_said(trt, mark)})") from None
    parsed = parser.parse(graph) if isinstance(graph, bytes) else parser.parse_from_file(str(graph))
    if not parsed:
        raise EngineError(f"TensorRT could not parse {name}: {_parser_errors(parser)}")
    return network, parser


def _timing_cache(config, cached: bytes, on_step):
    """The builder's timing cache from `cached`. One TensorRT cannot read (create_timing_cache
    returns None: a truncated or foreign file) or that set_timing_cache refuses (made on another
    GPU or TensorRT) is replaced by a fresh one, used and saved instead."""
    if cached:
        cache = config.create_timing_cache(cached)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        on_step("warning: the timing cache is unreadable or was made on another GPU or TensorRT; "
                "starting a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError("TensorRT could not create a timing cache")
    return cache


def _config(trt, builder, settings: BuildSettings, shapes: dict, workspace_gib: float,
            cached: bytes, on_step):
    """`shapes`: input name -> its (min, opt, max) shapes, the one optimization profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in settings.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    if config.add_optimization_profile(_optimization_profile(builder, shapes)) < 0:  # TensorRT found it invalid
        raise EngineError(f"TensorRT refused the optimization profile {shapes}: build with other "
                          "--min-shape / --opt-shape / --max-shape")
    return config, _timing_cache(config, cached, on_step)


def _optimization_profile(builder, shapes: dict):
    optimization = builder.create_optimization_profile()
    for name, (smallest, typical, largest) in shapes.items():
        try:
            optimization.set_shape(name, smallest, typical, largest)
        except ValueError as exc:  # TensorRT's check of min <= opt <= max
            raise EngineError(f"TensorRT refused the shapes of {name} {smallest} .. {largest} "
                              f"({one_line(exc)})") from None
    return optimization


def serialize_engine(trt, settings: BuildSettings, graph, name: str, shapes: dict, workspace_gib: float,
               cache_path, driver_version: str, on_step) -> bytes:
    """The serialized engine of `graph` (a path or serialized ONNX). Called with the primary
    context current: every TensorRT object made here dies when this returns, while its context
    still is current."""
    builder = start_builder(trt, driver_version)
    network, _parser = _parse(trt, builder, graph, name)
    cached = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config, cache = _config(trt, builder, settings, shapes, workspace_gib, cached, on_step)
    mark = tensorrt_logger(trt).mark()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {name}{tensorrt_said(trt, mark)}")
    if cache_path:
        write_atomically(cache_path, bytes(cache.serialize()))
    return bytes(serialized)


def coverage_warning(variant: dict, profile: Profile) -> str:
    """Why a reduced-precision variant's measurements do not cover `profile`'s max shape ("" if
    they do): its deviation grows with the image, and larger images were never measured."""
    largest = variant.get("size_coverage", {}).get("largest_measured")
    if variant.get("precision") == "fp32" or largest is None:
        return ""
    height, width = profile.max
    if height <= largest[0] and width <= largest[1]:
        return ""
    return (f"the {variant['precision']} variant was measured on images up to {largest[0]}x{largest[1]}; "
            f"this engine takes up to {height}x{width}: export it again with full-size images in "
            f"--calib-images and --max-shape {height}x{width}, or validate it on such images")


def build_engine(model_dir, precision: str, profile: Profile = None, workspace_gib: float = 4.0,
                 timing_cache_path=None, min_shape=None, opt_shape=None, max_shape=None,
                 max_batch: int = 1, on_step=print, graph_path=None) -> Path:
    """Build and write the engine and its sidecar (unvalidated: validate.validate_engine
    measures an FP16 / INT8 one next); returns the engine's path. `graph_path`: a graph derived
    from the variant to build instead (export/repair.py's); the sidecar still names the variant."""
    trt = import_tensorrt()
    settings = build_settings(trt.__version__)
    cuda = cuda_layer()
    gpu = cuda.gpu()
    profile = profile or profile_from_options(gpu.integrated, min_shape, opt_shape, max_shape, max_batch)
    model = ModelDir.open(model_dir)
    onnx_path = Path(graph_path) if graph_path else model.variant_path(precision)
    target = engine_path(model.path, gpu, trt.__version__, precision, profile)
    warning = coverage_warning(model.manifest["variants"][precision], profile)
    if warning:
        on_step("warning: " + warning)
    on_step(f"building {precision} for {gpu.name}, profile {profile.tag()} (strongly typed, "
            "TF32 off); this takes minutes")
    started = time.perf_counter()
    with cuda.current():
        serialized = serialize_engine(trt, settings, onnx_path, onnx_path.name, {INPUT_NAME: profile.input_shapes()},
                                workspace_gib, Path(timing_cache_path) if timing_cache_path else None,
                                cuda.driver_version(), on_step)
    seconds = time.perf_counter() - started
    # The engine first, then its sidecar: a sidecar never names an engine that is not there
    # yet, and an interrupted rewrite (new engine, old sidecar) is refused by the SHA-256 the
    # old sidecar holds. Each file is renamed into place whole.
    write_atomically(target, serialized)
    sidecar = Sidecar(precision=precision, profile=profile.as_dict(),
                      tensorrt_version=trt.__version__, device=gpu.name,
                      compute_capability=list(gpu.compute_capability), onnx_file=model.variant_path(precision).name,
                      onnx_sha256=model.variant_sha256(precision), strongly_typed=settings.strongly_typed,
                      builder_flags=list(settings.precision_flags), cleared_flags=list(settings.cleared_flags),
                      tf32=settings.tf32, workspace_gib=workspace_gib,
                      build_seconds=round(seconds, 1), engine_sha256=sha256_bytes(serialized))
    sidecar.write(sidecar_path(target))
    return target
