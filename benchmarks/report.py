"""The bench report as people read it: tables on stdout, a markdown block, a plot."""

import re
from pathlib import Path

from trufor_trt.files import write_atomically

STAGES = ("decode", "preprocess", "host_to_device", "inference", "device_postprocess", "device_to_host",
          "postprocess")
PARTS = ("noiseprint", "encoder", "decoders")  # the network's parts, as runners time them
MARKDOWN_BEGIN = "<!-- trufor-trt bench: begin -->"
MARKDOWN_END = "<!-- trufor-trt bench: end -->"
HOST_ONLY_BEGIN = "<!-- trufor-trt bench --host-only: begin -->"
HOST_ONLY_END = "<!-- trufor-trt bench --host-only: end -->"
GIB = 1024 ** 3


def run_name(run: dict) -> str:
    name = f"{run['backend']} {run['precision']}"
    return name + " (reference)" if run["role"] == "reference" else name


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def latency_rows(report: dict):
    """(input, runner, median ms per stage..., end to end n / median / p90 / p99 / max)."""
    for run in report["runs"]:
        if "error" in run:
            yield (run["input"], run_name(run), *(["-"] * len(STAGES)), f"error: {run['error']}")
            continue
        stats = run["single_stream"]["stats_ms"]
        stages = [_ms(stats[stage]["median"]) if stage in stats else "-" for stage in STAGES]
        total = stats["end_to_end"]
        yield (run["input"], run_name(run), *stages,
               f"n={total['n']}: {_ms(total['median'])} / {_ms(total['p90'])} / "
               f"{_ms(total['p99'])} / {_ms(total['max'])}")


def _percent(run: dict, key: str) -> str:
    return f"{100 * run[key]:.0f}%" if key in run else "-"


def _offline(run: dict) -> str:
    offline = run.get("offline")
    if not offline:
        return "-"
    return (f"{offline['images_per_s']:.2f}/s x{offline['streams']}, "
            f"bound by {offline['bottleneck']} ({100 * offline['utilisation'][offline['bottleneck']]:.0f}% busy)")


def summary_rows(report: dict):
    """(input, runner, MP, GFLOP, GFLOP/s, % GEMM, % peak, peak RSS, s/MP, GiB/MP, device, offline)."""
    for run in report["runs"]:
        if "error" in run:
            continue
        device = run["memory"]["device_peak_bytes"]
        yield (run["input"], run_name(run), f"{run['megapixels']:.2f}", f"{run['gflop_per_image']:.0f}",
               f"{run['achieved_gflops']:.0f}", _percent(run, "fraction_of_gemm_rate"),
               _percent(run, "fraction_of_peak"),
               f"{run['memory']['host_peak_rss_bytes'] / GIB:.2f} GiB",
               f"{run['seconds_per_megapixel']:.1f}", f"{run['peak_rss_gib_per_megapixel']:.2f}",
               f"{device / GIB:.2f} GiB" if device is not None else "-", _offline(run))


def parts_rows(report: dict):
    """(input, runner, per part: median ms (% of end to end), GFLOP/s) for runs timed in parts."""
    for run in report["runs"]:
        parts = run.get("single_stream", {}).get("parts")
        if parts:
            yield (run["input"], run_name(run), *(
                f"{_ms(parts[name]['stats_ms']['median'])} ({100 * parts[name]['share_of_end_to_end']:.1f}%), "
                f"{parts[name]['achieved_gflops']:.0f}" if name in parts else "-" for name in PARTS))


def print_tables(report: dict, console) -> None:
    from rich.table import Table

    latency = Table(title="SingleStream latency, ms (median per stage; end to end n: median / p90 / p99 / max)")
    for column in ("input", "runner", *STAGES, "end to end"):
        latency.add_column(column, justify="left" if column in ("input", "runner") else "right")
    for row in latency_rows(report):
        latency.add_row(*row)
    console.print(latency)
    summary = Table(title="Compute, memory, throughput")
    for column in ("input", "runner", "MP", "GFLOP", "GFLOP/s", "% GEMM", "% peak", "peak RSS",
                   "s/MP", "GiB/MP", "device", "Offline"):
        summary.add_column(column, justify="left" if column in ("input", "runner", "Offline") else "right")
    for row in summary_rows(report):
        summary.add_row(*row)
    console.print(summary)
    rows = list(parts_rows(report))
    if rows:
        parts = Table(title="Inference by part: median ms (share of end to end), GFLOP/s executed")
        for column in ("input", "runner", *PARTS):
            parts.add_column(column, justify="left" if column in ("input", "runner") else "right")
        for row in rows:
            parts.add_row(*row)
        console.print(parts)
    for item in report["comparisons"]:
        console.print(f"{item['input']}: {item['engine']} is {item['speedup_end_to_end']:.2f}x faster "
                      f"end to end ({item['speedup_inference']:.2f}x in inference) than {item['reference']}")


