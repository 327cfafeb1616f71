"""`workbench demo`: the whole mission on the embedded synthetic archive (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, err_console, json_option, progress_bars, render


@app.command("demo", rich_help_panel="Set-up")
def demo(
    folder: Path = typer.Option(Path("demo"), "--folder", help="The demo's own workspace (created; git-ignored)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the demo workspace first and start over."),
    scale: str = typer.Option("demo", "--scale", help="Archive size: demo (minutes of audio) or small (seconds)."),
    recipe: str = typer.Option("finetune-demo", "--recipe",
                               help="Recipe for fine-tuning the demo's machine (finetune-demo: finetune-cpu in "
                                    "fewer steps, to fit ten minutes; --recipe finetune-cpu for the full schedule)."),
    trials: int = typer.Option(None, "--trials", help="Optuna trials for the fine-tuning study (default: the recipe's)."),
    as_json: bool = json_option("every stage's result"),
) -> None:
    """Run the whole mission end to end on a synthetic archive, in minutes on a laptop CPU.

    Renders blank tapes for three machines and a clean corpus, ingests the noise, registers the boxed
    general model (models/general/) as @base, fine-tunes one machine with a small Optuna study, registers it
    in the model registry (MLflow), restores a sample transfer with its champion and lists the model registry.
    A second run reuses what is done.
    """
    from workbench.demo import DemoSettings, run_demo

    settings = DemoSettings(folder=folder, scale=scale, recipe=recipe, trials=trials, fresh=fresh)
    with progress_bars(enabled=not as_json) as progress:
        results = run_demo(settings, progress, on_stage=None if as_json else _show_heading,
                           on_result=None if as_json else _show_stage_summary)
    total = sum(r.seconds for r in results)
    render({"seconds": round(total, 1), "stages": [r.to_dict() for r in results]}, as_json,
           lambda _: _show_demo(results, total, settings.folder))


def _show_heading(stage) -> None:
    err_console.rule(f"[bold]{stage.title}")


def _show_stage_summary(result) -> None:
    err_console.print(("(reused) " if result.reused else "") + result.summary, highlight=False)


def _show_demo(results: list, total: float, workspace: Path) -> None:
    table = Table(title="Demo")
    for column in ("stage", "result", "time"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, ("[dim](reused)[/] " if r.reused else "") + r.summary, f"{r.seconds:.0f} s")
    console.print(table)
    registry = results[-1].data
    models = Table(title="Registered models")
    for column in ("model", "versions", "aliases", "ΔSNR (dB) by input SNR"):
        models.add_column(column)
    for m in registry["models"]:
        aliases = ", ".join(f"@{a}→v{v}" for a, v in m["aliases"].items())
        delta = ", ".join(f"{snr} dB: {value:+.2f}" for snr, value in m["delta_snr_db"].items())
        models.add_row(m["name"], str(m["versions"]), aliases, delta)
    console.print(models)
    console.print(f"Finished in {total / 60:.1f} min. Report: {registry['device_model']['report_path']}")
    console.print(f"Browse the model registry: [bold]WORKBENCH_HOME={workspace} workbench ui[/] "
                  "(then open http://127.0.0.1:5000)")
