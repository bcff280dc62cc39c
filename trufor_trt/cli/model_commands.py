"""`export`, `build` and `validate`: the model folder, its TensorRT engines, and how faithful
each variant is to FP32."""

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from trufor_trt.cli.common import (Backend, Precision, check_checkpoint, console, default_checkpoint, fail_setup,
                                   open_model, say, shown)
from trufor_trt.engine import pick_backend
from trufor_trt.files import sha256_file
from trufor_trt.shapes import parse_shape


def export(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="TruFor checkpoint (default: the weights `trufor-trt weights` "
                                                   "stored)."),
    out: Path = typer.Option(..., "--out", help="Model folder to write (FP32: replaced if it exists)."),
    opset: int = typer.Option(18, "--opset", min=17, max=20, help="ONNX opset."),
    precision: Precision = typer.Option(Precision.fp32, "--precision",
                                        help="fp16 / int8: add that variant to the model folder."),
    calib_images: Optional[Path] = typer.Option(None, "--calib-images",
                                                help="Real images to measure fp16 / calibrate int8 on; "
                                                     "include full-size ones (the largest 2 are measured whole)."),
    max_shape: str = typer.Option("2048x2048", "--max-shape",
                                  help="HxW: the largest image the variant's engines will take "
                                       "(build --max-shape); the plan is checked at full size up to it."),
) -> None:
    """Export the network to a verified ONNX model folder, or add an FP16 / INT8 variant to it."""
    if precision != Precision.fp32 and calib_images is None:
        fail_setup(f"--precision {precision.value} needs --calib-images DIR (real images)")
    check_checkpoint(checkpoint)
    checkpoint = default_checkpoint(None, checkpoint)
    from trufor_trt.engine.model_dir import ModelDir, ModelDirError
    from trufor_trt.export.bundle import export_model_dir

    try:
        manifest = ModelDir.open(out, checkpoint_sha256=sha256_file(checkpoint)).manifest
        fresh = precision == Precision.fp32
    except ModelDirError:
        fresh = True
    if fresh:
        manifest = export_model_dir(checkpoint, out, opset=opset, on_step=say)
        worst = max(result["max_abs"]["localization_logits"] for result in manifest["verification"]["results"])
        console.print(f"wrote {shown(str(out))} ({', '.join(manifest['variants'])}); worst logit deviation "
                      f"from the float64 network {worst:.2e}")
    if precision != Precision.fp32:
        from trufor_trt.export.variants import add_precision_variant

        entry = add_precision_variant(out, precision.value, calib_images, max_shape=parse_shape(max_shape),
                                      on_step=say)
        _print_variant(out, precision.value, entry)


def _print_variant(out: Path, precision: str, entry: dict) -> None:
    measured = ", ".join(f"{name} {error:.2e}" for name, error in entry["deviation_vs_fp32"]["max_abs"].items())
    console.print(f"added {precision} to {shown(str(out))}; deviation from fp32 (worst of "
                  f"{', '.join(entry['deviation_vs_fp32']['sizes'])}): {measured}")
    for record in entry["flops_by_precision"]:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in record["network_share"].items() if share)
        console.print(f"FLOPs at {record['size']}: {shares}")
    if "warning" in entry["size_coverage"]:
        say("warning: " + entry["size_coverage"]["warning"])


