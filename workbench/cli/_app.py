"""The Typer application object that every command module attaches its commands to."""

import typer

app = typer.Typer(
    name="workbench",
    help=(
        "Fine-tune a tape-noise denoiser to each replay machine of a sound archive.\n\n"
        "The usual flow: record blank tape on each machine and `capture-noise` it into the noise library; "
        "`pretrain` (or `checkpoint import`) a general tape-noise model; `finetune --device ID` to fit it "
        "to one machine and register it in the model registry (MLflow); `denoise --device ID` to restore "
        "transfers with that machine's champion model. `--device ID` always names a replay machine; "
        "`--accelerator` is where torch runs (auto, cpu, cuda, cuda:N). `make demo` runs it all on a "
        "synthetic archive."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",  # paragraphs reflow to the terminal width
)


def _print_version(value: bool) -> None:
    if value:
        from workbench import __version__

        typer.echo(f"workbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Fine-tune a tape-noise denoiser to each replay machine of a sound archive."""
