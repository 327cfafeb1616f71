"""`workbench demo`: the whole mission on the embedded synthetic archive (what `make demo` runs)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, err_console, print_json, progress_bars


@app.command("demo", rich_help_panel="Set-up")
def demo(
    folder: Path = typer.Option(Path("demo"), "--folder", help="The demo's own workspace (created; git-ignored)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the demo workspace first and start over."),
    scale: str = typer.Option("demo", "--scale", help="Archive size: demo (minutes of audio) or small (seconds)."),
    recipe: str = typer.Option("finetune-cpu", "--recipe", help="Recipe for fine-tuning the demo's machine."),
    trials: int = typer.Option(None, "--trials", help="Optuna trials for the fine-tuning study (default: the recipe's)."),
    as_json: bool = typer.Option(False, "--json", help="Print every stage's result as JSON for scripts."),
) -> None:
    """Run the whole mission end to end on a synthetic archive, in minutes on a laptop CPU.

    Renders blank tapes for three machines and a clean corpus, ingests the noise, registers the boxed
    general model (models/general/) as @base, fine-tunes one machine with a small Optuna study, registers it in MLflow, restores a sample
    transfer with its champion and lists the registry. A second run reuses what is done.
    """
    from workbench.demo import DemoSettings, demo_stages, prepare_workspace

    settings = DemoSettings(folder=folder, scale=scale, recipe=recipe, trials=trials, fresh=fresh)
    started = time.perf_counter()
    workspace = prepare_workspace(settings)
    results, timings = [], {}
    for stage in demo_stages(workspace, settings):
        if not as_json:
            err_console.rule(f"[bold]{stage.title}")
        stage_started = time.perf_counter()
        with progress_bars(enabled=not as_json) as progress:
            results.append(stage.run(progress))
        timings[stage.name] = time.perf_counter() - stage_started
        if not as_json:
            err_console.print(("(reused) " if results[-1].reused else "") + results[-1].summary, highlight=False)
    total = time.perf_counter() - started
    if as_json:
        print_json({"seconds": round(total, 1), "stages": [
            {"name": r.name, "summary": r.summary, "reused": r.reused, "seconds": round(timings[r.name], 1),
             "data": r.data} for r in results]})
        return
    table = Table(title="Demo")
    for column in ("stage", "result", "time"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, ("[dim](reused)[/] " if r.reused else "") + r.summary, f"{timings[r.name]:.0f} s")
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
    workspace = settings.folder
    console.print(f"Finished in {total / 60:.1f} min. Report: {registry['device_model']['report_path']}")
    console.print(f"Browse the registry: [bold]WORKBENCH_HOME={workspace} workbench ui[/] "
                  "(then open http://127.0.0.1:5000)")
