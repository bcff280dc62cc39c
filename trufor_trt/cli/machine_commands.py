"""`selftest`, `doctor`, `cache` and `bench`: what this machine can run, and how fast."""

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from trufor_trt.cli.common import EXIT_FAILED, Backend, Precision, console, fail_setup, say, shown


class SelftestPrecision(str, Enum):
    """selftest proves fp32 and fp16 against fixed bounds; int8 is judged on real images."""

    fp32 = "fp32"
    fp16 = "fp16"


def selftest(
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to prove."),
    precision: SelftestPrecision = typer.Option(SelftestPrecision.fp32, "--precision",
                                                help="int8 is judged on real images: `validate`."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random checkpoint."),
) -> None:
    """Prove this installation end to end on a random checkpoint and synthetic images
    (with --backend tensorrt: a small-profile engine built on this GPU)."""
    chosen = "onnxruntime" if backend == Backend.auto else backend.value
    from trufor_trt.selftest import run_selftest, selftest_table

    report = run_selftest(chosen, precision=precision.value, seed=seed, on_step=say)
    Console(highlight=False).print(selftest_table(report))
    setup = ", ".join(f"{stage} {ms / 1000:.1f} s" for stage, ms in report.setup_ms.items())
    worst = ", ".join(f"{name} {error:.2e}" for name, error in report.worst().items())
    typer.echo(f"{'PASS' if report.passed else 'FAIL'}: {chosen} {report.precision}; worst {worst}; "
               f"setup: {setup}")
    raise typer.Exit(0 if report.passed else EXIT_FAILED)


def cache_list() -> None:
    """Each cached model folder and checkpoint: size, and whether it is usable."""
    from trufor_trt.export.cache import cache_entries, cache_root

    entries = cache_entries()
    for entry in entries:
        typer.echo(f"{entry['path']}  {entry['bytes'] / 2 ** 20:.0f} MiB  {entry['kind']}: {entry['state']}")
    total = sum(entry["bytes"] for entry in entries)
    typer.echo(f"{len(entries)} entries, {total / 2 ** 20:.0f} MiB in {cache_root()}")


def cache_clean() -> None:
    """Remove every cached model folder and checkpoint (they are made again when needed)."""
    from trufor_trt.export.cache import cache_root, clean_cache

    freed = clean_cache()
    typer.echo(f"freed {freed / 2 ** 20:.0f} MiB in {cache_root()}")


def doctor(
    model: Optional[Path] = typer.Option(None, "--model", help="Also check this model folder and its engines."),
    json_output: bool = typer.Option(False, "--json", help="The report as JSON on stdout."),
) -> None:
    """What this machine can run: packages, GPUs, CUDA, TensorRT, each backend and why not."""
    import json

    from trufor_trt.doctor import diagnose, report_lines

    report = diagnose(model)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in report_lines(report):
            typer.echo(line)


def _write_bench_files(report: dict, json_path: Optional[Path], markdown: Optional[Path],
                       plot: Optional[Path]) -> None:
    import json

    from trufor_trt.benchmarks.report import write_markdown, write_plot
    from trufor_trt.files import write_atomically

    if json_path is not None:
        write_atomically(json_path, (json.dumps(report, indent=2) + "\n").encode())
    if markdown is not None:
        write_markdown(report, markdown)
    if plot is not None:
        try:
            write_plot(report, plot)
        except ModuleNotFoundError:
            fail_setup('--plot needs matplotlib: pip install "trufor-trt[bench]"')


def bench(
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder from `trufor-trt export`."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint",
                                              help="TruFor checkpoint (else random weights: speed "
                                                   "does not depend on their values)."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help="Backend to measure."),
    precision: Precision = typer.Option(Precision.fp32, "--precision", help="Numeric precision."),
    sizes: str = typer.Option("512x512", "--sizes", help="Synthetic images, HxW[,HxW...]."),
    images: Optional[Path] = typer.Option(None, "--images", help="Real images instead of --sizes."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed images first, per case."),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Timed images per case."),
    streams: int = typer.Option(1, "--streams", min=0,
                                help="Runners side by side in the Offline run (0: skip it)."),
    compare: Optional[str] = typer.Option(None, "--compare",
                                          help="torch: also run the PyTorch FP32 reference."),
    device: str = typer.Option("auto", "--device", help="torch runs: cpu, cuda or auto."),
    peak_gflops: Optional[float] = typer.Option(None, "--peak-gflops", min=0.001,
                                                help="The machine's nominal FP32 peak, if known."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Latency per megapixel, PNG (matplotlib)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown",
                                            help="Write the results table here (between the bench "
                                                 "markers if the file has them)."),
    host_only: bool = typer.Option(False, "--host-only",
                                   help="The host side alone: the network's outputs replayed, decode, "
                                        "postprocess and writing timed for 1..--workers workers."),
    workers: int = typer.Option(0, "--workers", min=0, help="--host-only: up to N workers (0: every core)."),
) -> None:
    """Benchmark per stage: latency (SingleStream), throughput (Offline), memory, FLOP/s."""
    if compare not in (None, "torch"):
        fail_setup(f"--compare {compare}: only torch (the PyTorch reference) can be compared")
    from trufor_trt.benchmarks.bench import BenchOptions, parse_sizes, run_bench
    from trufor_trt.benchmarks.report import print_tables

    if host_only and (images is not None or compare is not None or plot is not None):
        fail_setup("--host-only times synthetic photographs of --sizes; --images, --compare and --plot are "
                   "for the network's benchmark")
    options = BenchOptions(model=model, checkpoint=checkpoint, backend=backend.value,
                           precision=precision.value, sizes=parse_sizes(sizes), images=images,
                           warmup=warmup, repeat=repeat, streams=streams,
                           compare_torch=compare == "torch", device=device, peak_gflops=peak_gflops,
                           host_only=host_only, workers=workers)
    if host_only:
        from trufor_trt.benchmarks.bench import run_host_only_bench
        from trufor_trt.benchmarks.host_only import print_table

        report = run_host_only_bench(options, on_step=say)
        print_table(report, Console(highlight=False, width=200))
    else:
        report = run_bench(options, on_step=say)
        print_tables(report, Console(highlight=False, width=200))
    _write_bench_files(report, json_path, markdown, plot)
    failed = [run for run in report["runs"] if "error" in run]
    for run in failed:
        console.print(f"[red]failed[/] {shown(run['input'])} {run['backend']}: {shown(run['error'])}")
    raise typer.Exit(EXIT_FAILED if failed else 0)
