"""`workbench models list|show` and `workbench ui`: the device models in the model registry (MLflow)."""

from __future__ import annotations

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import ci_text, console, err_console, json_option, paired_table, render

models_app = typer.Typer(
    help="The device models in the model registry (MLflow): tape-denoiser-DEVICE, versions, champions, reports.",
    no_args_is_help=True)
app.add_typer(models_app, name="models", rich_help_panel="Models")


def _when(iso: str) -> str:
    """2026-11-25T21:07:17+00:00 -> 2026-11-25 21:07 (UTC): the table's width goes to the numbers."""
    return iso[:16].replace("T", " ")


@models_app.command("list")
def models_list(as_json: bool = json_option("the models")) -> None:
    """Every device model: versions, aliases, the champion's ΔSNR, last change.

    Examples:

        workbench models list
        workbench models list --json
    """
    from workbench.model_registry import list_models
    from workbench.workspace import find_workspace

    render(list_models(find_workspace()), as_json, _show_models)


def _show_models(models: list[dict]) -> None:
    if not models:
        console.print("no models registered yet: `workbench pretrain` (or `workbench checkpoint import`), then "
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
    as_json: bool = json_option("the model's versions and report"),
) -> None:
    """One device's model: its versions, the champion, its report's summary and where the full report is.

    Examples:

        workbench models show uher-4000-l
    """
    from workbench.model_registry import show_model
    from workbench.workspace import find_workspace

    render(show_model(find_workspace(), device_id), as_json, _show_model)


def _show_model(shown: dict) -> None:
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
    for v in shown["versions"]:
        if v.get("hum_template", "none") != "none":
            console.print(f"version {v['version']}: hum template (cancelled before the network): {v['hum_template']}")
    report = shown["report"]
    if report:
        summary = Table(title=f"report of version {shown['report_version']}: pooled test results (mean [95 % CI])")
        report_peaq = any("delta_peaq" in row for row in report["table"])
        for column in ("input SNR", "method", "ΔSNR (dB)", "ΔSI-SDR (dB)", *(["ΔPEAQ (ODG)"] if report_peaq else []),
                       "fragments"):
            summary.add_column(column)
        for row in report["table"]:
            peaq = [ci_text(row["delta_peaq"], *row["delta_peaq_ci"]) if "delta_peaq" in row else ""] if report_peaq else []
            summary.add_row(f"{row['input_snr_db']:g} dB", row["method"],
                            ci_text(row["delta_snr_db"], *row["delta_snr_ci"]), f"{row['delta_si_sdr_db']:+.2f}", *peaq,
                            str(row["fragments"]))
        console.print(summary)
        if report.get("paired"):
            snrs = sorted({float(snr) for cells in report["paired"].values() for snr in cells})
            console.print(paired_table(f"report of version {shown['report_version']}: paired gain of the fine-tuned "
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
    """Serve the MLflow UI (and REST API) for this workspace's store: runs, studies' trials, the model registry, reports.

    Binds 127.0.0.1 unless told otherwise; Ctrl-C stops it.

    Examples:

        workbench ui                 # then open http://127.0.0.1:5000
        workbench ui --port 5001
    """
    from workbench.ui import STOPPED_ON_REQUEST, serve_ui
    from workbench.workspace import find_workspace

    code = serve_ui(find_workspace(), host=host, port=port, on_start=lambda url: err_console.print(
        f"MLflow UI for this workspace at {url} (Ctrl-C stops it)"))
    if code not in STOPPED_ON_REQUEST:
        raise typer.Exit(code)