def _markdown_row(run: dict, speedup) -> str:
    if "error" in run:
        return f"| {run['input']} | {run_name(run)} | error: {run['error']} | | | | | | |"
    stats = run["single_stream"]["stats_ms"]
    offline = run.get("offline")
    cells = [
        run["input"], run_name(run),
        f"{stats['end_to_end']['median'] / 1e3:.2f} s ({stats['end_to_end']['p90'] / 1e3:.2f} s)",
        f"{stats['inference']['median'] / 1e3:.2f} s",
        f"{run['achieved_gflops']:.0f} ({_percent(run, 'fraction_of_gemm_rate')})",
        f"{run['memory']['host_peak_rss_bytes'] / GIB:.2f} GiB",
        f"{run['seconds_per_megapixel']:.1f} s, {run['peak_rss_gib_per_megapixel']:.2f} GiB",
        f"{offline['images_per_s']:.2f} img/s" if offline else "-",
        f"{speedup['speedup_end_to_end']:.2f}x" if speedup else "",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(report: dict) -> str:
    machine = report["machine"]
    gemm = ", ".join(f"{name} {rate:.0f}" for name, rate in report["cpu_gemm_gflops"].items())
    lines = [
        f"Measured {report['date'][:10]} on {machine['cpu']} (family/model "
        f"{'/'.join(map(str, machine['cpu_family_model']))}, {machine['physical_cores']} cores, "
        f"{', '.join(machine['simd'])}); FP32 GEMM GFLOP/s: {gemm}. Weights: {report['weights']}. "
        f"{report['settings']['warmup']} warm-up + {report['settings']['repeat']} timed images per row.",
        "",
        "| input | runner | end to end, median (p90) | inference, median | GFLOP/s (% of GEMM) "
        "| peak RSS | per megapixel | Offline | speed-up vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    speedups = {item["input"]: item for item in report["comparisons"]}
    lines += [_markdown_row(run, speedups.get(run["input"]) if run["role"] == "engine" else None)
              for run in report["runs"]]
    rows = list(parts_rows(report))
    if rows:
        lines += ["", "Inference by part: median (share of end to end), GFLOP/s executed:", "",
                  "| input | runner | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: Path) -> None:
    """The table alone, or, where the file has the bench markers, the block between them."""
    if report.get("host_only"):
        from trufor_trt.benchmarks import host_only

        write_marked_block(path, host_only.markdown_table(report), HOST_ONLY_BEGIN, HOST_ONLY_END)
    else:
        write_marked_block(path, markdown_table(report), MARKDOWN_BEGIN, MARKDOWN_END)


def write_marked_block(path: Path, table: str, begin: str, end: str) -> None:
    """`table` between the markers where the file has them, else the file is the block alone."""
    block = f"{begin}\n{table}{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in text and end in text:
        pattern = re.escape(begin) + ".*?" + re.escape(end)
        text = re.sub(pattern, lambda _: block, text, count=1, flags=re.S)
    else:
        text = block + "\n"
    write_atomically(path, text.encode("utf-8"))


def write_plot(report: dict, path: Path) -> None:
    """End-to-end median latency per megapixel against image size, one line per runner."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    lines = {}
    for run in report["runs"]:
        if "error" not in run:
            median_s = run["single_stream"]["stats_ms"]["end_to_end"]["median"] / 1e3
            lines.setdefault(run_name(run), []).append((run["megapixels"], median_s / run["megapixels"]))
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for name, points in lines.items():
        points.sort()
        axes.plot(*zip(*points), marker="o", label=name)
    axes.set_xlabel("image size, megapixels")
    axes.set_ylabel("end-to-end latency per megapixel, s")
    axes.set_title(f"trufor-trt bench, {report['machine']['cpu']}, {report['date'][:10]}")
    axes.grid(alpha=0.3)
    axes.legend()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    pyplot.close(figure)
    temporary.replace(path)