def build(
    model: Path = typer.Option(Path("trufor-model"), "--model", help="Model folder from `trufor-trt export`."),
    fp16: bool = typer.Option(False, "--fp16", help="Build the FP16 variant."),
    int8: bool = typer.Option(False, "--int8", help="Build the INT8 variant."),
    fp32: bool = typer.Option(False, "--fp32", help="Build the FP32 graph."),
    min_shape: Optional[str] = typer.Option(None, "--min-shape", help="HxW; default 32x32."),
    opt_shape: Optional[str] = typer.Option(None, "--opt-shape",
                                            help="HxW; default 768x768 on a Jetson, 1024x1024 else."),
    max_shape: Optional[str] = typer.Option(None, "--max-shape",
                                            help="HxW; default 1536x1536 on a Jetson, 2048x2048 else."),
    max_batch: int = typer.Option(1, "--max-batch", min=1,
                                  help="Largest batch of same-size images (analyze --batch); default 1."),
    workspace: float = typer.Option(4.0, "--workspace", min=0.25, help="Builder workspace, GiB."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Loaded and saved."),
    images: Optional[Path] = typer.Option(None, "--images",
                                          help="FP16 / INT8: validate the engine on these images (default: "
                                               "synthetic ones); the deviation goes into its sidecar."),
    layout: str = typer.Option("auto", "--layout",
                               help="whole: one engine; chain: Noiseprint++ in bands, the encoder, the decoders "
                                    "in bands, for camera-sized images in little memory; auto: a chain where "
                                    "--max-shape is beyond the GPU's default profile."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory",
                                             help="Chain: the device memory its largest image may take, e.g. 6G "
                                                  "(default: what the GPU has free)."),
    repair: int = typer.Option(3, "--repair", min=0,
                               help="FP16 / INT8: an engine over budget on this GPU gives its most sensitive unit "
                                    "back to FP32 and is built again, up to N times (0: never)."),
) -> None:
    """Build a TensorRT engine for this GPU (like trtexec): one profile, timing cache, sidecar;
    an FP16 / INT8 engine is then validated against the FP32 graph on this GPU. Images larger
    than one engine holds get a chain of engines (--layout); what it would build is said first."""
    chosen = [name for name, wanted in (("fp16", fp16), ("int8", int8), ("fp32", fp32)) if wanted]
    if len(chosen) != 1:
        fail_setup("choose exactly one of --fp16, --int8, --fp32")
    if layout not in ("auto", "whole", "chain"):
        fail_setup(f"--layout {layout}: choose auto, whole or chain")
    _require_graph(model, chosen[0])
    engine = _build_chain(model, chosen[0], layout, min_shape, opt_shape, max_shape, max_batch, max_memory,
                          timing_cache)
    whole = engine is None
    options = {"workspace_gib": workspace, "timing_cache_path": timing_cache, "min_shape": min_shape,
               "opt_shape": opt_shape, "max_shape": max_shape, "max_batch": max_batch}
    if whole:
        from trufor_trt.export.tensorrt_build import build_engine

        engine = build_engine(model, chosen[0], on_step=say, **options)
    console.print(f"wrote {shown(str(engine))}")
    if chosen[0] != "fp32":
        _validate_and_repair(model, chosen[0], engine, images, repair if whole else 0, options)


def _require_graph(model: Path, precision: str) -> None:
    """The folder and its graph of this precision, said before anything about TensorRT or a GPU:
    a newcomer fixes what is missing in that order. (The build opens the folder, hashes checked.)"""
    from trufor_trt.engine.model_dir import variant_names

    if precision in variant_names(model):
        return
    if precision == "fp32":
        fail_setup(f"{model} has no TensorRT graph (it was exported where TensorRT was not installed): export "
                   f"it again here, `trufor-trt export --checkpoint CHECKPOINT --out {model}`")
    fail_setup(f"{model} has no {precision.upper()} graph: add it with `trufor-trt export --checkpoint CHECKPOINT "
               f"--out {model} --precision {precision} --calib-images DIR` (real images)")


def _validate_and_repair(model: Path, precision: str, engine: Path, images, repair: int, options: dict) -> None:
    """The new engine validated on this GPU; an FP16 or INT8 one over budget repaired (export/repair.py)."""
    from trufor_trt.engine.model_dir import ModelDir
    from trufor_trt.validate import validate_engine

    sidecar = validate_engine(ModelDir.open(model), engine, images, say)
    if precision in ("fp16", "int8") and repair and sidecar.validation and not sidecar.validation["within_budget"]:
        from trufor_trt.export.repair import repair_engine

        repair_engine(model, engine, precision, lambda folder, built: validate_engine(folder, built, images, say),
                      repair, options, say)


def _build_chain(model: Path, precision: str, layout: str, min_shape, opt_shape, max_shape, max_batch: int,
                 max_memory, timing_cache):
    """The chain's folder where the layout is a chain (its plan said first), else None."""
    from trufor_trt.engine.memory_budget import parse_memory
    from trufor_trt.export.chain_build import build_chain, builds_chain, plan_for_build, this_gpu
    from trufor_trt.engine.model_dir import ModelDir

    gpu, free = this_gpu() if layout != "whole" else (None, None)
    if not builds_chain(layout, bool(gpu and gpu.integrated), parse_shape(max_shape) if max_shape else None):
        return None
    if max_batch > 1:
        fail_setup("a chain of engines takes one image at a time: leave out --max-batch")
    folder = ModelDir.open(model)
    plan = plan_for_build(folder, precision, gpu, free, min_shape, opt_shape, max_shape,
                          parse_memory(max_memory) if max_memory else None, say)
    return build_chain(folder, precision, plan, timing_cache, say)


def _map_budgets() -> dict:
    from trufor_trt.precision.budgets import FP16_BUDGET, INT8_TARGET

    return {"fp16": FP16_BUDGET["map"], "int8": INT8_TARGET["map"]}


def validate(
    model: Path = typer.Option(..., "--model", help="Model folder from `trufor-trt export`."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to validate."),
    precisions: Optional[List[Precision]] = typer.Option(
        None, "--precision", help="Variant to validate (repeat for several; default fp16, with --backend torch fp32)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="The model folder's checkpoint: what --backend torch runs."),
    images: Optional[Path] = typer.Option(None, "--images", help="Real images (default: synthetic)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report here (one "
                                             "variant: its report; several: {\"variants\": {precision: report}})."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG: deviation against image size per precision."),
) -> None:
    """Faithfulness of engines or graph variants against the FP32 reference, per image and size."""
    import json

    from trufor_trt.files import write_atomically
    from trufor_trt.validate import plot_deviation, print_validation, reports_json, validate as run_validation

    chosen = list(dict.fromkeys(precision.value for precision in precisions or []))
    check_checkpoint(checkpoint)
    if backend == Backend.torch:
        if checkpoint is None:
            fail_setup("--backend torch runs the PyTorch network from --checkpoint FILE (the model folder's checkpoint)")
        if set(chosen) - {"fp32"}:
            fail_setup("--backend torch runs the network in fp32 only: --precision fp32")
    opened = open_model(model, checkpoint)
    candidates = [(pick_backend(backend.value, opened.path, precision, on_notice=say), precision)
                  for precision in chosen or (["fp32"] if backend == Backend.torch else ["fp16"])]
    reports = run_validation(opened, candidates, images, checkpoint=checkpoint)
    for report in reports:
        print_validation(report, Console(highlight=False))
    if plot is not None:
        plot_deviation(reports, plot, _map_budgets())
    if json_path is not None:
        write_atomically(json_path, (json.dumps(reports_json(reports), indent=2) + "\n").encode())
