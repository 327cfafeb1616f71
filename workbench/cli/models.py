"""`workbench finetune`, `workbench models list|show` and `workbench ui`: device models and their registry."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, err_console, print_json, progress_bars

models_app = typer.Typer(
    help="The device models in the MLflow registry (tape-denoiser-DEVICE): versions, champions, reports.",
    no_args_is_help=True)
app.add_typer(models_app, name="models", rich_help_panel="Models")


def _when(iso: str) -> str:
    """2026-11-25T21:07:17+00:00 -> 2026-11-25 21:07 (UTC): the table's width goes to the numbers."""
    return iso[:16].replace("T", " ")


def _ci(value: float, low: float, high: float) -> str:
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


@app.command("finetune", rich_help_panel="Models")
def finetune(
    device_id: str = typer.Option(..., "--device", metavar="ID", help="The replay machine to fit, e.g. uher-4000-l."),
    speed: float = typer.Option(None, "--speed", metavar="IPS", help="Only this tape speed (default: all its speeds)."),
    base: str = typer.Option(None, "--base", metavar="REF",
                             help="Start from this checkpoint file or MLflow model URI "
                                  "(default: models:/tape-denoiser-general@base, else its latest version)."),
    recipe: str = typer.Option("finetune-cpu", "--recipe", "-r", metavar="R",
                               help="Recipe name or TOML path: schedule, search space, pruner, evaluation."),
    trials: int = typer.Option(None, "--trials", metavar="N", min=1,
                               help="Finished trials the study should reach (default: the recipe's)."),
    timeout: str = typer.Option(None, "--timeout", metavar="DUR",
                                help="Start no new trial after this long, e.g. 30m or 2h (default: the recipe's)."),
    storage: str = typer.Option(None, "--storage", metavar="URL",
                                help="Optuna storage shared by workers: sqlite:///F, postgresql://..., journal:FILE "
                                     "(default: the workspace's registry/optuna.db)."),
    accelerator: str = typer.Option("auto", "--accelerator", metavar="TORCH_DEVICE",
                                    help="Where to train: auto (CUDA when present), cpu, cuda, cuda:1."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON for scripts."),
) -> None:
    """Fine-tune the general model to one replay machine and register it as tape-denoiser-ID.

    An Optuna study (TPE, pruned on validation ΔSNR of the machine's validation noise) searches the
    recipe's schedule space; the best trial is evaluated on the machine's `test` noise with the research
    protocol (10 s fragments at 10 and 16 dB) next to the noisy input, the base model, the current champion
    and spectral gating; the report is written and the model registered. The alias @champion moves only if,
    at every input SNR, the new version's own ΔSNR interval lies above 0 and the paired 95 % interval of its
    gain over the base model and over the previous champion lies above the recipe's min_gain_db (default 0).

    Run it again to continue an interrupted study (finished trials are kept, a trial cut off is retried
    from its saved steps); run it on several machines with one `--storage` to share the trials. A study
    answers one question: its name ends in a digest of the base model, recipe, noise and music, so a run
    with any of them changed starts a new study.

    Examples:

        workbench finetune --device uher-4000-l --trials 6
        workbench finetune --device revox-a77 --speed 7.5 --recipe finetune-paper --accelerator cuda
        workbench finetune --device revox-a77 --storage postgresql://db/optuna  # each host
    """
    from workbench.finetune import finetune_device
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    with progress_bars(enabled=not as_json) as progress:
        result = finetune_device(workspace, device_id, speed=speed, base=base, recipe=recipe, trials=trials,
                                 timeout=timeout, storage=storage, accelerator=accelerator, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"study [bold]{result.study}[/]: {result.trials_summary}")
    table = Table(title=f"{result.model_name} v{result.version} on {device_id}'s test noise (ΔSNR dB, mean [95 % CI])")
    table.add_column("method")
    for snr in result.snrs_db:
        table.add_column(f"input {snr:g} dB", justify="right")
    for method, cells in result.table().items():
        table.add_row(method, *[_ci(*cell) for cell in cells])
    console.print(table)
    if result.paired:
        console.print(_paired_table("paired gain of the fine-tuned model (ΔSNR dB, mean [95 % t-interval], "
                                    f"must lie above {result.min_gain_db:+g})", result.paired, result.snrs_db))
    verdict = "[green]promoted to @champion[/]: it" if result.promoted else "[yellow]registered, not promoted[/]: it"
    console.print(f"{result.model_name} version {result.version}: {verdict} {result.reason}")
    console.print(f"report: {result.report_html}")


def _paired_table(title: str, paired: dict[str, dict[str, dict]], snrs: list[float]) -> Table:
    """rival -> str(snr) -> {"mean", "ci_low", "ci_high", ...} as a table: one row per rival."""
    table = Table(title=title)
    table.add_column("fine-tuned −")
    for snr in snrs:
        table.add_column(f"input {snr:g} dB", justify="right")
    for rival, cells in paired.items():
        table.add_row(rival, *[_ci(cells[f"{snr:g}"]["mean"], cells[f"{snr:g}"]["ci_low"], cells[f"{snr:g}"]["ci_high"])
                               if f"{snr:g}" in cells else "" for snr in snrs])
    return table


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Every device model: versions, aliases, the champion's ΔSNR, last change.

    Examples:

        workbench models list
        workbench models list --json
    """
    from workbench.model_registry import list_models
    from workbench.workspace import find_workspace

    models = list_models(find_workspace())
    if as_json:
        print_json(models)
        return
    if not models:
        console.print("no models registered yet: `workbench pretrain` (or import-checkpoint), then "
                      "`workbench finetune --device ID`")
        return
    snrs = sorted({snr for m in models for snr in m["delta_snr_db"]}, key=float)
    table = Table(title="Registered models")
    for column in ("model", "versions", "aliases", *(f"ΔSNR@{s}" for s in snrs), "updated (UTC)"):
        table.add_column(column, justify="right" if column.startswith(("ΔSNR", "versions")) else "left",
                         no_wrap=column in ("model", "updated (UTC)"))
    for m in models:
        aliases = ", ".join(f"@{a}→v{v}" for a, v in m["aliases"].items()) or "—"
        deltas = [f"{m['delta_snr_db'][s]:+.2f}" if s in m["delta_snr_db"] else "" for s in snrs]
        table.add_row(m["name"], str(m["versions"]), aliases, *deltas, _when(m["updated"]))
    console.print(table)
    console.print("ΔSNR@N: gain in dB at N dB input SNR of the champion (else @base, else the latest version) "
                  "on its device's test noise; "
                  "details: `workbench models show DEVICE`, browse: `workbench ui`")


@models_app.command("show")
def models_show(
    device_id: str = typer.Argument(..., metavar="DEVICE", help="Device id, e.g. uher-4000-l."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """One device's model: its versions, the champion, its report's summary and where the full report is.

    Examples:

        workbench models show uher-4000-l
    """
    from workbench.model_registry import show_model
    from workbench.workspace import find_workspace

    shown = show_model(find_workspace(), device_id)
    if as_json:
        print_json(shown)
        return
    table = Table(title=f"{shown['name']} versions")
    with_peaq = any(v.get("delta_peaq") for v in shown["versions"])
    for column in ("version", "aliases", "ΔSNR (dB) per input SNR", *(["ΔPEAQ per input SNR"] if with_peaq else []),
                   "promoted", "created (UTC)"):
        table.add_column(column)
    for v in shown["versions"]:
        deltas = ", ".join(f"{snr} dB: {value:+.2f}" for snr, value in v["delta_snr_db"].items())
        peaq = [", ".join(f"{snr} dB: {value:+.2f}" for snr, value in v.get("delta_peaq", {}).items())] if with_peaq else []
        table.add_row(str(v["version"]), ", ".join(f"@{a}" for a in v["aliases"]) or "—", deltas, *peaq,
                      v["promoted"] or "—", _when(v["created"]))
    console.print(table)
    report = shown["report"]
    if report:
        summary = Table(title=f"report of version {shown['report_version']}: pooled test results (mean [95 % CI])")
        report_peaq = any("delta_peaq" in row for row in report["table"])
        for column in ("input SNR", "method", "ΔSNR (dB)", "ΔSI-SDR (dB)", *(["ΔPEAQ (ODG)"] if report_peaq else []),
                       "fragments"):
            summary.add_column(column)
        for row in report["table"]:
            peaq = [_ci(row["delta_peaq"], *row["delta_peaq_ci"]) if "delta_peaq" in row else ""] if report_peaq else []
            summary.add_row(f"{row['input_snr_db']:g} dB", row["method"], _ci(row["delta_snr_db"], *row["delta_snr_ci"]),
                            f"{row['delta_si_sdr_db']:+.2f}", *peaq, str(row["fragments"]))
        console.print(summary)
        if report.get("paired"):
            snrs = sorted({float(snr) for cells in report["paired"].values() for snr in cells})
            console.print(_paired_table(f"report of version {shown['report_version']}: paired gain of the fine-tuned "
                                        "model (ΔSNR dB, mean [95 % t-interval])", report["paired"], snrs))
        if report["decision"].get("message"):
            console.print(report["decision"]["message"])
    console.print(f"full report: {shown['report_path'] or '(not on this machine)'}"
                  + (f"  |  MLflow: {shown['report_artifact']}" if shown["report_artifact"] else ""))


@app.command("ui", rich_help_panel="Models")
def ui(
    port: int = typer.Option(5000, "--port", help="TCP port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; keep 127.0.0.1 unless you mean to share it."),
) -> None:
    """Serve the MLflow UI (and REST API) for this workspace's store: runs, studies' trials, registry, reports.

    Binds 127.0.0.1 unless told otherwise; Ctrl-C stops it.

    Examples:

        workbench ui                 # then open http://127.0.0.1:5000
        workbench ui --port 5001
    """
    import signal
    import subprocess

    from workbench.model_registry import ui_command
    from workbench.workspace import find_workspace

    command = ui_command(find_workspace(), host=host, port=port)
    err_console.print(f"MLflow UI for this workspace at http://{host}:{port} (Ctrl-C stops it)")
    server = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        code = server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT, 130):
        raise typer.Exit(code)
