"""`trufor-trt`: the command line. Thin: each command parses, calls the package, sets the exit code.

Exit codes: 0 all good, 1 some images failed (the others were done), results.csv could not be
rewritten, or a self-test failed; 2 usage or setup error; 3 the batch stopped: the runner itself
failed, or results.jsonl could not be written; 128 + N stopped by signal N (Ctrl-C: 130).
Progress and messages go to stderr; stdout stays free for results.

One module per family of commands; every command is registered through `handled`, the one
place where the project's errors and missing packages become one-line messages.
"""

import typer

from trufor_trt import __version__
from trufor_trt.cli import batch_commands, machine_commands, model_commands, service_commands, weights_commands
from trufor_trt.cli.common import handled
from trufor_trt.engine.decode import separate_python_stderr

# Plain help: typer's rich help shows every flag as taking a value ("--fp16 <bool>").
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="TruFor forgery detection and localization, exported and run fast and faithfully.")
cache_app = typer.Typer(help="The export cache: model folders exported from --checkpoint runs.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")
weights_app = typer.Typer(help="The official TruFor weights: download once (non-commercial research use), then "
                               "every command uses them by default.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(weights_app, name="weights")

COMMANDS = {
    "export": model_commands.export,
    "analyze": batch_commands.analyze,
    "report": batch_commands.report_command,
    "watch": service_commands.watch,
    "serve": service_commands.serve,
    "selftest": machine_commands.selftest,
    "doctor": machine_commands.doctor,
    "build": model_commands.build,
    "validate": model_commands.validate,
    "bench": machine_commands.bench,
}
for name, command in COMMANDS.items():
    app.command(name)(handled(command))
cache_app.command("list")(handled(machine_commands.cache_list))
cache_app.command("clean")(handled(machine_commands.cache_clean))
for name, command in {"download": weights_commands.download, "add": weights_commands.add,
                      "path": weights_commands.path}.items():
    weights_app.command(name)(handled(command))


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"trufor-trt {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """TruFor: a localization map, a reliability map and an integrity score per image."""


def run() -> None:
    """The `trufor-trt` command."""
    separate_python_stderr()
    app(prog_name="trufor-trt")
