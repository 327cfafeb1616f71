"""`workbench finetune`: fit the general model to one replay machine and register it in the model registry."""

from __future__ import annotations

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import ci_text, console, json_option, paired_table, progress_bars, render


@app.command("finetune", rich_help_panel="Models")
def finetune(
    device_id: str = typer.Option(..., "--device", metavar="ID", help="The replay machine to fit, e.g. uher-4000-l."),
    speed: float = typer.Option(None, "--speed", metavar="IPS", help="Only this tape speed (default: all its speeds)."),
    base: str = typer.Option(None, "--base", metavar="REF",
                             help="Start from this checkpoint file or MLflow model URI "
                                  "(default: models:/tape-denoiser-general@base, else its latest version)."),
    recipe: str = typer.Option("finetune-cpu", "--recipe", "-r", metavar="R",
                               help="Recipe name or TOML path: schedule, search space, pruner, evaluation."),
    steps: int = typer.Option(None, "--steps", metavar="N", min=1,
                              help="Training steps of each trial (default: the recipe's schedule.steps)."),
    trials: int = typer.Option(None, "--trials", metavar="N", min=1,
                               help="Finished trials the study should reach (default: the recipe's)."),
    timeout: str = typer.Option(None, "--timeout", metavar="DUR",
                                help="Start no new trial after this long, e.g. 30m or 2h (default: the recipe's)."),
    storage: str = typer.Option(None, "--storage", metavar="URL",
                                help="Optuna storage shared by workers: sqlite:///F, postgresql://..., journal:FILE "
                                     "(default: the workspace's registry/optuna.db)."),
    accelerator: str = typer.Option("auto", "--accelerator", metavar="TORCH_DEVICE",
                                    help="Where to train: auto (CUDA when present), cpu, cuda, cuda:1."),
    as_json: bool = json_option(),
) -> None:
    """Fine-tune the general model to one replay machine; register it as tape-denoiser-ID in the model registry.

    An Optuna study (TPE, pruned on validation ΔSNR of the machine's validation noise) searches the
    recipe's schedule space; the best trial is evaluated on the machine's `test` noise with the research
    protocol (10 s fragments at 10 and 16 dB) next to the noisy input, the base model, the current champion
    and spectral gating; the report is written and the model registered. The alias @champion moves only if,
    at every input SNR, the new version's own ΔSNR interval lies above 0 and the paired 95 % interval of its
    gain over the base model and over the previous champion lies above the recipe's min_gain_db (default 0).

    With [finetune] hum_template = true (finetune-cpu, finetune-paper), the machine's mains hum is learnt
    from its blank tape as one waveform and cancelled before the network wherever the model runs (the
    evaluation, `denoise`, the pyfunc model): the fine-tuned network alone does not take out the harmonics.

    Run it again to continue an interrupted study (finished trials are kept, a trial cut off is retried
    from its saved steps); run it on several machines with one `--storage` to share the trials. A study
    answers one question: its name ends in a digest of the base model, recipe, noise and music, so a run
    with any of them changed starts a new study.

    Examples:

        workbench finetune --device uher-4000-l --trials 6
        workbench finetune --device uher-4000-l --steps 800  # a shorter schedule than the recipe's
        workbench finetune --device revox-a77 --speed 7.5 --recipe finetune-paper --accelerator cuda
        workbench finetune --device revox-a77 --storage postgresql://db/optuna  # each host
    """
    from workbench.finetune import finetune_device
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    with progress_bars(enabled=not as_json) as progress:
        result = finetune_device(workspace, device_id, speed=speed, base=base, recipe=recipe, steps=steps,
                                 trials=trials, timeout=timeout, storage=storage, accelerator=accelerator,
                                 progress=progress)
    render(result, as_json, lambda result: _show_finetune(result, device_id))


def _show_finetune(result, device_id: str) -> None:
    console.print(f"study [bold]{result.study}[/]: {result.trials_summary}")
    table = Table(title=f"{result.model_name} v{result.version} on {device_id}'s test noise (ΔSNR dB, mean [95 % CI])")
    table.add_column("method")
    for snr in result.snrs_db:
        table.add_column(f"input {snr:g} dB", justify="right")
    for method, cells in result.table().items():
        table.add_row(method, *[ci_text(*cell) for cell in cells])
    console.print(table)
    if result.paired:
        console.print(paired_table("paired gain of the fine-tuned model (ΔSNR dB, mean [95 % t-interval], "
                                   f"must lie above {result.min_gain_db:+g})", result.paired, result.snrs_db))
    if result.hum_template != "none":
        console.print(f"hum template (cancelled before the network): {result.hum_template}")
    verdict = "[green]promoted to @champion[/]: it" if result.promoted else "[yellow]registered, not promoted[/]: it"
    console.print(f"{result.model_name} version {result.version}: {verdict} {result.reason}")
    console.print(f"report: {result.report_html}")
