"""`workbench checkpoint import|info|register`: model files on disk, and entering one into the model registry."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, json_option, progress_bars, render

checkpoint_app = typer.Typer(
    help=("Checkpoint files (X.safetensors with X.json beside it): import the published Keras model, show and "
          "verify a file, register one in the model registry (MLflow)."),
    no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint", rich_help_panel="Models")


@checkpoint_app.command("import")
def import_checkpoint(
    index: Path = typer.Argument(..., metavar="PATH",
                                 help="The Keras checkpoint: PATH/checkpoint.index (or its prefix, or its folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the workbench checkpoint (.safetensors; "
                                                      "a .json config is written beside it)."),
    size: str = typer.Option("paper", "--size", help="Network size the checkpoint holds (the published model "
                                                     "is `paper`)."),
    as_json: bool = json_option("the import summary"),
) -> None:
    """Import the published TensorFlow/Keras tape-noise model (no TensorFlow needed).

    The general tape-noise model of Irigaray et al. (2023), trained with Moliner & Välimäki's two-stage
    U-Net code, ships as a Keras `save_weights` checkpoint: `checkpoint.index` plus
    `checkpoint.data-00000-of-00001`. This reads it directly, checks every tensor's CRC, maps all 284
    variables onto the `paper` network (kernel layouts, transposed convolutions) and writes a safetensors
    checkpoint with its JSON config and lineage, ready for `finetune` or `denoise`:

        workbench checkpoint import downloads/tape_model/checkpoint.index --out models/tape-general.safetensors

    If any variable is missing, left over or has the wrong shape, nothing is written and the mismatches
    are listed. Optimizer state in the checkpoint, if any, is skipped.
    """
    from workbench.model.keras_import import import_keras_checkpoint
    from workbench.model.unet import get_config

    config = get_config(size)
    with progress_bars(enabled=True) as progress:
        summary = import_keras_checkpoint(index, out, config=config, progress=progress)
    render(summary, as_json, _show_import)


def _show_import(summary: dict) -> None:
    console.print(f"imported {summary['variables']} variables ({summary['parameters']:,} parameters, "
                  f"size {summary['size']}) from {summary['source']}")
    if summary["skipped_entries"]:
        console.print(f"skipped {len(summary['skipped_entries'])} non-weight entries "
                      f"(object graph, optimizer state)")
    console.print(f"wrote {summary['out']} and {summary['config']}")


@checkpoint_app.command("info")
def checkpoint_info(
    path: Path = typer.Argument(..., metavar="FILE", help="A workbench checkpoint (.safetensors or its .json)."),
    as_json: bool = json_option("the checkpoint's summary"),
) -> None:
    """Show what a checkpoint file holds: network size, parameters, STFT, lineage; and verify it loads.

    Loading checks the weights' sha256 against the JSON config and every tensor's name and shape
    against the network, so this is also the quick way to check a checkpoint file:

        workbench checkpoint info models/tape-general.safetensors
    """
    from workbench.model.checkpoint import checkpoint_summary

    render(checkpoint_summary(path), as_json, _show_checkpoint)


def _show_checkpoint(summary: dict) -> None:
    table = Table(title=str(summary["weights_file"]), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    config = summary["config"]
    stft = summary.get("stft", {})
    rows = [
        ("architecture", summary.get("architecture", "")),
        ("size", summary.get("size", "")),
        ("channels per level", ", ".join(str(c) for c in config["channels"])),
        ("dense layers per block", str(config.get("dense_layers", ""))),
        ("parameters", f"{summary['parameters_loaded']:,}"),
        ("sample rate", f"{summary.get('sample_rate', '')} Hz"),
        ("STFT", f"window {stft.get('n_fft', '?')} ({stft.get('window', '?')}), hop {stft.get('hop_length', '?')}"
         if stft else "(not recorded)"),
        ("created", summary.get("created", "")),
        ("weights sha256", summary.get("weights_sha256", "(no JSON config beside the weights)")),
    ]
    for key, value in sorted((summary.get("lineage") or {}).items()):
        if key != "files_sha256":
            rows.append((f"lineage: {key}", ", ".join(map(str, value)) if isinstance(value, list) else str(value)))
    for field, value in rows:
        table.add_row(field, str(value))
    console.print(table)


@checkpoint_app.command("register")
def register_checkpoint_command(
    checkpoint: Path = typer.Argument(..., metavar="FILE", help="A workbench checkpoint (X.safetensors with X.json beside it)."),
    name: str = typer.Option(None, "--name", help="Registered model name (default: the general model, tape-denoiser-general)."),
    alias: str = typer.Option(None, "--alias", help="Point this alias (e.g. base) at the new version."),
    description: str = typer.Option(None, "--description", help="Version description (default: from the checkpoint)."),
    as_json: bool = json_option("the registered version"),
) -> None:
    """Register a checkpoint file in the model registry (MLflow): a new version, weights as safetensors.

    For a checkpoint made outside `workbench pretrain`, e.g. the published model after
    `workbench checkpoint import`:

        workbench checkpoint import tape/checkpoint.index --out general.safetensors
        workbench checkpoint register general.safetensors --alias base
    """
    from workbench.model_registry import GENERAL_MODEL, model_uri, register_checkpoint_file
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    name = name or GENERAL_MODEL
    version = register_checkpoint_file(workspace, checkpoint, name=name, alias=alias, description=description)
    registered = {"name": name, "version": version, "model_uri": model_uri(name, version), "alias": alias}
    render(registered, as_json, _show_registered)


def _show_registered(registered: dict) -> None:
    alias = registered["alias"]
    console.print(f"registered [bold]{registered['model_uri']}[/]" + (f" (@{alias})" if alias else ""))
