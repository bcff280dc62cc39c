"""What every command shares: the console and its messages, exit codes, the one error handler,
the options of the commands that analyse images, and the checks made before any model loads."""

import functools
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from trufor_trt.batch.provenance import not_official_warning
from trufor_trt.batch.results_log import OutputFolderBusy, check_not_busy
from trufor_trt.engine.decode import DEFAULT_DECODE_SECONDS, DEFAULT_MAX_PIXELS
from trufor_trt.errors import TruforError, printable
from trufor_trt.files import sha256_file
from trufor_trt.installed import install_command

EXIT_FAILED = 1
EXIT_SETUP = 2
EXIT_STOPPED = 3

console = Console(stderr=True, highlight=False)


class Backend(str, Enum):
    auto = "auto"
    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"
    torch = "torch"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def shown(text: str) -> str:
    """Text from outside (names, reasons) as one line of console markup: control characters
    escaped, markup characters taken literally."""
    return escape(printable(text))


def fail_setup(message: str) -> None:
    console.print(f"[bold red]error:[/] {shown(message)}", soft_wrap=True)
    raise typer.Exit(EXIT_SETUP)


def say(message: str) -> None:
    console.print(f"[dim]{shown(message)}[/]", soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[bold yellow]{shown(message)}[/]", soft_wrap=True)


def missing_package(exc: ModuleNotFoundError) -> str:
    module = (exc.name or "").split(".")[0]
    return f"this needs the '{module}' package: {install_command(module)}"


def handled(command):
    """`command` with the project's errors and missing packages said as one line, exit code 2:
    the one handler every command is registered through."""
    @functools.wraps(command)
    def run_command(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TruforError as exc:
            fail_setup(str(exc))
        except ModuleNotFoundError as exc:
            fail_setup(missing_package(exc))
    return run_command


# The options of every command that analyses images (analyze, watch, serve).
CHECKPOINT = typer.Option(None, "--checkpoint",
                          help="TruFor checkpoint; exported once into a cache for ONNX backends (default: "
                               "the official weights, once `trufor-trt weights download` stored them).")
MODEL = typer.Option(None, "--model", help="Model folder from `trufor-trt export`.")
BACKEND = typer.Option(Backend.auto, "--backend", help="auto: TensorRT where it can run, else ONNX Runtime.")
PRECISION = typer.Option(Precision.fp32, "--precision", help="Numeric precision.")
DEVICE = typer.Option("auto", "--device", help="torch backend: cpu, cuda or auto.")
SAVE_NOISEPRINT = typer.Option(False, "--save-noiseprint", help="Also store np++ in the .npz.")
NO_PNG = typer.Option(False, "--no-png", help="Skip the heatmap and overlay PNGs.")
ACCEPT_UNVALIDATED = typer.Option(False, "--accept-unvalidated",
                                  help="TensorRT: also run FP16 / INT8 engines not validated within their "
                                       "budget on their GPU (their measured deviation is not evidence-grade).")
MAX_PIXELS = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1,
                          help="Refuse images with more pixels (decompression bombs).")
MAX_FILE = typer.Option("1G", "--max-file",
                        help="Refuse image files larger than this (e.g. 256M) before reading them; "
                             "special files (FIFOs, devices) are always refused.")
DECODE_SECONDS = typer.Option(DEFAULT_DECODE_SECONDS, "--decode-seconds", min=0.01,
                              help="Seconds an image may take to decode, plus as much per 10 megapixels; a "
                                   "file that takes longer is refused (decoding bombs).")
VERDICT_MARGIN = typer.Option(
    None, "--verdict-margin", min=0.0,
    help="FP16 / INT8: an image whose score lies within this of 0.5 is analysed again in FP32 and that "
         "result recorded, the reduced one beside it (default: 10x the precision's score budget, or 5x "
         "its measured worst deviation if larger; 0: off).")
MAX_MEMORY = typer.Option(None, "--max-memory",
                          help="Host memory budget per image on the CPU, e.g. 8G (default: physical "
                               "memory); bands follow from it. TensorRT: the most device memory an "
                               "engine or chain may take.")
QUIET = typer.Option(False, "--quiet", help="No progress: failures and the summary only.")


def file_limit(text: str) -> int:
    """--max-file in bytes (a setup error if it cannot be read)."""
    from trufor_trt.engine.memory_budget import parse_memory

    try:
        return parse_memory(text)
    except TruforError as exc:
        fail_setup(f"--max-file {text}: {exc}")
        raise


NO_WEIGHTS = ("no weights given: download the official TruFor weights once with `trufor-trt weights download` "
              "(non-commercial research use), give --checkpoint FILE or --model DIR, or try the tool on "
              "random weights with `analyze --random-weights` (their outputs are noise)")


def default_checkpoint(model: Optional[Path], checkpoint: Optional[Path]) -> Optional[Path]:
    """--checkpoint as given; with neither it nor --model, the weights `trufor-trt weights` stored."""
    if checkpoint is not None or model is not None:
        return checkpoint
    from trufor_trt.weights import installed_weights

    stored = installed_weights()
    if stored is None:
        fail_setup(NO_WEIGHTS)
    say(f"weights: {stored} (trufor-trt weights)")
    return stored


def random_weights_checkpoint(model: Optional[Path], checkpoint: Optional[Path]) -> Path:
    """--random-weights: the random checkpoint selftest and bench share (one file, one cached model)."""
    from trufor_trt.export.cache import RANDOM_SEED, random_checkpoint

    if model is not None or checkpoint is not None:
        fail_setup("--random-weights stands in for --checkpoint and --model: give one of the three")
    say(f"random weights (seed {RANDOM_SEED}): the maps and scores are noise, for trying the tool; "
        "every output says official false")
    return random_checkpoint()


def check_checkpoint(checkpoint: Optional[Path]) -> None:
    """A mistyped --checkpoint is said at once, not after the model's load time."""
    if checkpoint is not None and not checkpoint.is_file():
        fail_setup(f"--checkpoint {checkpoint}: " + ("not a file" if checkpoint.exists() else "no such file"))


def check_output_folder(out: Path, option: str = "--out") -> None:
    """The output folder exists or can be made, and takes files: checked before any model loads."""
    import tempfile

    if out.exists() and not out.is_dir():
        fail_setup(f"{option} {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        fail_setup(f"{option} {out}: cannot be written ({exc.strerror or exc})")


def check_not_busy_folder(out: Path) -> None:
    try:
        check_not_busy(out)
    except OutputFolderBusy as exc:
        fail_setup(str(exc))


def check_results_folder(out: Path) -> None:
    """An output folder that takes results: writable, and no other run writing into it."""
    check_output_folder(out)
    check_not_busy_folder(out)


def open_model(model: Optional[Path], checkpoint: Optional[Path]):
    """The checked model folder for the ONNX backends: --model, else the cache for --checkpoint."""
    from trufor_trt.engine.model_dir import ModelDir

    if model is not None:
        return ModelDir.open(model, checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None)
    checkpoint = default_checkpoint(model, checkpoint)
    from trufor_trt.export.cache import cached_model_dir

    return cached_model_dir(checkpoint, on_step=say)


def runner_spec(backend: str, model: Optional[Path], checkpoint: Optional[Path], device: str, precision: str,
                max_memory: Optional[str], accept_unvalidated: bool = False):
    """The runner spec the options ask for, its backend resolved ("auto": TensorRT where it can
    run here, said when it cannot), its model folder opened and checked."""
    from trufor_trt.engine.memory_budget import parse_memory
    from trufor_trt.engine.runner_spec import RunnerSpec

    budget = parse_memory(max_memory) if max_memory else None
    if backend == "torch":
        if model is not None and checkpoint is None:
            fail_setup("the torch backend runs from --checkpoint FILE, not a model folder")
        checkpoint = default_checkpoint(model, checkpoint)
        return RunnerSpec("torch", precision, checkpoint=checkpoint, device=device, max_memory=budget)
    opened = open_model(model, checkpoint)
    return RunnerSpec(backend, precision, model=opened, device=device, max_memory=budget,
                      accept_unvalidated=accept_unvalidated).resolved(on_notice=say)


def verdict_guard(spec, margin: Optional[float]):
    """The verdict guard of runners of `spec`, its margin said where it is on."""
    from trufor_trt.batch.verdict_guard import verdict_guard_for

    guard = verdict_guard_for(spec, margin)
    if guard.margin > 0:
        say(f"verdict guard: scores within {guard.margin:g} of 0.5 are analysed again in FP32 "
            "(--verdict-margin; 0 turns it off)")
    return guard


def load_runners(spec, streams: int = 1) -> list:
    """`streams` loaded runners of `spec` side by side (0: the backend's default), the
    unofficial-weights warning said once."""
    from trufor_trt.engine.runner_spec import open_runners

    runners = open_runners(spec, streams)
    warn_unless_official(runners[0].model_sha256)
    return runners


def warn_unless_official(model_sha256: Optional[str]) -> None:
    warning = not_official_warning(model_sha256)
    if warning:
        warn(warning)


def record_line(record) -> str:
    """One image's outcome (a batch.records.Record) as one line: what logs and `--quiet` keep
    (failures only)."""
    name = shown(record.input)
    if record.status == "error":
        return f"[red]failed[/] {name}: {shown(record.reason)}"
    score = f"score {record.score:.4f}" if record.score is not None else "no score"
    if record.status == "skipped":
        return f"skipped {name}: {score} (outputs exist)"
    seconds = record.times_ms.get("total", 0) / 1000
    why = f" ({shown(record.reason)})" if record.reason else ""
    if record.verdict_guard:
        score += f" ({record.precision}: the verdict guard's; {record.reduced_said()})"
    return f"{name}: {score}, {seconds:.1f} s{why}"
